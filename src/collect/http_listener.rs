//! The HTTP callback listener: ThingSpace POSTs callbacks here; each is journaled durably before 2xx.
//!
//! - `POST {path of callbacks.public_url}` with a JSON body; anything else is 404/405, a non-JSON
//!   content type 415, a body over `callbacks.max_body_bytes` 413.
//! - The body's `username`/`password` (the values given at registration) are compared in constant
//!   time with `TSUSAGE_CALLBACKS__USERNAME/PASSWORD`: a mismatch is 401 and nothing is journaled.
//! - 200 only once the callback is committed (group commit through [`StateWriter`]); a failed
//!   commit is 503 with `Retry-After`, so the vendor sends it again.
//! - HTTPS with `callbacks.tls_cert_file`/`tls_key_file` (rustls): production callbacks must be HTTPS.
//! - Connections from addresses outside `callbacks.allow_from` (when set) are closed at once.
//! - Connections are capped (`callbacks.max_connections`), headers must arrive within
//!   `callbacks.header_timeout_secs`, a request must finish within `callbacks.request_timeout_secs`.
//! - Shutdown is graceful: the accept loop stops and in-flight requests finish.
//! - `GET /healthz`: 200 when the store answers through the journal writer (so the writer thread is
//!   alive too), 503 otherwise: the readiness probe of a replica behind a load balancer.
//! - `GET /metrics`: Prometheus metrics ([`super::listener_metrics`]). Neither of the two needs the
//!   callback credentials, and neither shows anything a caller sent.
//! - Bodies and credentials are never logged.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::allow_list::AllowList;
use super::listener_metrics::{self, Acknowledged, ListenerMetrics, Rejected};
use super::{Intake, now_micros};
use crate::config::{CallbacksConfig, Secret};
use crate::normalize::payload::Body;
use crate::output::WriteError;
use crate::output::rejects::{RecordReject, RecordRejects};
use crate::state::Journaled;

/// What the handlers share.
pub struct ListenerState {
    username: Secret,
    password: Secret,
    writer: Arc<super::Writer>,
    pub intake: Mutex<Intake>,
    /// Record-level and body-level rejects, written as they come (memory stays flat).
    rejects: Mutex<Option<RecordRejects>>,
    pub counts: Mutex<ListenerCounts>,
    /// What `GET /metrics` shows.
    pub metrics: ListenerMetrics,
}

/// How long `GET /healthz` waits for the store's answer before it says 503.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Paths the listener serves itself; `callbacks.public_url` cannot use them.
pub const RESERVED_PATHS: [&str; 2] = ["/healthz", "/metrics"];

/// What the listener answered, for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListenerCounts {
    /// Callbacks answered 200 (journaled, or already in the journal).
    pub acknowledged: u64,
    pub journaled: u64,
    pub already_journaled: u64,
    /// Wrong or missing credentials (401).
    pub unauthorized: u64,
    /// Not JSON, not a callback (400).
    pub malformed: u64,
    /// The journal could not commit (503).
    pub journal_failures: u64,
}

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(
        "the callback listener needs TSUSAGE_CALLBACKS__USERNAME and TSUSAGE_CALLBACKS__PASSWORD (the credentials registered with ThingSpace, echoed in every callback)"
    )]
    NoCredentials,
    #[error("callbacks.public_url {0:?} has no path to listen on")]
    BadUrl(String),
    #[error(
        "callbacks.public_url {0:?}: its path is the listener's own (/healthz and /metrics are reserved)"
    )]
    ReservedPath(String),
    #[error("callbacks.allow_from: {0}")]
    AllowList(String),
    #[error("callbacks TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The path part of `callbacks.public_url` (`https://host:9001/callbacks` → `/callbacks`).
pub fn listen_path(public_url: &str) -> Result<String, ListenerError> {
    let rest = public_url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| ListenerError::BadUrl(public_url.to_owned()))?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let path = path.split(['?', '#']).next().unwrap_or("/");
    Ok(if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    })
}

