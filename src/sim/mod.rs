//! The built-in ThingSpace simulator: the vendor's API over real HTTP on loopback, with fault injection.
//!
//! It plays the vendor's part for the README's first command, the tests and the benchmarks
//! (docs/architecture.md, "The built-in simulator").
//! It shares no protocol code with the client or the callback parser: it reads requests and builds
//! callbacks from the vendor's documented shapes (`data/vendor/`) on its own, so a misreading of the
//! vendor on one side cannot hide behind the same misreading on the other.
//!
//! # Layout
//!
//! - `config`: [`SimConfig`], made from the `[sim]` section: credentials, limits, faults.
//! - `server`: the router and shared state; OAuth, session and callback registration.
//! - `reply`: error answers in the vendor's and the gateway's shapes; the error codes.
//! - `promo`: the promoaggregateusage endpoint: faults, checks, validation.
//! - `auth`: token and session bookkeeping (TTLs, idle expiry, lockout).
//! - `callbacks`: the callback registry and message shapes; `dispatch`: their delivery.
//! - `usage`: [`usage_for`], the deterministic usage every callback reports.
//! - `faults`: the seeded generator, the throttle, malformed values; `stats`: [`SimStats`].
//!
//! # Endpoints (all under `http://ADDR/api`)
//!
//! | endpoint | answers |
//! | --- | --- |
//! | `POST /ts/v1/oauth2/token` | `{"access_token","token_type","expires_in","scope"}`; 401 `invalid_client`; 400 `unsupported_grant_type` |
//! | `POST /m2m/v1/session/login` | `{"sessionToken"}`; 400 `REQUEST_FAILED.UnexpectedError`, `REQUEST_FAILED.AccountLocked` |
//! | `POST /m2m/v1/session/logout` | `{"sessionToken"}` |
//! | `POST/GET /m2m/v1/callbacks/{account}` | register (body `{"name","url","username"?,"password"?}`) `{"accountName","serviceName"}` / list `[{"accountName","serviceName","url","username","password"}]` (`""` for credentials not set), an empty body when none is registered |
//! | `DELETE /m2m/v1/callbacks/{account}/name/{service}` | `{"accountName","serviceName"}`; 400 `INPUT_INVALID.Callback.NotRegistered` |
//! | `POST /m2m/v1/devices/usage/actions/promoaggregateusage` | `{"requestId"}`, then callbacks |
//!
//! Every `/m2m` call needs a valid bearer token (else 401, gateway fault 900901) and all but login a
//! live `VZ-M2M-Token` (else 400 `REQUEST_FAILED.SessionToken.Expired`). Error codes the vendor does
//! not document are the simulator's own: `INPUT_INVALID.BadRequest` (malformed JSON, missing or
//! mistyped field), `INPUT_INVALID.Date.Invalid` (unparsable times, start not before end),
//! `INPUT_INVALID.Date.RangeExceeded` (window over `max_window_days`), `INPUT_INVALID.NumberofDevices`
//! also for an empty device list, `INPUT_INVALID.Callback.NotRegistered`. Injected 5xx answers are 503
//! `{"errorCode":"503","errorMessage":"Service Unavailable"}`. Bodies are limited to 2 MB.

mod auth;
mod callbacks;
mod config;
mod dispatch;
mod faults;
mod promo;
mod reply;
mod server;
mod stats;
mod usage;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::*;
pub use faults::DIRTY_DATA_VALUES;
pub use stats::SimStats;
pub use usage::{SimUsage, usage_for};

use server::Shared;

/// Accepted requests waiting for the dispatcher; a full queue makes the promo endpoint wait.
const JOB_QUEUE: usize = 1024;
/// How long shutdown waits for in-flight HTTP requests before cutting them off.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the simulator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listen address cannot be bound (in use, not local, no permission).
    #[error("simulator: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A `[sim]` key has a value the simulator cannot use.
    #[error("config: {key}: {message}")]
    Config { key: String, message: String },
    /// The HTTP client that delivers callbacks cannot be built.
    #[error("simulator: cannot build the callback HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The Ctrl-C or SIGTERM handler cannot be installed.
    #[error("simulator: cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}

/// A running simulator. Dropping it without [`SimHandle::shutdown`] stops it too, without waiting.
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Tells the server to stop accepting connections.
    stop_server: watch::Sender<bool>,
    /// Tells the dispatcher to stop, once the server has.
    stop_dispatch: watch::Sender<bool>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds `config.listen_addr` (port 0 picks a free port), starts the server and the callback
/// dispatcher, and returns at once.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    config.validate()?;
    let addr = config.listen_addr;
    let bind_err = |source| SimError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    // reqwest is built without a default TLS provider; callbacks to https:// URLs need one.
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(config.callback_timeout_ms.max(1)))
        .build()
        .map_err(SimError::Client)?;
    let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
    let (stop_server, mut server_stop) = watch::channel(false);
    let (stop_dispatch, dispatch_stop) = watch::channel(false);
    let shared = Arc::new(Shared::new(config, jobs_tx));
    let dispatcher = tokio::spawn(dispatch::run(
        shared.clone(),
        jobs_rx,
        client,
        dispatch_stop,
    ));
    let app = server::app(shared.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped(&mut server_stop).await })
            .await
    });
    tracing::debug!(%addr, "sim: started");
    Ok(SimHandle {
        addr,
        shared,
        stop_server,
        stop_dispatch,
        server: Some(server),
        dispatcher: Some(dispatcher),
    })
}

impl SimHandle {
    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base URL, `http://ADDR/api`: OAuth under `/ts/v1`, everything else under `/m2m/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting connections, lets in-flight requests finish (up to 10 s), then stops the
    /// dispatcher (callbacks not yet delivered are abandoned).
    pub async fn shutdown(mut self) {
        let _ = self.stop_server.send(true);
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            match tokio::time::timeout(SHUTDOWN_TIMEOUT, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "sim: server stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "sim: server task failed"),
                Err(_) => {
                    tracing::warn!("sim: in-flight requests cut off at shutdown");
                    abort.abort();
                }
            }
        }
        let _ = self.stop_dispatch.send(true);
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.await;
        }
        tracing::debug!(addr = %self.addr, "sim: stopped");
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop_server.send(true);
        let _ = self.stop_dispatch.send(true);
    }
}

/// `tsusage sim`: starts the simulator, logs its base URL, and runs until Ctrl-C or SIGTERM, then
/// shuts down gracefully.
pub async fn serve(config: SimConfig) -> Result<(), SimError> {
    let sim = start(config).await?;
    tracing::info!(base_url = %sim.base_url(), "simulator listening");
    let signal = shutdown_signal().await;
    let stats = sim.stats();
    sim.shutdown().await;
    tracing::info!(
        promo_requests = stats.promo_requests,
        promo_accepted = stats.promo_accepted,
        callbacks_delivered = stats.callbacks_delivered,
        callbacks_undeliverable = stats.callbacks_undeliverable,
        "simulator stopped"
    );
    signal
}

/// Waits for Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() -> Result<(), SimError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(SimError::Signal)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(SimError::Signal),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(SimError::Signal)
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Locks a mutex, carrying on past poisoning: the simulator's state stays usable after a panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
