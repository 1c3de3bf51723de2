//! `ApiClient`: the vendor's HTTP API with its two expiring tokens, shared by every submitting task.
//!
//! The OAuth bearer (one hour) and the M2M session (20 minutes idle) are fetched once and shared.
//! When a call finds one stale (HTTP 401 from the gateway, or `...SessionToken.Expired`), the first
//! task to notice re-authenticates while the others wait on the same lock, and every task then
//! re-sends with the new tokens: one re-login per expiry, however many tasks saw it. A rejected login
//! is never retried in a loop: at most [`MAX_FAILED_LOGINS`] failed logins per run (the vendor locks the
//! account after five), then a clear error.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::wire;
use crate::config::{ApiConfig, Secret};
use crate::plan::Job;

/// Failed login attempts allowed in one run (the vendor locks the account after 5 in a row).
pub const MAX_FAILED_LOGINS: u32 = 2;
/// Pause before the one retry of a login that failed for a transient reason (5xx, timeout).
const LOGIN_RETRY_DELAY: Duration = Duration::from_secs(2);

/// What went wrong talking to the vendor, classified for the retry policy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("missing credential: set {0} in the environment")]
    MissingCredential(&'static str),
    #[error(
        "OAuth token rejected (HTTP {status}): check TSUSAGE_API__APP_KEY and TSUSAGE_API__APP_SECRET"
    )]
    OAuthRejected { status: u16 },
    #[error(
        "login rejected: check TSUSAGE_API__USERNAME/PASSWORD; the vendor locks the account after 5 failures ({detail})"
    )]
    LoginRejected { detail: String },
    #[error("login failed {attempts} times, giving up so as not to lock the account: {detail}")]
    LoginFailed { attempts: u32, detail: String },
    /// The tokens used were stale and have been renewed: send the request again.
    #[error("credentials renewed; the request must be sent again")]
    Reauthenticated,
    #[error("throttled (HTTP 429)")]
    Throttled { retry_after: Option<Duration> },
    #[error("vendor error HTTP {status}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Server {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Transport(String),
    #[error("rejected (HTTP {status}) {code}: {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the vendor: {0}")]
    Protocol(String),
}

impl ApiError {
    /// Worth another try later: throttling, server errors, timeouts, connection failures.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Throttled { .. } | ApiError::Server { .. } | ApiError::Transport(_)
        )
    }

    /// Stops the whole run: credentials are wrong or missing.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ApiError::MissingCredential(_)
                | ApiError::OAuthRejected { .. }
                | ApiError::LoginRejected { .. }
                | ApiError::LoginFailed { .. }
        )
    }

    /// The server's `Retry-After`, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Throttled { retry_after } | ApiError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// Counters for the run report.
#[derive(Debug, Default)]
pub struct AuthCounters {
    pub oauth_tokens: AtomicU64,
    pub logins: AtomicU64,
    pub failed_logins: AtomicU32,
    pub reauthentications: AtomicU64,
}

/// The tokens a call was made with; `generation` tells whether they were renewed since.
#[derive(Debug, Clone)]
struct Tokens {
    bearer: Arc<str>,
    session: Arc<str>,
    generation: u64,
}

#[derive(Default)]
struct Auth {
    bearer: Option<(Arc<str>, Option<Instant>)>,
    session: Option<Arc<str>>,
    generation: u64,
}

/// Which token a failed call found stale: what to renew before sending again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The gateway refused the OAuth bearer (HTTP 401, fault 900901): fetch a new one.
    Bearer,
    /// The M2M session ended (`...SessionToken.Expired`): log in again.
    Session,
}

/// The token `error` says is stale, if any.
pub fn stale_token(error: &ApiError) -> Option<Stale> {
    match error {
        ApiError::Reauthenticated => Some(Stale::Bearer),
        ApiError::Rejected { code, .. } if code.ends_with(wire::SESSION_EXPIRED_SUFFIX) => {
            Some(Stale::Session)
        }
        _ => None,
    }
}

