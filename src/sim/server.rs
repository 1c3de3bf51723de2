//! The HTTP side: the router, the shared state and its checks (bearer, session, account), and the
//! OAuth, session and callback registration handlers (the promo endpoint is in `promo.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::auth::{Auth, Login};
use super::callbacks::{Job, Registration, Registry};
use super::faults::{RateLimiter, Rng};
use super::reply::{
    ACCOUNT_LOCKED, ACCOUNT_NOT_FOUND, ApiError, BAD_REQUEST, CALLBACK_NOT_REGISTERED,
    LOGIN_FAILED, SESSION_EXPIRED, json_problem, not_found,
};
use super::stats::{Counters, bump};
use super::{SimConfig, lock, promo};

/// The session token header.
pub const SESSION_HEADER: &str = "VZ-M2M-Token";

/// Everything the handlers and the dispatcher share.
#[derive(Debug)]
pub struct Shared {
    pub config: SimConfig,
    pub started: Instant,
    pub counters: Counters,
    pub auth: Mutex<Auth>,
    /// Identifiers (tokens, sessions, requestIds): seeded from the clock, unique per run.
    pub ids: Mutex<Rng>,
    /// Fault decisions on the API side: seeded from `sim.seed`.
    pub faults: Mutex<Rng>,
    pub throttle: Mutex<RateLimiter>,
    pub registry: Registry,
    pub jobs: mpsc::Sender<Job>,
    /// Sequence number of the next accepted request: seeds that request's callback faults.
    pub next_seq: AtomicU64,
}

impl Shared {
    pub fn new(config: SimConfig, jobs: mpsc::Sender<Job>) -> Shared {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Shared {
            auth: Mutex::new(Auth::new(
                Duration::from_secs(config.token_ttl_secs),
                Duration::from_secs(config.session_idle_ttl_secs),
            )),
            ids: Mutex::new(Rng::new(clock ^ config.seed.rotate_left(32))),
            faults: Mutex::new(Rng::new(config.seed)),
            throttle: Mutex::new(RateLimiter::new(config.rate_limit_per_sec)),
            started: Instant::now(),
            counters: Counters::default(),
            registry: Registry::default(),
            jobs,
            next_seq: AtomicU64::new(0),
            config,
        }
    }

    /// The gateway's check: a bearer token issued here and unexpired.
    pub fn check_bearer(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = header_str(headers, header::AUTHORIZATION.as_str())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token {
            Some(t) if lock(&self.auth).bearer_valid(t, Instant::now()) => Ok(()),
            _ => {
                bump(&self.counters.bearer_rejected);
                Err(ApiError::InvalidCredentials)
            }
        }
    }

    /// A live M2M session in `VZ-M2M-Token`; using it restarts its idle timer.
    pub fn check_session(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let live = header_str(headers, SESSION_HEADER)
            .is_some_and(|t| lock(&self.auth).use_session(t, Instant::now()));
        if live {
            Ok(())
        } else {
            bump(&self.counters.session_rejected);
            Err(ApiError::vendor(SESSION_EXPIRED, "Session token expired"))
        }
    }

    /// `REQUEST_FAILED.AccountNotFound` unless `account` is known (any is, when `sim.accounts` is empty).
    pub fn check_account(&self, account: &str) -> Result<(), ApiError> {
        let known = &self.config.accounts;
        if known.is_empty() || known.iter().any(|a| a == account) {
            Ok(())
        } else {
            Err(ApiError::vendor(ACCOUNT_NOT_FOUND, "Account not found"))
        }
    }
}

/// The simulator's routes, all under `/api`.
pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/ts/v1/oauth2/token", post(oauth_token))
        .route("/api/m2m/v1/session/login", post(login))
        .route("/api/m2m/v1/session/logout", post(logout))
        .route(
            "/api/m2m/v1/callbacks/{account}",
            post(register_callback).get(list_callbacks),
        )
        .route(
            "/api/m2m/v1/callbacks/{account}/name/{service}",
            delete(delete_callback),
        )
        .route(
            "/api/m2m/v1/devices/usage/actions/promoaggregateusage",
            post(promo::promo_aggregate_usage),
        )
        .fallback(not_found)
        .with_state(shared)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `value` is acceptable for a credential configured as `expected`: equal to it, or when none is
/// configured, anything non-empty.
fn credential_ok(expected: Option<&String>, value: &str) -> bool {
    match expected {
        Some(expected) => expected == value,
        None => !value.is_empty(),
    }
}