/// The router, without a socket (tests call it directly too).
pub fn app(
    path: &str,
    state: Arc<ListenerState>,
    max_body_bytes: usize,
    request_timeout: Duration,
) -> Router {
    let tracked = state.clone();
    let callbacks = post(receive)
        .layer(axum::middleware::from_fn(
            move |req, next: axum::middleware::Next| async move {
                match tokio::time::timeout(request_timeout, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => (StatusCode::REQUEST_TIMEOUT, "request timed out\n").into_response(),
                }
            },
        ))
        // Outermost: in flight until the answer (or the cut), and the refusals made before the
        // handler runs (body limit) or around it (timeout).
        .layer(axum::middleware::from_fn(
            move |req, next: axum::middleware::Next| {
                let state = tracked.clone();
                async move {
                    let _in_flight = state.metrics.in_flight();
                    let response = next.run(req).await;
                    match response.status() {
                        StatusCode::PAYLOAD_TOO_LARGE => {
                            state.metrics.rejected(Rejected::too_large)
                        }
                        StatusCode::REQUEST_TIMEOUT => state.metrics.rejected(Rejected::timed_out),
                        _ => {}
                    }
                    response
                }
            },
        ));
    Router::new()
        .route(path, callbacks)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

impl std::fmt::Debug for ListenerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerState")
            .field("credentials", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl ListenerState {
    /// Appends rejects to the rejects file. A failure to write them is logged, not fatal: the
    /// callbacks themselves are in the journal, and their rejects can be derived again from it.
    fn write_rejects(&self, rejects: &[RecordReject]) {
        if rejects.is_empty() {
            return;
        }
        let mut file = self.rejects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = file.as_mut() {
            for reject in rejects {
                if let Err(e) = file.push(reject) {
                    tracing::error!(error = %e, "cannot write the rejects file");
                    return;
                }
            }
        }
    }

    /// Closes the rejects file; its path if anything was rejected.
    pub fn finish_rejects(&self) -> Result<Option<std::path::PathBuf>, WriteError> {
        match self
            .rejects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(file) => file.finish(),
            None => Ok(None),
        }
    }
}

/// A running listener.
#[derive(Debug)]
pub struct ListenerHandle {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ListenerHandle {
    /// Stops accepting, lets in-flight requests finish (at most `grace`), and returns.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!("listener shutdown timed out; in-flight requests were cut");
        }
    }
}

impl ListenerState {
    pub fn new(
        config: &CallbacksConfig,
        writer: Arc<super::Writer>,
        intake: Intake,
        rejects: RecordRejects,
    ) -> Result<Self, ListenerError> {
        let (Some(username), Some(password)) = (config.username.clone(), config.password.clone())
        else {
            return Err(ListenerError::NoCredentials);
        };
        Ok(ListenerState {
            username,
            password,
            writer,
            intake: Mutex::new(intake),
            rejects: Mutex::new(Some(rejects)),
            counts: Mutex::new(ListenerCounts::default()),
            metrics: ListenerMetrics::new(),
        })
    }
}