/// The vendor API client.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    app_key: Option<Secret>,
    app_secret: Option<Secret>,
    username: Option<Secret>,
    password: Option<Secret>,
    auth: Mutex<Auth>,
    pub counters: AuthCounters,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .field("credentials", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub fn new(config: &ApiConfig) -> Result<ApiClient, ApiError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .connect_timeout(Duration::from_secs(config.timeout_secs.min(10)))
            .user_agent(concat!("tsusage/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(ApiClient {
            http,
            base: config.base_url.trim_end_matches('/').to_owned(),
            app_key: config.app_key.clone(),
            app_secret: config.app_secret.clone(),
            username: config.username.clone(),
            password: config.password.clone(),
            auth: Mutex::new(Auth::default()),
            counters: AuthCounters::default(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Logs in (OAuth token, then M2M session) unless already logged in.
    pub async fn authenticate(&self) -> Result<(), ApiError> {
        self.tokens().await.map(drop)
    }

    async fn tokens(&self) -> Result<Tokens, ApiError> {
        let mut auth = self.auth.lock().await;
        let expired = matches!(auth.bearer, Some((_, Some(until))) if Instant::now() >= until);
        if auth.bearer.is_none() || expired {
            self.fetch_bearer(&mut auth).await?;
        }
        if auth.session.is_none() {
            self.login(&mut auth).await?;
        }
        match (&auth.bearer, &auth.session) {
            (Some((bearer, _)), Some(session)) => Ok(Tokens {
                bearer: bearer.clone(),
                session: session.clone(),
                generation: auth.generation,
            }),
            _ => Err(ApiError::Protocol("no tokens after login".into())),
        }
    }

    /// Renews what `used` found stale, unless another task already did.
    async fn reauthenticate(&self, used: &Tokens, stale: Stale) -> Result<(), ApiError> {
        let mut auth = self.auth.lock().await;
        if auth.generation != used.generation {
            return Ok(());
        }
        self.counters
            .reauthentications
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(token = ?stale, "token stale: renewing");
        match stale {
            Stale::Bearer => self.fetch_bearer(&mut auth).await?,
            Stale::Session => self.login(&mut auth).await?,
        }
        Ok(())
    }

    async fn fetch_bearer(&self, auth: &mut Auth) -> Result<(), ApiError> {
        let key = self
            .app_key
            .as_ref()
            .ok_or(ApiError::MissingCredential("TSUSAGE_API__APP_KEY"))?;
        let secret = self
            .app_secret
            .as_ref()
            .ok_or(ApiError::MissingCredential("TSUSAGE_API__APP_SECRET"))?;
        let response = self
            .http
            .post(self.url(wire::OAUTH_TOKEN_PATH))
            .basic_auth(key.expose(), Some(secret.expose()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if status.is_client_error() {
            return Err(ApiError::OAuthRejected {
                status: status.as_u16(),
            });
        }
        let bytes = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(classify(status, None, &bytes));
        }
        let token: wire::OAuthToken = wire::parse_answer(&bytes)
            .map_err(|e| ApiError::Protocol(format!("OAuth token response: {e}")))?;
        let until = token
            .expires_in
            .map(|s| Instant::now() + Duration::from_secs(s));
        auth.bearer = Some((Arc::from(token.access_token), until));
        auth.generation += 1;
        self.counters.oauth_tokens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn login(&self, auth: &mut Auth) -> Result<(), ApiError> {
        let username = self
            .username
            .as_ref()
            .ok_or(ApiError::MissingCredential("TSUSAGE_API__USERNAME"))?;
        let password = self
            .password
            .as_ref()
            .ok_or(ApiError::MissingCredential("TSUSAGE_API__PASSWORD"))?;
        let body = wire::LoginRequest {
            username: username.expose(),
            password: password.expose(),
        };
        let mut bearer_renewed = false;
        loop {
            let failed = self.counters.failed_logins.load(Ordering::Relaxed);
            if failed >= MAX_FAILED_LOGINS {
                return Err(ApiError::LoginFailed {
                    attempts: failed,
                    detail: "no more attempts in this run".into(),
                });
            }
            let Some((bearer, _)) = auth.bearer.clone() else {
                self.fetch_bearer(auth).await?;
                continue;
            };
            let result = self
                .http
                .post(self.url(wire::LOGIN_PATH))
                .bearer_auth(&bearer)
                .json(&body)
                .send()
                .await;
            let outcome = match result {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(response.headers());
                    let bytes = response.bytes().await.map_err(transport)?;
                    if status.is_success() {
                        let session: wire::Session = wire::parse_answer(&bytes)
                            .map_err(|e| ApiError::Protocol(format!("login response: {e}")))?;
                        auth.session = Some(Arc::from(session.session_token));
                        auth.generation += 1;
                        self.counters.logins.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    classify(status, retry_after, &bytes)
                }
                Err(e) => transport(e),
            };
            match outcome {
                // The bearer died, not the password: renew it once and log in again.
                ApiError::Reauthenticated if !bearer_renewed => {
                    bearer_renewed = true;
                    self.fetch_bearer(auth).await?;
                }
                e if e.is_transient() => {
                    let attempts = self.counters.failed_logins.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(attempts, error = %e, "login failed");
                    if attempts >= MAX_FAILED_LOGINS {
                        return Err(ApiError::LoginFailed {
                            attempts,
                            detail: e.to_string(),
                        });
                    }
                    tokio::time::sleep(e.retry_after().unwrap_or(LOGIN_RETRY_DELAY)).await;
                }
                e => {
                    self.counters.failed_logins.fetch_add(1, Ordering::Relaxed);
                    return Err(ApiError::LoginRejected {
                        detail: e.to_string(),
                    });
                }
            }
        }
    }

    /// Sends one authenticated call. A stale token is renewed (once for all tasks) and reported as
    /// [`ApiError::Reauthenticated`], so the caller sends again through its rate limiter.
    async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<bytes::Bytes, ApiError> {
        let tokens = self.tokens().await?;
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&tokens.bearer)
            .header(wire::SESSION_HEADER, tokens.session.as_ref());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            return Ok(bytes);
        }
        let error = classify(status, retry_after, &bytes);
        match stale_token(&error) {
            Some(stale) => {
                self.reauthenticate(&tokens, stale).await?;
                Err(ApiError::Reauthenticated)
            }
            None => Err(error),
        }
    }

    /// Asks for a job's usage; the answer is only a requestId, the usage comes by callback.
    pub async fn request_usage(&self, job: &Job) -> Result<String, ApiError> {
        let body = wire::UsageRequest {
            account_name: &job.account_name,
            device_ids: job
                .iccids
                .iter()
                .map(|i| wire::DeviceId {
                    kind: wire::KIND_ICCID,
                    id: i.as_str(),
                })
                .collect(),
            start_time: job.window.start_time(),
            end_time: job.window.end_time(),
        };
        let bytes = self
            .call(Method::POST, wire::USAGE_PATH, Some(&body))
            .await?;
        let accepted = wire::parse_request_accepted(&bytes)
            .map_err(|e| ApiError::Protocol(format!("usage request response: {e}")))?;
        if accepted.request_id.trim().is_empty() {
            return Err(ApiError::Protocol("empty requestId".into()));
        }
        Ok(accepted.request_id)
    }

    /// Registers `url` as the callback for `service` on `account` (replacing any other).
    pub async fn register_callback(
        &self,
        account: &str,
        service: &str,
        url: &str,
        username: Option<&Secret>,
        password: Option<&Secret>,
    ) -> Result<(), ApiError> {
        let body = wire::RegisterCallback {
            name: service,
            url,
            username: username.map(Secret::expose),
            password: password.map(Secret::expose),
        };
        let path = format!("{}/{}", wire::CALLBACKS_PATH, path_segment(account));
        let answer = self
            .call_retrying_auth(Method::POST, &path, Some(&body))
            .await?;
        check_ack(&answer, service, "registered");
        Ok(())
    }

    /// The callbacks registered for `account` (none: the vendor answers an empty body).
    pub async fn list_callbacks(
        &self,
        account: &str,
    ) -> Result<Vec<wire::RegisteredCallback>, ApiError> {
        let path = format!("{}/{}", wire::CALLBACKS_PATH, path_segment(account));
        let bytes = self
            .call_retrying_auth::<()>(Method::GET, &path, None)
            .await?;
        wire::parse_callback_list(&bytes)
            .map_err(|e| ApiError::Protocol(format!("callback list: {e}")))
    }

    /// Deletes the callback of `service` on `account`.
    pub async fn delete_callback(&self, account: &str, service: &str) -> Result<(), ApiError> {
        let path = format!(
            "{}/{}/name/{}",
            wire::CALLBACKS_PATH,
            path_segment(account),
            path_segment(service)
        );
        let answer = self
            .call_retrying_auth::<()>(Method::DELETE, &path, None)
            .await?;
        check_ack(&answer, service, "deleted");
        Ok(())
    }

    /// A one-off call (not rate limited): re-sent after a renewal, at most twice.
    async fn call_retrying_auth<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<bytes::Bytes, ApiError> {
        let mut renewals = 0;
        loop {
            match self.call(method.clone(), path, body).await {
                Err(ApiError::Reauthenticated) if renewals < 2 => renewals += 1,
                other => return other,
            }
        }
    }

    /// Ends the M2M session (best effort, at the end of a run).
    pub async fn logout(&self) {
        let auth = self.auth.lock().await;
        if let (Some((bearer, _)), Some(session)) = (&auth.bearer, &auth.session) {
            let sent = self
                .http
                .post(self.url(wire::LOGOUT_PATH))
                .bearer_auth(bearer)
                .header(wire::SESSION_HEADER, session.as_ref())
                .send()
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "logout failed");
            }
        }
    }
}

/// Reads a register or delete answer. The call succeeded whatever it says (2xx); an answer naming
/// another service than the one asked for is worth a warning, one that cannot be read a debug line.
fn check_ack(answer: &[u8], service: &str, action: &str) {
    match wire::parse_callback_ack(answer) {
        Ok(ack) if ack.service_name == service => {
            tracing::debug!(service, action, "callback change acknowledged");
        }
        Ok(ack) => tracing::warn!(
            asked = service,
            acknowledged = ack.service_name,
            action,
            "the vendor acknowledged another callback service than the one asked for"
        ),
        Err(e) => tracing::debug!(action, error = %e, "callback answer not understood"),
    }
}

fn transport(e: reqwest::Error) -> ApiError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "HTTP error"
    };
    // Without the URL: it is ours, and reqwest's message is enough to act on.
    ApiError::Transport(format!("{kind}: {}", e.without_url()))
}

