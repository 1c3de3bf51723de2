//! Vendor conformance: every documented answer in `data/vendor/` read by the client's own functions
//! (values asserted), the simulator answering in the same shapes over loopback, and the commands that
//! depend on them (`callbacks list`, `run`) with and without a registered callback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tsusage::normalize::payload::{CallbackKind, parse_callback, strip_credentials};
use tsusage::sim::{self, SimConfig, SimHandle, usage_for};
use tsusage::submit::ApiError;
use tsusage::submit::client::{Stale, classify, stale_token};
use tsusage::submit::wire::{self, RegisteredCallback};

use crate::util::{ACCOUNT, DAY_US, DAY0, Workspace, free_port, iccid};

const REQUEST_ID: &str = "595f5c44-c31c-4552-8670-020a1545a84d";
const START: &str = "2021-08-15T00:00:00Z";
const END: &str = "2021-08-16T00:00:00Z";

// --- The documented answers, read by the client -------------------------------------------------

#[test]
fn token_and_session_answers_give_their_tokens() {
    let token: wire::OAuthToken = wire::parse_answer(&fixture("oauth_token.json")).expect("token");
    assert_eq!(token.access_token, "89ba225e1438e95bd05c3cc288d3591");
    assert_eq!(token.expires_in, Some(3600));
    let session: wire::Session =
        wire::parse_answer(&fixture("session_login.json")).expect("session");
    assert_eq!(
        session.session_token,
        "bcce3ea6-fe4f-4952-bacf-eadd80718e83"
    );
}

#[test]
fn the_documented_usage_answer_is_accepted_despite_its_trailing_comma() {
    let page = fixture("usage_accepted.json");
    assert!(
        serde_json::from_slice::<Value>(&page).is_err(),
        "the page's example is kept verbatim: invalid JSON"
    );
    let accepted = wire::parse_request_accepted(&page).expect("accepted");
    assert_eq!(accepted.request_id, REQUEST_ID);
}

#[test]
fn callback_list_answers_parse_in_both_spellings_and_an_empty_body_is_no_callback() {
    let listed = wire::parse_callback_list(&fixture("callback_list.json")).expect("list");
    assert_eq!(
        listed,
        vec![
            registered("DeviceUsage", "https://etl.example.com:9001/callbacks"),
            registered("CarrierService", "https://etl.example.com:9002/carrier"),
        ]
    );
    let empty = fixture("callback_list_empty.txt");
    assert!(empty.is_empty(), "the page's empty answer is 0 bytes");
    assert_eq!(wire::parse_callback_list(&empty).expect("empty"), vec![]);
    let other = wire::parse_callback_list(&fixture("callback_list_name_spelling.json"))
        .expect("name spelling");
    assert_eq!(
        other,
        vec![registered(
            "DeviceUsage",
            "https://etl.example.com:9001/callbacks"
        )]
    );
}

#[test]
fn register_and_delete_answers_name_the_account_and_service() {
    for name in ["callback_register.json", "callback_delete.json"] {
        let ack = wire::parse_callback_ack(&fixture(name)).expect(name);
        assert_eq!(ack.account_name.as_deref(), Some(ACCOUNT), "{name}");
        assert_eq!(ack.service_name, "DeviceUsage", "{name}");
    }
}

#[test]
fn error_answers_are_classified_for_the_retry_policy() {
    let gateway = classify(StatusCode::UNAUTHORIZED, None, &fixture("gateway_401.json"));
    assert!(matches!(gateway, ApiError::Reauthenticated), "{gateway:?}");
    assert_eq!(
        stale_token(&gateway),
        Some(Stale::Bearer),
        "renew the bearer"
    );

    let wait = Some(Duration::from_secs(7));
    let throttled = classify(
        StatusCode::TOO_MANY_REQUESTS,
        wait,
        &fixture("gateway_429.json"),
    );
    assert!(
        matches!(throttled, ApiError::Throttled { .. }),
        "{throttled:?}"
    );
    assert!(throttled.is_transient());
    assert_eq!(throttled.retry_after(), wait);

    let expired = classify(
        StatusCode::BAD_REQUEST,
        None,
        &fixture("error_session_expired.json"),
    );
    assert_eq!(stale_token(&expired), Some(Stale::Session), "log in again");
    assert!(
        matches!(&expired, ApiError::Rejected { code, .. } if code == "REQUEST_FAILED.SessionToken.Expired"),
        "{expired:?}"
    );

    let rejected = classify(StatusCode::BAD_REQUEST, None, &fixture("error_m2m.json"));
    let ApiError::Rejected {
        status,
        ref code,
        ref message,
    } = rejected
    else {
        panic!("not a refusal: {rejected:?}");
    };
    assert_eq!(
        (status, code.as_str(), message.as_str()),
        (
            400,
            "REQUEST_FAILED.UnexpectedError",
            "Could not complete the request because of an unexpected error."
        )
    );
    assert!(!rejected.is_transient() && stale_token(&rejected).is_none());

    let short = classify(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        &fixture("error_short_form.json"),
    );
    assert!(
        matches!(&short, ApiError::Server { status: 503, code: Some(c), .. } if c == "503"),
        "{short:?}"
    );
    assert!(short.is_transient());
}