async fn oauth_token(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let client = header_str(&headers, header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    let app_key = client.as_deref().and_then(|pair| {
        let (key, secret) = pair.split_once(':')?;
        let ok = credential_ok(sim.config.app_key.as_ref(), key)
            && credential_ok(sim.config.app_secret.as_ref(), secret);
        ok.then(|| key.to_owned())
    });
    let Some(app_key) = app_key else {
        bump(&sim.counters.oauth_rejected);
        return Err(ApiError::OAuth {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: "Client authentication failed",
        });
    };
    let grant_type = form.ok().and_then(|Form(f)| f.get("grant_type").cloned());
    if grant_type.as_deref() != Some("client_credentials") {
        bump(&sim.counters.oauth_rejected);
        return Err(ApiError::OAuth {
            status: StatusCode::BAD_REQUEST,
            error: "unsupported_grant_type",
            description: "grant_type must be client_credentials",
        });
    }
    let grant = {
        let mut ids = lock(&sim.ids);
        lock(&sim.auth).grant(&app_key, Instant::now(), &mut ids)
    };
    if grant.new {
        bump(&sim.counters.oauth_tokens_issued);
        tracing::debug!(expires_in = grant.expires_in, "sim: OAuth token issued");
    }
    Ok(Json(json!({
        "access_token": grant.access_token,
        "token_type": "Bearer",
        "expires_in": grant.expires_in,
        "scope": "default",
    })))
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

async fn login(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    sim.check_bearer(&headers)?;
    let body: LoginBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::vendor(BAD_REQUEST, format!("login body: {}", json_problem(&e))))?;
    let ok = credential_ok(sim.config.username.as_ref(), &body.username)
        && credential_ok(sim.config.password.as_ref(), &body.password);
    let outcome = {
        let mut ids = lock(&sim.ids);
        lock(&sim.auth).login(ok, Instant::now(), &mut ids)
    };
    match outcome {
        Login::Ok(session) => {
            bump(&sim.counters.logins_ok);
            tracing::debug!("sim: login ok");
            Ok(Json(json!({ "sessionToken": session })))
        }
        Login::Wrong => {
            bump(&sim.counters.logins_failed);
            tracing::info!("sim: login failed: wrong username or password");
            Err(ApiError::vendor(
                LOGIN_FAILED,
                "Invalid username or password",
            ))
        }
        Login::Locked => {
            bump(&sim.counters.logins_failed);
            let newly = !sim
                .counters
                .account_locked
                .swap(true, std::sync::atomic::Ordering::SeqCst);
            if newly {
                tracing::warn!("sim: account locked after consecutive failed logins");
            }
            Err(ApiError::vendor(
                ACCOUNT_LOCKED,
                "Account is locked; contact support to unlock it",
            ))
        }
    }
}

async fn logout(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    sim.check_bearer(&headers)?;
    let token = header_str(&headers, SESSION_HEADER).unwrap_or_default();
    if !lock(&sim.auth).logout(token, Instant::now()) {
        bump(&sim.counters.session_rejected);
        return Err(ApiError::vendor(SESSION_EXPIRED, "Session token expired"));
    }
    bump(&sim.counters.logouts);
    Ok(Json(json!({ "sessionToken": token })))
}

#[derive(Deserialize)]
struct RegisterBody {
    name: String,
    url: String,
    username: Option<String>,
    password: Option<String>,
}

async fn register_callback(
    State(sim): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    sim.check_bearer(&headers)?;
    sim.check_session(&headers)?;
    sim.check_account(&account)?;
    let body: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::vendor(BAD_REQUEST, format!("callback body: {}", json_problem(&e)))
    })?;
    if body.name.trim().is_empty() {
        return Err(ApiError::vendor(BAD_REQUEST, "name must not be empty"));
    }
    if !(body.url.starts_with("http://") || body.url.starts_with("https://")) {
        return Err(ApiError::vendor(
            BAD_REQUEST,
            "url must be an http:// or https:// URL",
        ));
    }
    tracing::debug!(service = %body.name, "sim: callback registered");
    let registration = Registration {
        url: body.url,
        username: body.username,
        password: body.password,
    };
    sim.registry.set(&account, &body.name, registration);
    Ok(Json(
        json!({ "accountName": account, "serviceName": body.name }),
    ))
}

/// As the vendor's page has it: the registrations with their credentials (`""` when none was set),
/// and an empty body, not `[]`, when there is none.
async fn list_callbacks(
    State(sim): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    sim.check_bearer(&headers)?;
    sim.check_session(&headers)?;
    sim.check_account(&account)?;
    let list: Vec<serde_json::Value> = sim
        .registry
        .list(&account)
        .into_iter()
        .map(|(service, r)| {
            json!({
                "accountName": account,
                "serviceName": service,
                "url": r.url,
                "username": r.username.unwrap_or_default(),
                "password": r.password.unwrap_or_default(),
            })
        })
        .collect();
    if list.is_empty() {
        return Ok(StatusCode::OK.into_response());
    }
    Ok(Json(serde_json::Value::Array(list)).into_response())
}

async fn delete_callback(
    State(sim): State<Arc<Shared>>,
    Path((account, service)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    sim.check_bearer(&headers)?;
    sim.check_session(&headers)?;
    sim.check_account(&account)?;
    if !sim.registry.remove(&account, &service) {
        return Err(ApiError::vendor(
            CALLBACK_NOT_REGISTERED,
            format!("No callback registered for service {service}"),
        ));
    }
    Ok(Json(
        json!({ "accountName": account, "serviceName": service }),
    ))
}