/// Classifies an error answer for the retry policy. A 401 with the gateway's fault body means the
/// bearer is stale ([`ApiError::Reauthenticated`]); see [`stale_token`] for what to renew.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> ApiError {
    let m2m: Option<wire::M2mError> = wire::parse_answer(body).ok();
    let code = m2m.as_ref().map(|e| match &e.error_code {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    if status == StatusCode::UNAUTHORIZED && wire::parse_answer::<wire::GatewayFault>(body).is_ok()
    {
        return ApiError::Reauthenticated;
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ApiError::Throttled { retry_after };
    }
    if status.is_server_error() {
        return ApiError::Server {
            status: status.as_u16(),
            code,
            retry_after,
        };
    }
    ApiError::Rejected {
        status: status.as_u16(),
        code: code.unwrap_or_else(|| status.as_u16().to_string()),
        message: m2m
            .and_then(|e| e.error_message)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_owned()),
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    let wait = when.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// Percent-encodes a path segment (account names are digits and dashes, but be safe).
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_vendor_errors_by_code_not_message() {
        let expired =
            br#"{"errorCode":"REQUEST_FAILED.SessionToken.Expired","errorMessage":"whatever"}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, expired),
            ApiError::Rejected { ref code, .. } if code == "REQUEST_FAILED.SessionToken.Expired"
        ));
        let gateway = br#"{"fault":{"code":900901,"message":"Invalid Credentials"}}"#;
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, None, gateway),
            ApiError::Reauthenticated
        ));
        let short = br#"{"errorCode":400,"errorMessage":"Bad request"}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, short),
            ApiError::Rejected { ref code, status: 400, .. } if code == "400"
        ));
        let throttled = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(3)),
            b"",
        );
        assert!(throttled.is_transient());
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, None, b"<html>").is_transient());
        assert!(!classify(StatusCode::NOT_FOUND, None, b"").is_transient());
    }

    #[test]
    fn stale_token_names_what_to_renew() {
        // The vendor's error table writes the gateway code as a string, the gateway as a number.
        let gateway = br#"{"fault":{"code":"900901","message":"Invalid Credentials"}}"#;
        let bearer = classify(StatusCode::UNAUTHORIZED, None, gateway);
        assert_eq!(stale_token(&bearer), Some(Stale::Bearer));
        let expired = br#"{"errorCode":"REQUEST_FAILED.SessionToken.Expired","errorMessage":"x"}"#;
        let session = classify(StatusCode::BAD_REQUEST, None, expired);
        assert_eq!(stale_token(&session), Some(Stale::Session));
        let refused = br#"{"errorCode":"REQUEST_FAILED.AccountNotFound","errorMessage":"x"}"#;
        assert_eq!(
            stale_token(&classify(StatusCode::BAD_REQUEST, None, refused)),
            None
        );
        assert_eq!(
            stale_token(&classify(StatusCode::UNAUTHORIZED, None, b"")),
            None
        );
    }

    #[test]
    fn reads_retry_after_as_seconds_or_http_date() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        let date = later.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert(reqwest::header::RETRY_AFTER, date.parse().expect("header"));
        let wait = retry_after(&headers).expect("date");
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "soon".parse().expect("header"),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