#[test]
fn callback_examples_go_through_the_payload_parser() {
    let text = fixture_text("callback_usage.json");
    let usage = parse_callback(&text).expect("usage");
    assert_eq!(
        (usage.request_id.as_ref(), usage.callback_count),
        (REQUEST_ID, Some(1))
    );
    let CallbackKind::Usage(records) = &usage.kind else {
        panic!("not usage: {:?}", usage.kind);
    };
    let parsed: Vec<_> = records.parsed(false).collect();
    assert_eq!(parsed.len(), 1);
    let record = parsed[0].as_ref().expect("a good record");
    assert_eq!(record.iccid.as_str(), "89148000000800139708");
    assert_eq!(
        (
            record.data_usage_bytes,
            record.sms_usage,
            record.mo_sms,
            record.mt_sms
        ),
        (3072, 0, 0, 0)
    );
    assert_eq!(
        (record.usage_start, record.usage_end),
        (DAY0, DAY0 + DAY_US)
    );
    assert!(
        record.luhn_warning,
        "the vendor's example ICCID fails the Luhn check"
    );

    let text = fixture_text("callback_completion.json");
    let done = parse_callback(&text).expect("completion");
    assert_eq!(done.request_id, REQUEST_ID);
    assert!(
        matches!(done.kind, CallbackKind::Completion),
        "{:?}",
        done.kind
    );

    let text = fixture_text("callback_fault.json");
    let fault = parse_callback(&text).expect("fault");
    assert_eq!(fault.request_id, REQUEST_ID);
    let CallbackKind::Fault { code, message } = fault.kind else {
        panic!("not a fault: {:?}", fault.kind);
    };
    assert_eq!(code.as_deref(), Some("REQUEST_FAILED.UnexpectedError"));
    assert_eq!(
        message.as_deref(),
        Some("Could not complete the request because of an unexpected error.")
    );
    // The echoed credentials ("null" when none were registered) are what the journal never keeps.
    let stripped = strip_credentials(&text).expect("object");
    assert!(!stripped.contains("username") && !stripped.contains("password"));
}

