//! The callback dispatcher: a task fed by the promo handler that POSTs each accepted request's messages
//! to the URL registered at delivery time, with redelivery, bounded concurrency and injected faults.
//!
//! Per request: wait `callback_delay_ms`; then, unless `reorder`, start every data message and start
//! the completion message once each data message has had its first attempt; with `reorder`, start all
//! of them in a shuffled order. A message the receiver does not acknowledge with 2xx (or that fails to
//! connect or times out) is sent again every `redelivery_interval_ms` with `callbackCount` + 1, at most
//! [`MAX_ATTEMPTS`] in all. At most `callback_max_in_flight` POSTs are in flight at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::callbacks::{Content, Job, MAX_ATTEMPTS, build_messages};
use super::faults::{Rng, splitmix64};
use super::server::Shared;
use super::stats::bump;
use super::stopped;

/// How long shutdown waits for delivery tasks to notice it before leaving them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What every delivery task needs.
#[derive(Debug, Clone)]
struct Ctx {
    shared: Arc<Shared>,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    warned_unregistered: Arc<AtomicBool>,
    warned_gave_up: Arc<AtomicBool>,
    /// Held by every task; when all are dropped, every task has ended.
    _alive: mpsc::Sender<()>,
    /// The request a task delivers for holds one of [`MAX_DELIVERING`] slots until its last task
    /// ends (`None` in the dispatcher's own context).
    _slot: Option<Arc<OwnedSemaphorePermit>>,
}

/// Requests whose callbacks are being delivered at once, at most. Past it the dispatcher takes no
/// more accepted requests, their queue fills and the promo handler waits: a receiver slower than
/// the requests holds the simulator's memory flat instead of a task per request.
const MAX_DELIVERING: usize = 4096;

/// Runs until `stop` turns true: takes accepted requests from `jobs` and delivers their callbacks.
pub async fn run(
    shared: Arc<Shared>,
    mut jobs: mpsc::Receiver<Job>,
    client: reqwest::Client,
    mut stop: watch::Receiver<bool>,
) {
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let permits = usize::try_from(shared.config.callback_max_in_flight)
        .unwrap_or(usize::MAX)
        .clamp(1, Semaphore::MAX_PERMITS);
    let ctx = Ctx {
        shared,
        client,
        permits: Arc::new(Semaphore::new(permits)),
        stop: stop.clone(),
        warned_unregistered: Arc::default(),
        warned_gave_up: Arc::default(),
        _alive: alive,
        _slot: None,
    };
    let delivering = Arc::new(Semaphore::new(MAX_DELIVERING));
    loop {
        let slot = tokio::select! {
            slot = delivering.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => {
                    let mut ctx = ctx.clone();
                    ctx._slot = Some(Arc::new(slot));
                    tokio::spawn(deliver_request(ctx, job));
                }
                None => break,
            },
            () = stopped(&mut stop) => break,
        }
    }
    drop(ctx);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_done.recv())
        .await
        .is_err()
    {
        tracing::warn!("sim: callback deliveries still running at shutdown");
    }
    tracing::debug!("sim: callback dispatcher stopped");
}

/// Delivers one request's messages.
async fn deliver_request(mut ctx: Ctx, job: Job) {
    let config = &ctx.shared.config;
    let mut rng = Rng::new(config.seed ^ splitmix64(job.seq));
    let mut messages = build_messages(config, &job, &mut rng, &ctx.shared.counters);
    let delay = Duration::from_millis(config.callback_delay_ms);
    if !delay.is_zero() {
        let mut stop = ctx.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
    }
    let job = Arc::new(job);
    if config.reorder {
        rng.shuffle(&mut messages);
        for content in messages {
            launch(&ctx, &job, content, &mut rng);
        }
        return;
    }
    let completion = messages.pop();
    let firsts: Vec<_> = messages
        .into_iter()
        .map(|content| launch(&ctx, &job, content, &mut rng))
        .collect();
    for first in firsts {
        tokio::select! {
            _ = first => {}
            () = stopped(&mut ctx.stop) => return,
        }
    }
    if let Some(completion) = completion {
        launch(&ctx, &job, completion, &mut rng);
    }
}

