//! The built-in simulator over real HTTP on loopback: tokens and sessions, validation, faults, and the
//! callbacks it POSTs to a tiny receiver started by each test.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use tsusage::sim::{self, CallbackMode, SimConfig, SimHandle, usage_for};

use crate::util::{ACCOUNT, iccid};

const START: &str = "2021-08-15T00:00:00Z";
const END: &str = "2021-08-16T00:00:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_the_same_within_ttl_and_new_after_it() {
    let sim = start(SimConfig {
        token_ttl_secs: 1,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (first, expires_in) = api.token_with_ttl().await;
    assert_eq!(expires_in, 1);
    let (again, _) = api.token_with_ttl().await;
    assert_eq!(
        again, first,
        "asking again within the TTL gives the same token"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = api.login_raw(&first, "user", "pw").await;
    assert_eq!(status, 401, "the expired token is refused: {body}");
    assert_eq!(body["fault"]["code"], 900901);
    let (renewed, _) = api.token_with_ttl().await;
    assert_ne!(renewed, first);
    assert_eq!(sim.stats().oauth_tokens_issued, 2);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refuses_wrong_client_and_wrong_grant_type() {
    let sim = start(SimConfig {
        app_key: Some("key".into()),
        app_secret: Some("secret".into()),
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let url = format!("{}/ts/v1/oauth2/token", sim.base_url());
    let grant = [("grant_type", "client_credentials")];
    let wrong = api
        .http
        .post(&url)
        .basic_auth("key", Some("nope"))
        .form(&grant);
    let (status, body) = send(wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, _) = send(api.http.post(&url).form(&grant)).await;
    assert_eq!(status, 401, "no basic credentials");
    let other = [("grant_type", "password")];
    let (status, body) = send(
        api.http
            .post(&url)
            .basic_auth("key", Some("secret"))
            .form(&other),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    assert_eq!(api.token().await.len(), 32);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m2m_call_without_bearer_gets_the_gateway_fault() {
    let sim = start(config()).await;
    let api = Api::new(&sim);
    let url = format!("{}/m2m/v1/session/login", sim.base_url());
    let (status, body) = send(
        api.http
            .post(&url)
            .json(&json!({"username": "u", "password": "p"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"fault": {"code": 900901, "message": "Invalid Credentials",
            "description": "Invalid Credentials. Make sure you have given the correct access token"}})
    );
    let (status, _) = api
        .promo_raw("not-a-token", "s", &promo_body(&[iccid(1)]))
        .await;
    assert_eq!(status, 401);
    assert_eq!(sim.stats().promo_rejected_401, 1);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_expires_use_refreshes_it_and_logout_ends_it() {
    let sim = start(SimConfig {
        session_idle_ttl_secs: 1,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, _) = api.list(&bearer, &session, ACCOUNT).await;
        assert_eq!(status, 200, "each use restarts the idle timer");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!(status, 400);
    assert_eq!(body["errorCode"], "REQUEST_FAILED.SessionToken.Expired");

    let session = api.login(&bearer).await;
    let logout = format!("{}/m2m/v1/session/logout", sim.base_url());
    let req = api
        .http
        .post(&logout)
        .bearer_auth(&bearer)
        .header("VZ-M2M-Token", &session);
    let (status, body) = send(req).await;
    assert_eq!(
        (status, body["sessionToken"].as_str()),
        (200, Some(session.as_str()))
    );
    let (status, body) = api
        .promo_raw(&bearer, &session, &promo_body(&[iccid(1)]))
        .await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (400, Some("REQUEST_FAILED.SessionToken.Expired"))
    );
    let stats = sim.stats();
    assert_eq!((stats.logins_ok, stats.logouts), (2, 1));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_passwords_lock_the_account_for_good() {
    let sim = start(SimConfig {
        password: Some("right".into()),
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let bearer = api.token().await;
    for _ in 0..4 {
        let (status, body) = api.login_raw(&bearer, "user", "wrong").await;
        assert_eq!(
            (status, body["errorCode"].as_str()),
            (400, Some("REQUEST_FAILED.UnexpectedError"))
        );
    }
    assert!(!sim.stats().account_locked);
    let (status, body) = api.login_raw(&bearer, "user", "right").await;
    assert_eq!(status, 200, "success resets the count: {body}");
    for _ in 0..5 {
        api.login_raw(&bearer, "user", "wrong").await;
    }
    let (status, body) = api.login_raw(&bearer, "user", "right").await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (400, Some("REQUEST_FAILED.AccountLocked"))
    );
    let stats = sim.stats();
    assert!(stats.account_locked);
    assert_eq!((stats.logins_ok, stats.logins_failed), (1, 10));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promo_validations_return_their_error_codes() {
    let sim = start(SimConfig {
        accounts: vec![ACCOUNT.into()],
        max_devices: 3,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    let good = promo_body(&[iccid(1)]);
    let with = |key: &str, value: Value| {
        let mut body = good.clone();
        body[key] = value;
        body.to_string()
    };
    let device = |kind: &str, id: &str| json!([{"kind": kind, "id": id}]);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "INPUT_INVALID.BadRequest"),
        (
            json!({"accountName": ACCOUNT}).to_string(),
            "INPUT_INVALID.BadRequest",
        ),
        (
            with("accountName", json!("")),
            "INPUT_INVALID.Account.NotDefined",
        ),
        (
            with("accountName", json!("0000999999-00001")),
            "REQUEST_FAILED.AccountNotFound",
        ),
        (
            with("deviceIds", device("imei", &iccid(1))),
            "INPUT_INVALID.Device.Identifier.Invalid",
        ),
        (
            with("deviceIds", device("iccid", "8.91480E+19")),
            "INPUT_INVALID.Device.Identifier.Invalid",
        ),
        (
            with("deviceIds", device("iccid", "891480000000000001")),
            "INPUT_INVALID.Device.Identifier.Invalid",
        ),
        (
            with("deviceIds", json!([])),
            "INPUT_INVALID.NumberofDevices",
        ),
        (
            promo_body(&(0..4).map(iccid).collect::<Vec<_>>()).to_string(),
            "INPUT_INVALID.NumberofDevices",
        ),
        (with("startTime", json!(END)), "INPUT_INVALID.Date.Invalid"),
        (
            with("startTime", json!("15/08/2021")),
            "INPUT_INVALID.Date.Invalid",
        ),
        (
            with("endTime", json!("2021-09-16T00:00:00Z")),
            "INPUT_INVALID.Date.RangeExceeded",
        ),
    ];
    for (body, code) in &cases {
        let (status, answer) = api.promo_text(&bearer, &session, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(
            answer["errorCode"].as_str(),
            Some(*code),
            "{body}: {answer}"
        );
        assert!(answer["errorMessage"].is_string());
    }
    let (status, body) = api
        .promo_text(
            &bearer,
            &session,
            &with("deviceIds", device("ICCID", &iccid(1))),
        )
        .await;
    assert_eq!(status, 200, "kind is case-insensitive: {body}");
    let stats = sim.stats();
    assert_eq!(
        (stats.promo_rejected_400, stats.promo_accepted),
        (cases.len() as u64, 1)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_request_delivers_one_message_per_device_and_a_completion() {
    let sim = start(config()).await;
    let receiver = Receiver::start().await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.register(
        &bearer,
        &session,
        &receiver.url(),
        Some(("cb-user", "cb-pass")),
    )
    .await;
    let iccids: Vec<String> = (0..60).map(iccid).collect();
    let silent: Vec<&String> = iccids
        .iter()
        .filter(|c| usage_for(c, at(START), at(END)).is_none())
        .collect();
    assert!(!silent.is_empty(), "some ICCIDs report no usage");
    let request_id = api.promo(&bearer, &session, &promo_body(&iccids)).await;
    assert_uuid_v4(&request_id);

    let expected = iccids.len() - silent.len() + 1;
    let bodies = receiver.wait_for_all(expected).await;
    assert_eq!(bodies.len(), expected);
    let completions: Vec<&Value> = bodies
        .iter()
        .filter(|b| b.get("comment").is_some())
        .collect();
    assert_eq!(
        *completions[0],
        json!({"username": "cb-user", "password": "cb-pass", "requestId": request_id,
            "deviceResponse": {}, "comment": "Request Completed Processing",
            "callbackCount": 1, "maxCallbackThreshold": 4})
    );
    assert_eq!(
        bodies.last(),
        Some(completions[0]),
        "completion comes last without reorder"
    );
    let mut seen = BTreeMap::new();
    for body in bodies.iter().filter(|b| b.get("comment").is_none()) {
        assert_eq!(
            (body["username"].as_str(), body["password"].as_str()),
            (Some("cb-user"), Some("cb-pass"))
        );
        assert_eq!(body["requestId"], request_id.as_str());
        assert_eq!(
            (
                body["callbackCount"].as_u64(),
                body["maxCallbackThreshold"].as_u64()
            ),
            (Some(1), Some(4))
        );
        let records = body["deviceResponse"]["devicePromoUsageResponse"]
            .as_array()
            .expect("records");
        assert_eq!(records.len(), 1, "one device per message");
        let r = &records[0];
        let id = r["deviceIdentifierCollection"][0]["id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert_eq!(r["deviceIdentifierCollection"][0]["kind"], "ICCID");
        let usage =
            usage_for(&id, at(START), at(END)).expect("a record only for ICCIDs with usage");
        assert_eq!(r["dataUsage"], usage.data_bytes.to_string());
        assert_eq!(r["smsUsage"], usage.sms.to_string());
        assert_eq!(r["moSms"], usage.mo_sms.to_string());
        assert_eq!(r["mtSms"], usage.mt_sms.to_string());
        assert_eq!(r["startDate"], "2021-08-15T00:00:00.0000000");
        assert_eq!(r["endDate"], "2021-08-16T00:00:00.0000000");
        assert!(seen.insert(id, ()).is_none(), "one message per device");
    }
    assert!(
        silent.iter().all(|c| !seen.contains_key(*c)),
        "no record for ICCIDs without usage"
    );
    let stats = sim.stats();
    assert_eq!(
        (stats.callbacks_delivered, stats.callback_attempts),
        (expected as u64, expected as u64)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_packs_records_and_echoes_null_credentials() {
    let sim = start(SimConfig {
        callback_mode: CallbackMode::Batched,
        callback_batch_size: 10,
        ..config()
    })
    .await;
    let receiver = Receiver::start().await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.register(&bearer, &session, &receiver.url(), None).await;
    let iccids: Vec<String> = (0..45).map(iccid).collect();
    let with_usage = iccids
        .iter()
        .filter(|c| usage_for(c, at(START), at(END)).is_some())
        .count();
    api.promo(&bearer, &session, &promo_body(&iccids)).await;
    let expected = with_usage.div_ceil(10) + 1;
    let bodies = receiver.wait_for_all(expected).await;
    let sizes: Vec<usize> = bodies
        .iter()
        .filter_map(|b| {
            b["deviceResponse"]["devicePromoUsageResponse"]
                .as_array()
                .map(Vec::len)
        })
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), with_usage);
    assert!(sizes.iter().all(|&n| n <= 10), "{sizes:?}");
    assert!(
        bodies
            .iter()
            .all(|b| b["username"] == "null" && b["password"] == "null")
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_callbacks_are_redelivered_with_a_rising_count() {
    let sim = start(SimConfig {
        redelivery_interval_ms: 50,
        ..config()
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.fail_data(2);
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.register(&bearer, &session, &receiver.url(), None).await;
    let one = first_with_usage();
    api.promo(&bearer, &session, &promo_body(&[one])).await;
    // The data message is refused twice and accepted the third time; the completion once.
    let bodies = receiver.wait_for_all(4).await;
    let (completions, data): (Vec<&Value>, Vec<&Value>) =
        bodies.iter().partition(|b| b.get("comment").is_some());
    let counts: Vec<u64> = data
        .iter()
        .map(|b| b["callbackCount"].as_u64().expect("count"))
        .collect();
    assert_eq!(counts, [1, 2, 3]);
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0]["callbackCount"], 1);
    assert!(
        data.iter()
            .all(|b| b["deviceResponse"] == data[0]["deviceResponse"]),
        "the same message"
    );
    let stats = sim.stats();
    assert_eq!((stats.callback_attempts, stats.callbacks_delivered), (4, 2));
    assert_eq!(stats.callbacks_undeliverable, 0);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_gives_up_after_four_attempts_or_without_a_url() {
    let sim = start(SimConfig {
        redelivery_interval_ms: 20,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.promo(&bearer, &session, &promo_body(&[first_with_usage()]))
        .await;
    assert!(
        wait_until(|| sim.stats().callbacks_undeliverable == 2).await,
        "{:?}",
        sim.stats()
    );
    assert_eq!(
        sim.stats().callback_attempts,
        0,
        "nothing registered, nothing sent"
    );

    let receiver = Receiver::start().await;
    receiver.fail_data(usize::MAX);
    api.register(&bearer, &session, &receiver.url(), None).await;
    api.promo(&bearer, &session, &promo_body(&[first_with_usage()]))
        .await;
    assert!(
        wait_until(|| sim.stats().callbacks_undeliverable == 3).await,
        "{:?}",
        sim.stats()
    );
    let bodies = receiver.wait_for_all(5).await;
    let counts: Vec<u64> = bodies
        .iter()
        .filter(|b| b.get("comment").is_none())
        .map(|b| b["callbackCount"].as_u64().expect("count"))
        .collect();
    assert_eq!(counts, [1, 2, 3, 4], "four attempts, then no more");
    assert_eq!(sim.stats().callbacks_delivered, 1, "only the completion");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_fraction_one_delivers_nothing_and_duplicate_fraction_one_delivers_twice() {
    let dropping = start(SimConfig {
        drop_fraction: 1.0,
        ..config()
    })
    .await;
    let receiver = Receiver::start().await;
    let iccids: Vec<String> = (0..10).map(iccid).collect();
    let messages = iccids
        .iter()
        .filter(|c| usage_for(c, at(START), at(END)).is_some())
        .count()
        + 1;
    let api = Api::new(&dropping);
    let (bearer, session) = api.session().await;
    api.register(&bearer, &session, &receiver.url(), None).await;
    api.promo(&bearer, &session, &promo_body(&iccids)).await;
    assert!(wait_until(|| dropping.stats().callbacks_dropped == messages as u64).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.bodies().is_empty());
    dropping.shutdown().await;

    let duplicating = start(SimConfig {
        duplicate_fraction: 1.0,
        ..config()
    })
    .await;
    let api = Api::new(&duplicating);
    let (bearer, session) = api.session().await;
    api.register(&bearer, &session, &receiver.url(), None).await;
    api.promo(&bearer, &session, &promo_body(&iccids)).await;
    let bodies = receiver.wait_for_all(2 * messages).await;
    let mut by_text: BTreeMap<String, usize> = BTreeMap::new();
    for body in &bodies {
        *by_text.entry(body.to_string()).or_default() += 1;
    }
    assert_eq!(by_text.len(), messages);
    assert!(
        by_text.values().all(|&n| n == 2),
        "each message twice, identical"
    );
    assert_eq!(duplicating.stats().callbacks_duplicated, messages as u64);
    duplicating.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_fraction_one_spoils_every_data_usage_and_reorder_keeps_every_message() {
    let sim = start(SimConfig {
        dirty_fraction: 1.0,
        reorder: true,
        ..config()
    })
    .await;
    let receiver = Receiver::start().await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.register(&bearer, &session, &receiver.url(), None).await;
    let iccids: Vec<String> = (0..20).map(iccid).collect();
    let messages = iccids
        .iter()
        .filter(|c| usage_for(c, at(START), at(END)).is_some())
        .count()
        + 1;
    api.promo(&bearer, &session, &promo_body(&iccids)).await;
    let bodies = receiver.wait_for_all(messages).await;
    assert_eq!(
        bodies.iter().filter(|b| b.get("comment").is_some()).count(),
        1
    );
    for body in bodies.iter().filter(|b| b.get("comment").is_none()) {
        let value = body["deviceResponse"]["devicePromoUsageResponse"][0]["dataUsage"]
            .as_str()
            .expect("a string");
        assert!(sim::DIRTY_DATA_VALUES.contains(&value), "{value:?}");
    }
    assert_eq!(sim.stats().records_dirtied, messages as u64 - 1);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_rate_get_429_with_retry_after() {
    let sim = start(SimConfig {
        rate_limit_per_sec: 2,
        retry_after_secs: 3,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    let url = format!(
        "{}/m2m/v1/devices/usage/actions/promoaggregateusage",
        sim.base_url()
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let req = api
            .http
            .post(&url)
            .bearer_auth(&bearer)
            .header("VZ-M2M-Token", &session);
        let response = req
            .json(&promo_body(&[iccid(1)]))
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok());
            assert_eq!(retry_after, Some("3"));
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["fault"]["code"], 900800);
            assert_eq!(body["fault"]["message"], "Message throttled out");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    let stats = sim.stats();
    assert_eq!((stats.promo_accepted, stats.promo_rejected_429), (2, 3));
    assert_eq!(stats.promo_arrival_ms.len(), 5);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_5xx_fraction_one_answers_every_promo_request_503() {
    let sim = start(SimConfig {
        error_5xx_fraction: 1.0,
        ..config()
    })
    .await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    for _ in 0..5 {
        let (status, body) = api
            .promo_raw(&bearer, &session, &promo_body(&[iccid(1)]))
            .await;
        assert_eq!((status, body["errorCode"].as_str()), (503, Some("503")));
    }
    let stats = sim.stats();
    assert_eq!(
        (
            stats.promo_requests,
            stats.promo_rejected_5xx,
            stats.promo_accepted
        ),
        (5, 5, 0)
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_logins_requests_and_the_most_in_flight() {
    let sim = start(SimConfig {
        latency_ms: 300,
        ..config()
    })
    .await;
    let api = Arc::new(Api::new(&sim));
    let (bearer, session) = api.session().await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (api, bearer, session) = (api.clone(), bearer.clone(), session.clone());
            tokio::spawn(
                async move { api.promo(&bearer, &session, &promo_body(&[iccid(i)])).await },
            )
        })
        .collect();
    for task in tasks {
        task.await.expect("join");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "served concurrently"
    );
    let stats = sim.stats();
    assert_eq!((stats.logins_ok, stats.oauth_tokens_issued), (1, 1));
    assert_eq!((stats.promo_requests, stats.promo_accepted), (4, 4));
    assert_eq!(stats.promo_max_in_flight, 4);
    assert_eq!(stats.promo_devices_accepted, 4);
    assert!(stats.promo_arrival_ms.iter().all(|&ms| ms < 5000));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_list_answers_as_the_vendor_page_says_and_delete_needs_a_registration() {
    let sim = start(config()).await;
    let api = Api::new(&sim);
    let (bearer, session) = api.session().await;
    api.register(
        &bearer,
        &session,
        "http://127.0.0.1:9/old",
        Some(("u", "secret-pw")),
    )
    .await;
    api.register(
        &bearer,
        &session,
        "http://127.0.0.1:9/new",
        Some(("u", "secret-pw")),
    )
    .await;
    // The vendor's list echoes the registered credentials (tsusage never reads them).
    let (status, list) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!([{"accountName": ACCOUNT, "serviceName": "DeviceUsage",
                "url": "http://127.0.0.1:9/new", "username": "u", "password": "secret-pw"}])
    );
    api.register(&bearer, &session, "http://127.0.0.1:9/bare", None)
        .await;
    let (_, list) = api.list(&bearer, &session, ACCOUNT).await;
    assert_eq!(
        (&list[0]["username"], &list[0]["password"]),
        (&json!(""), &json!("")),
        "empty strings where no credentials were set"
    );

    let url = format!(
        "{}/m2m/v1/callbacks/{ACCOUNT}/name/DeviceUsage",
        sim.base_url()
    );
    let delete = || {
        api.http
            .delete(&url)
            .bearer_auth(&bearer)
            .header("VZ-M2M-Token", &session)
    };
    let (status, body) = send(delete()).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"accountName": ACCOUNT, "serviceName": "DeviceUsage"})
        )
    );
    let (status, body) = send(delete()).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (400, Some("INPUT_INVALID.Callback.NotRegistered"))
    );
    let none = api
        .http
        .get(format!("{}/m2m/v1/callbacks/{ACCOUNT}", sim.base_url()))
        .bearer_auth(&bearer)
        .header("VZ-M2M-Token", &session)
        .send()
        .await
        .expect("list");
    assert_eq!(none.status(), 200);
    assert_eq!(none.bytes().await.expect("body").len(), 0, "an empty body");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish_then_refuses_connections() {
    let sim = start(SimConfig {
        latency_ms: 300,
        ..config()
    })
    .await;
    let api = Arc::new(Api::new(&sim));
    let (bearer, session) = api.session().await;
    let base = sim.base_url();
    let in_flight = {
        let api = api.clone();
        tokio::spawn(async move {
            api.promo_raw(&bearer, &session, &promo_body(&[iccid(1)]))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    sim.shutdown().await;
    let (status, _) = in_flight.await.expect("join");
    assert_eq!(status, 200);
    let fresh = client();
    let after = fresh
        .post(format!("{base}/ts/v1/oauth2/token"))
        .send()
        .await;
    assert!(after.is_err(), "no longer listening");
}

#[tokio::test]
async fn start_reports_an_address_in_use() {
    let sim = start(config()).await;
    let err = sim::start(SimConfig {
        listen_addr: sim.addr(),
        ..config()
    })
    .await
    .expect_err("port taken");
    assert!(err.to_string().contains(&sim.addr().to_string()), "{err}");
    assert_eq!(sim.base_url(), format!("http://{}/api", sim.addr()));
    sim.shutdown().await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A window's usage is the sum of its parts: any split point, any run of days.
    #[test]
    fn usage_for_is_additive_over_days(device in 0u32..10_000, day in 0i64..3000, days in 1i64..40, cut in 0i64..86_400) {
        let id = iccid(device);
        let begin = at_secs(1_577_836_800 + day * 86_400);
        let end = begin + chrono::Duration::days(days);
        let middle = begin + chrono::Duration::seconds(cut) + chrono::Duration::days(days / 2);
        match usage_for(&id, begin, end) {
            None => {
                prop_assert!(usage_for(&id, begin, middle).is_none());
            }
            Some(whole) => {
                let a = usage_for(&id, begin, middle).expect("same ICCID");
                let b = usage_for(&id, middle, end).expect("same ICCID");
                prop_assert_eq!(whole.data_bytes, a.data_bytes + b.data_bytes);
                prop_assert_eq!(whole.mo_sms, a.mo_sms + b.mo_sms);
                prop_assert_eq!(whole.mt_sms, a.mt_sms + b.mt_sms);
                prop_assert_eq!(whole.sms, whole.mo_sms + whole.mt_sms);
                let by_day: u64 = (0..days)
                    .map(|d| {
                        let from = begin + chrono::Duration::days(d);
                        usage_for(&id, from, from + chrono::Duration::days(1)).expect("same ICCID").data_bytes
                    })
                    .sum();
                prop_assert_eq!(whole.data_bytes, by_day);
            }
        }
    }
}

// Helpers.

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

fn at_secs(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().expect("time")
}

fn first_with_usage() -> String {
    (0..100)
        .map(iccid)
        .find(|c| usage_for(c, at(START), at(END)).is_some())
        .expect("an ICCID with usage")
}

fn promo_body(iccids: &[String]) -> Value {
    let devices: Vec<Value> = iccids
        .iter()
        .map(|id| json!({"kind": "iccid", "id": id}))
        .collect();
    json!({"accountName": ACCOUNT, "deviceIds": devices, "startTime": START, "endTime": END})
}

fn assert_uuid_v4(id: &str) {
    let lens: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
    assert!(
        id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(id.as_bytes()[14], b'4', "{id}");
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

/// Sends `request`, returning the status and the JSON body (`null` when not JSON).
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `condition` every 10 ms for up to 3 s.
async fn wait_until(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

/// A client of the simulator's API, written from the vendor's documented shapes.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(sim: &SimHandle) -> Api {
        Api {
            http: client(),
            base: sim.base_url(),
        }
    }

    async fn token_with_ttl(&self) -> (String, u64) {
        let req = self
            .http
            .post(format!("{}/ts/v1/oauth2/token", self.base))
            .basic_auth("key", Some("secret"))
            .form(&[("grant_type", "client_credentials")]);
        let (status, body) = send(req).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        let token = body["access_token"].as_str().expect("token").to_owned();
        (token, body["expires_in"].as_u64().expect("expires_in"))
    }

    async fn token(&self) -> String {
        self.token_with_ttl().await.0
    }

    async fn login_raw(&self, bearer: &str, username: &str, password: &str) -> (u16, Value) {
        let req = self
            .http
            .post(format!("{}/m2m/v1/session/login", self.base))
            .bearer_auth(bearer)
            .json(&json!({"username": username, "password": password}));
        send(req).await
    }

    async fn login(&self, bearer: &str) -> String {
        let (status, body) = self.login_raw(bearer, "user", "pw").await;
        assert_eq!(status, 200, "{body}");
        body["sessionToken"].as_str().expect("session").to_owned()
    }

    /// A bearer token and a session.
    async fn session(&self) -> (String, String) {
        let bearer = self.token().await;
        let session = self.login(&bearer).await;
        (bearer, session)
    }

    async fn register(
        &self,
        bearer: &str,
        session: &str,
        url: &str,
        credentials: Option<(&str, &str)>,
    ) {
        let mut body = json!({"name": "DeviceUsage", "url": url});
        if let Some((username, password)) = credentials {
            body["username"] = json!(username);
            body["password"] = json!(password);
        }
        let req = self
            .http
            .post(format!("{}/m2m/v1/callbacks/{ACCOUNT}", self.base))
            .bearer_auth(bearer)
            .header("VZ-M2M-Token", session)
            .json(&body);
        let (status, answer) = send(req).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer,
            json!({"accountName": ACCOUNT, "serviceName": "DeviceUsage"})
        );
    }

    async fn list(&self, bearer: &str, session: &str, account: &str) -> (u16, Value) {
        let req = self
            .http
            .get(format!("{}/m2m/v1/callbacks/{account}", self.base))
            .bearer_auth(bearer)
            .header("VZ-M2M-Token", session);
        send(req).await
    }

    async fn promo_text(&self, bearer: &str, session: &str, body: &str) -> (u16, Value) {
        let req = self
            .http
            .post(format!(
                "{}/m2m/v1/devices/usage/actions/promoaggregateusage",
                self.base
            ))
            .bearer_auth(bearer)
            .header("VZ-M2M-Token", session)
            .header("Content-Type", "application/json")
            .body(body.to_owned());
        send(req).await
    }

    async fn promo_raw(&self, bearer: &str, session: &str, body: &Value) -> (u16, Value) {
        self.promo_text(bearer, session, &body.to_string()).await
    }

    /// Submits `body`, expecting acceptance; returns the requestId.
    async fn promo(&self, bearer: &str, session: &str, body: &Value) -> String {
        let (status, answer) = self.promo_raw(bearer, session, body).await;
        assert_eq!(status, 200, "{answer}");
        answer["requestId"].as_str().expect("requestId").to_owned()
    }
}

/// A callback receiver on 127.0.0.1:0 that records every body it is sent, acknowledged or not.
struct Receiver {
    addr: std::net::SocketAddr,
    state: Arc<ReceiverState>,
}

#[derive(Default)]
struct ReceiverState {
    bodies: Mutex<Vec<Value>>,
    /// Answer 500 to this many more data messages (completion messages are always acknowledged).
    fail_data: AtomicUsize,
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .route("/cb", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    fn fail_data(&self, n: usize) {
        self.state.fail_data.store(n, Ordering::SeqCst);
    }

    fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().expect("lock").clone()
    }

    /// Waits until `n` bodies were received (acknowledged or not), plus 100 ms for strays.
    async fn wait_for_all(&self, n: usize) -> Vec<Value> {
        assert!(
            wait_until(|| self.bodies().len() >= n).await,
            "{} of {n} bodies",
            self.bodies().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bodies = self.bodies();
        assert_eq!(bodies.len(), n, "no more than {n} bodies");
        bodies
    }
}

async fn receive(State(state): State<Arc<ReceiverState>>, body: axum::body::Bytes) -> StatusCode {
    let value: Value = serde_json::from_slice(&body).expect("callbacks are JSON");
    let completion = value.get("comment").is_some();
    state.bodies.lock().expect("lock").push(value);
    let failing = !completion
        && state
            .fail_data
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}