// --- The simulator answers in the same shapes ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_answers_token_login_and_usage_in_the_documented_shapes() {
    let sim = start(config()).await;
    let api = Api::new(&sim);
    let (status, token) = api.token_raw().await;
    assert_eq!(status, 200);
    assert_same_shape(&token, "oauth_token.json");
    let bearer = json_of(&token)["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let (status, login) = api.login_raw(&bearer).await;
    assert_eq!(status, 200);
    assert_same_shape(&login, "session_login.json");
    let session = json_of(&login)["sessionToken"]
        .as_str()
        .expect("session")
        .to_owned();
    let (status, accepted, _) = api.promo(&bearer, &session).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&accepted));
    assert_same_shape(&accepted, "usage_accepted.json");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_answers_callback_registration_in_the_documented_shapes() {
    let sim = start(config()).await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;

    let (status, none) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!((status, none.len()), (200, 0), "an empty body, not []");

    let with_credentials = json!({"name": "DeviceUsage", "url": "http://127.0.0.1:9/cb",
                                  "username": "cb-user", "password": "cb-secret"});
    let (status, ack) = api.register(&bearer, &session, &with_credentials).await;
    assert_eq!(status, 200);
    assert_same_shape(&ack, "callback_register.json");
    let bare = json!({"name": "CarrierService", "url": "http://127.0.0.1:9/carrier"});
    assert_eq!(api.register(&bearer, &session, &bare).await.0, 200);

    let (status, list) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!(status, 200);
    assert_same_shape(&list, "callback_list.json");
    let entries = json_of(&list);
    let bare_entry = entries
        .as_array()
        .and_then(|a| a.iter().find(|e| e["serviceName"] == "CarrierService"))
        .expect("the bare registration");
    assert_eq!(
        (&bare_entry["username"], &bare_entry["password"]),
        (&json!(""), &json!(""))
    );
    // What the client makes of it.
    let mut read = wire::parse_callback_list(&list).expect("the client reads the list");
    read.sort_by(|a, b| a.service_name.cmp(&b.service_name));
    assert_eq!(
        read,
        vec![
            registered("CarrierService", "http://127.0.0.1:9/carrier"),
            registered("DeviceUsage", "http://127.0.0.1:9/cb"),
        ]
    );

    for service in ["DeviceUsage", "CarrierService"] {
        let (status, deleted) = api.delete(&bearer, &session, service).await;
        assert_eq!(status, 200);
        assert_same_shape(&deleted, "callback_delete.json");
        assert_eq!(json_of(&deleted)["serviceName"], service);
    }
    let (status, none) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!((status, none.len()), (200, 0));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_errors_have_the_documented_shapes_and_classes() {
    let sim = start(SimConfig {
        accounts: vec![ACCOUNT.to_owned()],
        rate_limit_per_sec: 1,
        error_5xx_fraction: 1.0,
        retry_after_secs: 3,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;

    let (status, unknown) = api.list(&bearer, &session, "0000999999-00001").await;
    assert_eq!(status, 400);
    assert_same_shape(&unknown, "error_m2m.json");
    assert!(matches!(
        classify(StatusCode::BAD_REQUEST, None, &unknown),
        ApiError::Rejected { ref code, .. } if code == "REQUEST_FAILED.AccountNotFound"
    ));

    let (status, wrong_bearer) = api.list("not-a-token", &session, ACCOUNT).await;
    assert_eq!(status, 401);
    assert_same_shape(&wrong_bearer, "gateway_401.json");
    let class = classify(StatusCode::UNAUTHORIZED, None, &wrong_bearer);
    assert_eq!(stale_token(&class), Some(Stale::Bearer));

    let (status, expired) = api.list(&bearer, "not-a-session", ACCOUNT).await;
    assert_eq!(status, 400);
    assert_same_shape(&expired, "error_session_expired.json");
    let class = classify(StatusCode::BAD_REQUEST, None, &expired);
    assert_eq!(stale_token(&class), Some(Stale::Session));

    // The throttle admits the first request, which then gets the injected 503; the next is throttled.
    let (status, unavailable, _) = api.promo(&bearer, &session).await;
    assert_eq!(status, 503);
    assert_same_shape(&unavailable, "error_short_form.json");
    let class = classify(StatusCode::SERVICE_UNAVAILABLE, None, &unavailable);
    assert!(
        matches!(class, ApiError::Server { status: 503, .. }),
        "{class:?}"
    );
    let (status, throttled, retry_after) = api.promo(&bearer, &session).await;
    assert_eq!(status, 429);
    assert_same_shape(&throttled, "gateway_429.json");
    assert_eq!(retry_after.as_deref(), Some("3"));
    assert!(matches!(
        classify(StatusCode::TOO_MANY_REQUESTS, None, &throttled),
        ApiError::Throttled { .. }
    ));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_callbacks_have_the_documented_shapes() {
    let sim = start(config()).await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    let receiver = Receiver::start().await;
    let body = json!({"name": "DeviceUsage", "url": receiver.url()});
    assert_eq!(api.register(&bearer, &session, &body).await.0, 200);
    let (status, _, _) = api.promo(&bearer, &session).await;
    assert_eq!(status, 200);
    let bodies = receiver.wait_for(2).await;
    let (done, data): (Vec<&Value>, Vec<&Value>) =
        bodies.iter().partition(|b| b.get("comment").is_some());
    assert_eq!((data.len(), done.len()), (1, 1), "{bodies:?}");
    assert_eq!(shape(data[0]), shape(&fixture_json("callback_usage.json")));
    assert_eq!(
        shape(done[0]),
        shape(&fixture_json("callback_completion.json"))
    );
    sim.shutdown().await;
}

// --- The commands, with and without a registered callback ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_list_and_run_work_with_none_registered_and_after_registration() {
    let sim = start(config()).await;
    let ws = Workspace::new();
    let list: Vec<String> = (0..4).map(iccid).collect();
    std::fs::write(
        ws.path("iccids.csv"),
        format!("iccid\n{}\n", list.join("\n")),
    )
    .expect("iccids");
    let port = free_port();
    let public_url = format!("http://127.0.0.1:{port}/callbacks");
    let env: Vec<(&str, String)> = vec![
        ("TSUSAGE_API__BASE_URL", sim.base_url()),
        ("TSUSAGE_API__APP_KEY", "key".into()),
        ("TSUSAGE_API__APP_SECRET", "secret".into()),
        ("TSUSAGE_API__USERNAME", "user".into()),
        ("TSUSAGE_API__PASSWORD", "password".into()),
        (
            "TSUSAGE_INPUT__PATHS",
            format!("[\"{}\"]", ws.path("iccids.csv").display()),
        ),
        ("TSUSAGE_CALLBACKS__SOURCE", "listener".into()),
        (
            "TSUSAGE_CALLBACKS__LISTEN_ADDR",
            format!("127.0.0.1:{port}"),
        ),
        ("TSUSAGE_CALLBACKS__PUBLIC_URL", public_url.clone()),
        ("TSUSAGE_CALLBACKS__USERNAME", "cb-user".into()),
        ("TSUSAGE_CALLBACKS__PASSWORD", "cb-secret-sentinel".into()),
        ("TSUSAGE_CALLBACKS__SETTLE_SECS", "1".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The simulator runs on this runtime's other worker while the binary runs.
    let tsusage = |args: &[&str]| tokio::task::block_in_place(|| ws.run_env(args, &env));

    // None registered: the vendor answers an empty body.
    let listed = tsusage(&["callbacks", "list"]);
    listed.expect_code(0);
    assert_eq!(listed.stdout().trim(), "", "{}", listed.stderr());

    let first = tsusage(&["run", "--date", "2021-08-15"]);
    first.expect_code(0);
    assert!(
        first.stderr().contains("registering the callback URL"),
        "{}",
        first.stderr()
    );

    // Registered: the list answers `serviceName`, and the echoed password is never printed.
    let listed = tsusage(&["callbacks", "list"]);
    listed.expect_code(0);
    assert_eq!(listed.stdout().trim(), format!("DeviceUsage\t{public_url}"));
    assert!(!listed.stdout().contains("cb-secret-sentinel"));
    assert!(!listed.stderr().contains("cb-secret-sentinel"));

    let second = tsusage(&["run", "--date", "2021-08-16"]);
    second.expect_code(0);
    assert!(
        !second.stderr().contains("registering the callback URL"),
        "the registration was found: {}",
        second.stderr()
    );
    assert!(
        !second.stderr().contains("another URL"),
        "{}",
        second.stderr()
    );
    let day = |d: i64| DateTime::from_timestamp_micros(DAY0 + d * DAY_US).expect("day");
    let expected: usize = (0..2)
        .map(|d| {
            list.iter()
                .filter(|c| usage_for(c, day(d), day(d + 1)).is_some())
                .count()
        })
        .sum();
    assert_eq!(ws.rows().len(), expected, "both days written");

    // `--simulate`: a fresh in-process simulator, nothing registered yet.
    let simulated = tsusage(&["run", "--simulate", "--date", "2021-08-17"]);
    simulated.expect_code(0);
    assert!(
        simulated.stderr().contains("registering the callback URL"),
        "{}",
        simulated.stderr()
    );
    sim.shutdown().await;
}

// --- Helpers -------------------------------------------------------------------------------------

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/vendor")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).expect("utf-8")
}

/// A fixture as JSON, read as the client reads answers (the usage page's trailing comma included).
fn fixture_json(name: &str) -> Value {
    wire::parse_answer(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json_of(body: &[u8]) -> Value {
    wire::parse_answer(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn registered(service: &str, url: &str) -> RegisteredCallback {
    RegisteredCallback {
        account_name: Some(ACCOUNT.to_owned()),
        service_name: service.to_owned(),
        url: url.to_owned(),
    }
}

/// A JSON value's shape: the keys of objects (recursively), the JSON type of every value, and for
/// arrays the set of their elements' shapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Null,
    Bool,
    Number,
    String,
    Array(BTreeSet<Shape>),
    Object(BTreeMap<String, Shape>),
}

fn shape(value: &Value) -> Shape {
    match value {
        Value::Null => Shape::Null,
        Value::Bool(_) => Shape::Bool,
        Value::Number(_) => Shape::Number,
        Value::String(_) => Shape::String,
        Value::Array(items) => Shape::Array(items.iter().map(shape).collect()),
        Value::Object(map) => {
            Shape::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
    }
}

/// Asserts that `body` (an answer of the simulator) has the shape of the fixture `name`.
fn assert_same_shape(body: &[u8], name: &str) {
    assert_eq!(
        shape(&json_of(body)),
        shape(&fixture_json(name)),
        "the simulator's answer {} against data/vendor/{name}",
        String::from_utf8_lossy(body)
    );
}

fn config() -> SimConfig {
    SimConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        ..SimConfig::default()
    }
}

async fn start(config: SimConfig) -> SimHandle {
    sim::start(config).await.expect("simulator starts")
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("time")
        .with_timezone(&Utc)
}

/// A raw HTTP client of the simulator: bodies come back as bytes, untouched.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(sim: &SimHandle) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        Api {
            http,
            base: sim.base_url(),
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> (u16, Vec<u8>, Option<String>) {
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.expect("body").to_vec();
        (status, body, retry_after)
    }

    async fn token_raw(&self) -> (u16, Vec<u8>) {
        let request = self
            .http
            .post(format!("{}/ts/v1/oauth2/token", self.base))
            .basic_auth("key", Some("secret"))
            .form(&[("grant_type", "client_credentials")]);
        let (status, body, _) = Api::send(request).await;
        (status, body)
    }

    async fn login_raw(&self, bearer: &str) -> (u16, Vec<u8>) {
        let request = self
            .http
            .post(format!("{}/m2m/v1/session/login", self.base))
            .bearer_auth(bearer)
            .json(&json!({"username": "user", "password": "pw"}));
        let (status, body, _) = Api::send(request).await;
        (status, body)
    }

    /// A bearer token and a session.
    async fn session(&self) -> (String, String) {
        let (_, token) = self.token_raw().await;
        let bearer = json_of(&token)["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let (_, login) = self.login_raw(&bearer).await;
        let session = json_of(&login)["sessionToken"]
            .as_str()
            .expect("session")
            .to_owned();
        (bearer, session)
    }

    fn m2m(
        &self,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        session: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/m2m/v1{path}", self.base))
            .bearer_auth(bearer)
            .header("VZ-M2M-Token", session)
    }

    async fn register(&self, bearer: &str, session: &str, body: &Value) -> (u16, Vec<u8>) {
        let request = self
            .m2m(
                reqwest::Method::POST,
                &format!("/callbacks/{ACCOUNT}"),
                bearer,
                session,
            )
            .json(body);
        let (status, body, _) = Api::send(request).await;
        (status, body)
    }

    async fn list(&self, bearer: &str, session: &str, account: &str) -> (u16, Vec<u8>) {
        let request = self.m2m(
            reqwest::Method::GET,
            &format!("/callbacks/{account}"),
            bearer,
            session,
        );
        let (status, body, _) = Api::send(request).await;
        (status, body)
    }

    async fn delete(&self, bearer: &str, session: &str, service: &str) -> (u16, Vec<u8>) {
        let path = format!("/callbacks/{ACCOUNT}/name/{service}");
        let (status, body, _) =
            Api::send(self.m2m(reqwest::Method::DELETE, &path, bearer, session)).await;
        (status, body)
    }

    /// One usage request for an ICCID that has usage on 2021-08-15: status, body, `Retry-After`.
    async fn promo(&self, bearer: &str, session: &str) -> (u16, Vec<u8>, Option<String>) {
        let device = (0..100)
            .map(iccid)
            .find(|c| usage_for(c, at(START), at(END)).is_some())
            .expect("an ICCID with usage");
        let body = json!({"accountName": ACCOUNT, "deviceIds": [{"kind": "iccid", "id": device}],
                          "startTime": START, "endTime": END});
        let path = "/devices/usage/actions/promoaggregateusage";
        Api::send(
            self.m2m(reqwest::Method::POST, path, bearer, session)
                .json(&body),
        )
        .await
    }
}

/// A callback receiver on 127.0.0.1:0 that acknowledges and keeps every body.
struct Receiver {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/cb", axum::routing::post(receive))
            .with_state(bodies.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, bodies }
    }

    fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    /// Waits (up to 5 s) for `n` bodies.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let bodies = self.bodies.lock().expect("lock").clone();
            if bodies.len() >= n || Instant::now() > deadline {
                assert_eq!(bodies.len(), n, "{bodies:?}");
                return bodies;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn receive(
    State(bodies): State<Arc<Mutex<Vec<Value>>>>,
    body: axum::body::Bytes,
) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).expect("callbacks are JSON");
    bodies.lock().expect("lock").push(value);
    StatusCode::OK
}