/// Starts delivering one message (and maybe a copy of it). The receiver resolves once the message
/// had its first attempt (a lost one included).
///
/// `drop_fraction` loses delivery attempts on the way: each attempt is lost with that probability,
/// and like any attempt that was not acknowledged it is redelivered after `redelivery_interval_ms`
/// with a higher callbackCount, as the vendor does. With 1.0 every attempt is lost.
fn launch(ctx: &Ctx, job: &Arc<Job>, content: Content, rng: &mut Rng) -> oneshot::Receiver<()> {
    let (first_tx, first_rx) = oneshot::channel();
    let config = &ctx.shared.config;
    let counters = &ctx.shared.counters;
    let lost = lost_attempts(rng, config.drop_fraction);
    let content = Arc::new(content);
    if rng.chance(config.duplicate_fraction) {
        bump(&counters.callbacks_duplicated);
        let lost_copy = lost_attempts(rng, config.drop_fraction);
        tokio::spawn(deliver(
            ctx.clone(),
            job.clone(),
            content.clone(),
            None,
            lost_copy,
        ));
    }
    tokio::spawn(deliver(
        ctx.clone(),
        job.clone(),
        content,
        Some(first_tx),
        lost,
    ));
    first_rx
}

/// How many attempts in a row, from the first, are lost on the way.
fn lost_attempts(rng: &mut Rng, drop_fraction: f64) -> u32 {
    (0..MAX_ATTEMPTS)
        .take_while(|_| rng.chance(drop_fraction))
        .count() as u32
}

/// Delivers one message: up to [`MAX_ATTEMPTS`] POSTs to the URL registered at each attempt.
async fn deliver(
    mut ctx: Ctx,
    job: Arc<Job>,
    content: Arc<Content>,
    mut first: Option<oneshot::Sender<()>>,
    lost: u32,
) {
    let config = &ctx.shared.config;
    let counters = &ctx.shared.counters;
    let request_id = job.request_id.as_str();
    for attempt in 1..=MAX_ATTEMPTS {
        let registration = ctx
            .shared
            .registry
            .get(&job.request.account, &config.callback_service);
        let Some(registration) = registration else {
            bump(&counters.callbacks_undeliverable);
            if first_time(&ctx.warned_unregistered) {
                tracing::warn!(
                    request_id,
                    service = %config.callback_service,
                    "sim: no callback URL registered; messages are undeliverable (counted from now on)"
                );
            }
            return;
        };
        let body = match content.body(request_id, &registration, attempt) {
            Ok(body) => body,
            Err(e) => {
                bump(&counters.callbacks_undeliverable);
                tracing::error!(request_id, error = %e, "sim: cannot serialize a callback");
                return;
            }
        };
        if attempt <= lost {
            bump(&counters.callbacks_dropped);
            tracing::debug!(
                request_id,
                attempt,
                "sim: callback attempt lost (fault injection)"
            );
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            if attempt == MAX_ATTEMPTS {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(config.redelivery_interval_ms)) => {}
                () = stopped(&mut ctx.stop) => return,
            }
            continue;
        }
        let permits = ctx.permits.clone();
        let mut stop = ctx.stop.clone();
        let outcome = tokio::select! {
            outcome = async {
                let _permit = permits.acquire().await;
                bump(&counters.callback_attempts);
                ctx.client
                    .post(&registration.url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await
            } => outcome,
            () = stopped(&mut stop) => return,
        };
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        match outcome {
            Ok(response) if response.status().is_success() => {
                bump(&counters.callbacks_delivered);
                return;
            }
            Ok(response) => {
                tracing::debug!(request_id, attempt, status = %response.status(), "sim: callback refused");
            }
            Err(e) => {
                tracing::debug!(request_id, attempt, error = %e.without_url(), "sim: callback failed");
            }
        }
        if attempt == MAX_ATTEMPTS {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(config.redelivery_interval_ms)) => {}
            () = stopped(&mut ctx.stop) => return,
        }
    }
    bump(&counters.callbacks_undeliverable);
    if first_time(&ctx.warned_gave_up) {
        tracing::warn!(
            request_id,
            attempts = MAX_ATTEMPTS,
            "sim: callback not acknowledged; giving up (further ones are only counted)"
        );
    }
}

/// True the first time it is asked for `flag`: one warning per kind, the rest go to the counters.
fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}