/// Binds `callbacks.listen_addr` and serves until [`ListenerHandle::shutdown`].
pub async fn start(
    config: &CallbacksConfig,
    state: Arc<ListenerState>,
) -> Result<ListenerHandle, ListenerError> {
    let path = listen_path(&config.public_url)?;
    if RESERVED_PATHS.contains(&path.as_str()) {
        return Err(ListenerError::ReservedPath(config.public_url.clone()));
    }
    let addr = config.listen_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenerError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ListenerError::Bind { addr, source })?;
    let router = app(
        &path,
        state,
        usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
        Duration::from_secs(config.request_timeout_secs),
    );
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1) as usize));
    let allow = AllowList::parse(&config.allow_from).map_err(ListenerError::AllowList)?;
    let header_timeout = Duration::from_secs(config.header_timeout_secs);
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let (shutdown, mut stop) = watch::channel(false);
    tracing::info!(%addr, path, tls = tls.is_some(), "callback listener up");
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            let permit = tokio::select! {
                _ = stop.changed() => break,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !allow.allows(peer.ip()) {
                tracing::warn!(peer = %peer.ip(), "connection refused: not in callbacks.allow_from");
                drop(stream);
                continue;
            }
            let service = TowerToHyperService::new(router.clone());
            let watcher = graceful.watcher();
            let tls = tls.clone();
            tokio::spawn(async move {
                let served = match tls {
                    None => serve(stream, service, header_timeout, watcher).await,
                    Some(acceptor) => {
                        // The handshake gets the header timeout too: a silent client is cut off.
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => serve(stream, service, header_timeout, watcher).await,
                            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                            Err(_) => Err("TLS handshake timed out".to_owned()),
                        }
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(listener);
        graceful.shutdown().await;
    });
    Ok(ListenerHandle {
        addr,
        shutdown,
        task,
    })
}

/// One HTTP/1.1 connection over `io`, watched for graceful shutdown.
async fn serve<I>(
    io: I,
    service: TowerToHyperService<Router>,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    watcher.watch(conn).await.map_err(|e| e.to_string())
}

/// The TLS side from PEM files (rustls, ring).
fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, ListenerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    crate::tls::install_crypto_provider();
    let bad = |file: &Path, e: &dyn std::fmt::Display| {
        ListenerError::Tls(format!("{}: {e}", file.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(cert, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Equal in constant time (compares SHA-256 digests, so length and content leak nothing).
fn same_secret(given: &str, expected: &Secret) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.expose().as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn answer(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"status\":\"{message}\"}}\n"),
    )
        .into_response()
}

/// `GET /healthz`: 200 once the store answered through the writer thread, 503 otherwise.
async fn healthz(State(state): State<Arc<ListenerState>>) -> Response {
    match tokio::time::timeout(HEALTH_TIMEOUT, state.writer.ping()).await {
        Ok(Ok(())) => answer(StatusCode::OK, "ok"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: the store does not answer");
            answer(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
        Err(_) => {
            tracing::warn!(timeout = ?HEALTH_TIMEOUT, "health check: the store did not answer in time");
            answer(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
    }
}

/// `GET /metrics`: the Prometheus exposition.
async fn metrics(State(state): State<Arc<ListenerState>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, listener_metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        ),
    }
}

async fn receive(
    State(state): State<Arc<ListenerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    if !is_json {
        state.metrics.rejected(Rejected::unsupported_media_type);
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/json",
        );
    }
    let count =
        |f: fn(&mut ListenerCounts)| f(&mut state.counts.lock().unwrap_or_else(|e| e.into_inner()));
    let Ok(text) = std::str::from_utf8(&body) else {
        count(|c| c.malformed += 1);
        state.metrics.rejected(Rejected::malformed);
        return answer(StatusCode::BAD_REQUEST, "body is not UTF-8");
    };
    let parsed = Body::parse(text);
    let authorized = match &parsed {
        Ok(parsed) => {
            let user = parsed.string("username");
            let pass = parsed.string("password");
            // Both compared, always, so timing does not tell which one was wrong.
            let user_ok = same_secret(user.as_deref().unwrap_or(""), &state.username);
            let pass_ok = same_secret(pass.as_deref().unwrap_or(""), &state.password);
            user.is_some() && pass.is_some() && user_ok & pass_ok
        }
        Err(_) => false,
    };
    if !authorized {
        // A body that does not parse cannot carry the credentials either: 401 before 400, so an
        // unauthenticated client learns nothing about what we accept.
        count(|c| c.unauthorized += 1);
        state.metrics.rejected(Rejected::unauthorized);
        tracing::warn!("callback refused: wrong or missing credentials");
        return answer(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let prepared = {
        let mut rejects = Vec::new();
        // Parsed outside the shared intake's lock (callbacks are parsed on every core); only the
        // counts are added under it.
        let mut local = state
            .intake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .worker();
        let prepared = local.prepare_parsed(parsed, "listener".to_owned(), &mut rejects);
        state
            .intake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .absorb(local);
        let prepared = match prepared {
            Ok(p) => p,
            Err(reject) => {
                state.write_rejects(&[*reject]);
                count(|c| c.malformed += 1);
                state.metrics.rejected(Rejected::malformed);
                return answer(StatusCode::BAD_REQUEST, "not a callback");
            }
        };
        state.write_rejects(&rejects);
        prepared
    };
    let mut prepared = prepared;
    let heard = prepared.take_heard();
    let handed = std::time::Instant::now();
    let journaled = state.writer.journal(prepared, now_micros()).await;
    state.metrics.journal_committed(handed.elapsed());
    match journaled {
        Ok(outcome) => {
            count(|c| c.acknowledged += 1);
            match outcome {
                Journaled::New(_) => {
                    count(|c| c.journaled += 1);
                    state.metrics.acknowledged(Acknowledged::journaled);
                    let mut intake = state.intake.lock().unwrap_or_else(|e| e.into_inner());
                    intake.journaled(heard);
                    state.metrics.tracker_news_pending(intake.pending_news());
                }
                Journaled::AlreadyJournaled => {
                    count(|c| c.already_journaled += 1);
                    state.metrics.acknowledged(Acknowledged::already_journaled);
                }
            }
            answer(StatusCode::OK, "journaled")
        }
        Err(e) => {
            count(|c| c.journal_failures += 1);
            state.metrics.rejected(Rejected::journal_unavailable);
            tracing::error!(error = %e, "journal commit failed: answering 503");
            let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, "journal unavailable");
            response.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("30"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_the_path_of_the_public_url() {
        assert_eq!(
            listen_path("https://etl.example.com:9001/callbacks")
                .ok()
                .as_deref(),
            Some("/callbacks")
        );
        assert_eq!(
            listen_path("http://h/a/b?x=1").ok().as_deref(),
            Some("/a/b")
        );
        assert_eq!(listen_path("http://h:9001").ok().as_deref(), Some("/"));
        assert!(listen_path("no-scheme").is_err());
    }

    /// The router called without a socket: the answers and the journal, over a real SQLite file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_router_journals_good_callbacks_once_and_refuses_the_rest() {
        use axum::body::Body as HttpBody;
        use axum::http::Request;
        use tower::ServiceExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::config::Config::from_toml_str(
            "account_name = \"0000123456-00001\"\n[output]\ndir = \"out\"\n[state]\npath = \"s.db\"\n\
             [callbacks]\npublic_url = \"http://127.0.0.1:1/cb\"\n",
            Path::new("test.toml"),
            [
                ("TSUSAGE_CALLBACKS__USERNAME".to_owned(), "cb-user".to_owned()),
                ("TSUSAGE_CALLBACKS__PASSWORD".to_owned(), "cb-secret".to_owned()),
            ],
        )
        .expect("config");
        let store = crate::state::SqliteStore::open(&dir.path().join("s.db")).expect("store");
        let writer = Arc::new(super::super::Writer::spawn(Box::new(store), "s.db".into()));
        let state = Arc::new(
            ListenerState::new(
                &config.callbacks,
                writer.clone(),
                Intake::new(false, config.output.partition_by),
                RecordRejects::new(dir.path().join("rejects.jsonl")),
            )
            .expect("state"),
        );
        let router = app("/cb", state.clone(), 1 << 20, Duration::from_secs(5));
        let vendor = include_str!("../../data/vendor/callback_usage.json");
        let ours = vendor
            .replacen("\"username\":\"null\"", "\"username\":\"cb-user\"", 1)
            .replacen("\"password\":\"null\"", "\"password\":\"cb-secret\"", 1);
        let post = |path: &str, content_type: &str, body: String| {
            Request::post(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(HttpBody::from(body))
                .expect("request")
        };
        let status = |request: Request<HttpBody>| {
            let router = router.clone();
            async move { router.oneshot(request).await.expect("answer").status() }
        };
        assert_eq!(
            status(post("/cb", "application/json", ours.clone())).await,
            StatusCode::OK
        );
        assert_eq!(
            status(post("/cb", "application/json", ours.clone())).await,
            StatusCode::OK
        );
        assert_eq!(
            status(post("/cb", "application/json", vendor.to_owned())).await,
            StatusCode::UNAUTHORIZED,
            "the vendor's example carries no credentials of ours"
        );
        assert_eq!(
            status(post("/cb", "text/plain", ours.clone())).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            status(post("/other", "application/json", ours)).await,
            StatusCode::NOT_FOUND
        );
        let counts = state.counts.lock().expect("counts").clone();
        assert_eq!(
            (
                counts.acknowledged,
                counts.journaled,
                counts.already_journaled
            ),
            (2, 1, 1),
            "{counts:?}"
        );
        drop(router);
        drop(state);
        let store = super::super::Writer::finish_shared(writer).expect("writer");
        assert_eq!(store.journal_len().expect("journal"), 1);
    }

    #[test]
    fn secrets_compare_by_value() {
        let s = Secret::new("p@ss");
        assert!(same_secret("p@ss", &s));
        assert!(!same_secret("p@ss ", &s));
        assert!(!same_secret("", &s));
    }
}
