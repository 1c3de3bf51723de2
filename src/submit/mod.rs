//! Stage 3, submit: jobs → usage requests to ThingSpace, rate limited, retried, each requestId
//! recorded durably as soon as it arrives.
//!
//! - A governor limiter holds the sustained rate (`api.requests_per_sec`, burst `api.burst`); at most
//!   `api.max_in_flight` requests are on the wire at once.
//! - 429, 5xx, timeouts and connection errors are retried with capped exponential backoff and full
//!   jitter. A `Retry-After` pauses every task, not just the one that got it.
//! - Other 4xx: the job failed, with the vendor's errorCode and message; not retried.
//! - A run has a retry budget: when a vendor that is down has used it up, the run stops taking jobs
//!   and ends in bounded time; the jobs not sent stay `planned` for the next run.
//!
//! [`client`] holds the HTTP side and the two tokens; [`wire`] the vendor's field names.

pub mod budget;
pub mod client;
pub mod registration;
pub mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use client::{ApiClient, ApiError};

use crate::config::{ApiConfig, MIN_RETRY_BUDGET};
use crate::plan::Job;
use crate::state::{JobUpdate, Journalable, StateError, StateWriter};

/// How to submit, from `[api]`.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub requests_per_sec: u32,
    pub burst: u32,
    pub max_in_flight: usize,
    pub max_attempts_per_job: u32,
    /// Retries allowed in this run.
    pub retry_budget: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Told `(job_id, request_id)` once each requestId is durable: how a collector learns of the
    /// requests it must track without polling the store (every message is sent before the
    /// submission returns).
    pub recorded: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
    /// Live counts for a progress display (requests sent, accepted, on the wire).
    pub progress: Option<Arc<SubmitGauge>>,
    /// The account's budget shared with other workers (a store shared by several processes); each
    /// request is paid from it before it goes out. `None`: the local limiter alone.
    pub budget: Option<Arc<budget::SharedBudget>>,
}

impl SubmitOptions {
    /// The options for a run of `jobs` jobs.
    pub fn new(api: &ApiConfig, jobs: usize) -> Self {
        let budget = (jobs as u64 * u64::from(api.retry_budget_percent) / 100)
            .clamp(u64::from(MIN_RETRY_BUDGET), u64::from(u32::MAX));
        SubmitOptions {
            requests_per_sec: api.requests_per_sec.max(1),
            burst: api.burst.max(1),
            max_in_flight: api.max_in_flight.max(1) as usize,
            max_attempts_per_job: api.max_attempts_per_job.max(1),
            retry_budget: budget as u32,
            backoff_min: Duration::from_millis(api.backoff_min_ms),
            backoff_max: Duration::from_secs(api.backoff_max_secs),
            recorded: None,
            progress: None,
            budget: None,
        }
    }
}

/// Counts the submission updates as it goes (shared with the display; cheap atomics).
#[derive(Debug, Default)]
pub struct SubmitGauge {
    /// HTTP requests sent for jobs (first tries and retries).
    pub sent: AtomicU64,
    /// Jobs whose requestId is recorded.
    pub accepted: AtomicU64,
    /// Requests on the wire now.
    pub in_flight: AtomicI64,
}

/// A job the vendor refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobFailure {
    pub job_id: String,
    pub window: String,
    pub iccids: usize,
    pub status: u16,
    pub error_code: String,
    pub error_message: String,
}

/// What submission did, for the run report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubmitReport {
    /// Jobs handed to the submitter.
    pub jobs: u64,
    /// Jobs accepted: a requestId is recorded for each.
    pub submitted: u64,
    /// Jobs the vendor refused (see `failures`).
    pub failed: u64,
    /// Jobs left for a later run (transient errors past their attempts, or the run stopped).
    pub not_submitted: u64,
    /// HTTP requests sent for jobs.
    pub attempts: u64,
    pub retries: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    pub reauthentications: u64,
    pub logins: u64,
    pub oauth_tokens: u64,
    pub retry_budget: u32,
    /// Why the run stopped taking jobs early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Most requests seen on the wire at once.
    pub max_in_flight: u64,
    pub elapsed_secs: f64,
    /// Requests per second from the first send to the last answer.
    pub achieved_rate_per_sec: f64,
    pub failures: Vec<JobFailure>,
    /// Requests sent per second of the wall clock: `[unix_second, requests]`, in time order, seconds
    /// without a request left out (the run report's page draws the rate over time from it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sent_per_second: Vec<(i64, u64)>,
    /// Jobs left for a later run, with the reason: `(job_id, reason)`.
    #[serde(skip)]
    pub unsent: Vec<(String, String)>,
    /// This worker's share of the account's budget, when several workers share it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<budget::BudgetReport>,
}

impl std::ops::AddAssign for SubmitReport {
    /// Adds a later submission of the same run (re-requests): counts add up, the token figures are
    /// the client's running totals (the largest), the rate is recomputed.
    fn add_assign(&mut self, other: SubmitReport) {
        // Destructured without `..`: a new field does not compile until it is merged here.
        let SubmitReport {
            jobs,
            submitted,
            failed,
            not_submitted,
            attempts,
            retries,
            throttled,
            server_errors,
            transport_errors,
            reauthentications,
            logins,
            oauth_tokens,
            retry_budget,
            stopped,
            max_in_flight,
            elapsed_secs,
            achieved_rate_per_sec: _,
            failures,
            sent_per_second,
            unsent,
            budget,
        } = other;
        self.jobs += jobs;
        self.submitted += submitted;
        self.failed += failed;
        self.not_submitted += not_submitted;
        self.attempts += attempts;
        self.retries += retries;
        self.throttled += throttled;
        self.server_errors += server_errors;
        self.transport_errors += transport_errors;
        self.reauthentications = self.reauthentications.max(reauthentications);
        self.logins = self.logins.max(logins);
        self.oauth_tokens = self.oauth_tokens.max(oauth_tokens);
        self.retry_budget += retry_budget;
        self.stopped = self.stopped.take().or(stopped);
        self.max_in_flight = self.max_in_flight.max(max_in_flight);
        self.elapsed_secs += elapsed_secs;
        self.achieved_rate_per_sec = if self.elapsed_secs > 0.0 {
            self.attempts as f64 / self.elapsed_secs
        } else {
            0.0
        };
        self.failures.extend(failures);
        self.sent_per_second.extend(sent_per_second);
        self.unsent.extend(unsent);
        self.budget = self.budget.take().or(budget);
    }
}

/// Submission stops: credentials are wrong, or the store cannot record what was sent.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What every worker shares.
struct Shared {
    limiter: governor::DefaultDirectRateLimiter,
    in_flight: Semaphore,
    pause_until: Mutex<Option<Instant>>,
    queue: Mutex<VecDeque<Job>>,
    stop: AtomicBool,
    stopped: Mutex<Option<String>>,
    unsent: Mutex<Vec<(String, String)>>,
    retries_left: AtomicU32,
    wire_now: AtomicU64,
    wire_max: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    failed: AtomicU64,
    not_submitted: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    /// Requests sent per unix second.
    timeline: Mutex<std::collections::BTreeMap<i64, u64>>,
}

impl Shared {
    /// Waits out any `Retry-After` pause, then for the rate limiter, then for an in-flight slot.
    async fn ready(&self) -> tokio::sync::SemaphorePermit<'_> {
        loop {
            self.wait_pause().await;
            self.limiter.until_ready().await;
            let Ok(permit) = self.in_flight.acquire().await else {
                continue;
            };
            // A 429 may have paused everyone while this task waited for its turn.
            if self.pause_remaining().is_none() {
                return permit;
            }
        }
    }

    fn pause_remaining(&self) -> Option<Duration> {
        let until = (*self.pause_until.lock().unwrap_or_else(|e| e.into_inner()))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    async fn wait_pause(&self) {
        while let Some(wait) = self.pause_remaining() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Makes every task wait `wait` before its next request.
    fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut pause = self.pause_until.lock().unwrap_or_else(|e| e.into_inner());
        if pause.is_none_or(|p| p < until) {
            *pause = Some(until);
        }
    }

    fn stop_with(&self, reason: String) {
        self.stop.store(true, Ordering::SeqCst);
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        stopped.get_or_insert(reason);
    }

    fn next_job(&self) -> Option<Job> {
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    fn unsent(&self, job: &Job, reason: String) {
        self.counters.not_submitted.fetch_add(1, Ordering::Relaxed);
        self.unsent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((job.id.to_string(), reason));
    }

    fn take_retry(&self) -> bool {
        self.retries_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Submits `jobs`, recording each outcome through `writer` as it happens.
///
/// Returns an error only when the run cannot go on (credentials rejected, state store failing);
/// what was recorded until then stays recorded.
pub async fn submit<P: Journalable>(
    client: Arc<ApiClient>,
    writer: Arc<StateWriter<P>>,
    jobs: Vec<Job>,
    options: &SubmitOptions,
) -> Result<SubmitReport, SubmitError> {
    let rate =
        std::num::NonZeroU32::new(options.requests_per_sec).unwrap_or(std::num::NonZeroU32::MIN);
    // A waiting task wakes up to a millisecond late (timer granularity), and a rate limiter counts
    // the lost time as unused. At high rates that alone costs several per cent of the rate, so the
    // burst is at least 5 ms worth of requests: late wake-ups catch up, the sustained rate stays
    // the configured one. (At 200 req/s or less this changes nothing.)
    let burst = options.burst.max(rate.get().div_ceil(200));
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
    let job_count = jobs.len() as u64;
    let shared = Arc::new(Shared {
        limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        in_flight: Semaphore::new(options.max_in_flight),
        pause_until: Mutex::new(None),
        queue: Mutex::new(jobs.into()),
        stop: AtomicBool::new(false),
        stopped: Mutex::new(None),
        unsent: Mutex::new(Vec::new()),
        retries_left: AtomicU32::new(options.retry_budget),
        wire_now: AtomicU64::new(0),
        wire_max: AtomicU64::new(0),
        counters: Counters::default(),
    });
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    // More workers than in-flight slots, so that tasks sleeping in backoff do not idle the wire.
    let workers = options
        .max_in_flight
        .saturating_mul(2)
        .min(job_count.max(1) as usize);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (client, writer, shared, failures) = (
            client.clone(),
            writer.clone(),
            shared.clone(),
            failures.clone(),
        );
        let options = options.clone();
        tasks.spawn(async move {
            let mut rng = Jitter::new(worker as u64);
            while let Some(job) = shared.next_job() {
                match submit_job(&client, &writer, &shared, &options, &mut rng, &job).await {
                    Ok(Some(failure)) => failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(failure),
                    Ok(None) => {}
                    Err(e) => {
                        shared.stop_with(e.to_string());
                        return Err(e);
                    }
                }
            }
            Ok(())
        });
    }
    let mut fatal = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                fatal.get_or_insert(e);
            }
            Err(e) => {
                fatal.get_or_insert(SubmitError::State(StateError::Invalid {
                    path: String::new(),
                    message: format!("a submitting task failed: {e}"),
                }));
            }
        }
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    let stopped = shared
        .stopped
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut unsent = std::mem::take(&mut *shared.unsent.lock().unwrap_or_else(|e| e.into_inner()));
    let left: Vec<Job> = shared
        .queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain(..)
        .collect();
    let why = stopped.clone().unwrap_or_else(|| "the run stopped".into());
    unsent.extend(left.iter().map(|j| (j.id.to_string(), why.clone())));
    let left = left.len() as u64;
    let c = &shared.counters;
    let elapsed = started.elapsed().as_secs_f64();
    let attempts = c.attempts.load(Ordering::Relaxed);
    let mut failures = std::mem::take(&mut *failures.lock().unwrap_or_else(|e| e.into_inner()));
    failures.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    Ok(SubmitReport {
        jobs: job_count,
        submitted: c.submitted.load(Ordering::Relaxed),
        failed: c.failed.load(Ordering::Relaxed),
        not_submitted: c.not_submitted.load(Ordering::Relaxed) + left,
        attempts,
        retries: c.retries.load(Ordering::Relaxed),
        throttled: c.throttled.load(Ordering::Relaxed),
        server_errors: c.server_errors.load(Ordering::Relaxed),
        transport_errors: c.transport_errors.load(Ordering::Relaxed),
        reauthentications: client.counters.reauthentications.load(Ordering::Relaxed),
        logins: client.counters.logins.load(Ordering::Relaxed),
        oauth_tokens: client.counters.oauth_tokens.load(Ordering::Relaxed),
        retry_budget: options.retry_budget,
        stopped: shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        max_in_flight: shared.wire_max.load(Ordering::Relaxed),
        elapsed_secs: elapsed,
        achieved_rate_per_sec: if elapsed > 0.0 {
            attempts as f64 / elapsed
        } else {
            0.0
        },
        failures,
        sent_per_second: std::mem::take(&mut *c.timeline.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect(),
        unsent,
        budget: None,
    })
}

/// Renewed credentials still refused this many times in a row: give the job up for this run.
const MAX_RENEWALS_PER_JOB: u32 = 3;

/// One job to its end: submitted, failed, or given up for this run. `Ok(Some(_))` is a refusal.
async fn submit_job<P: Journalable>(
    client: &ApiClient,
    writer: &StateWriter<P>,
    shared: &Shared,
    options: &SubmitOptions,
    rng: &mut Jitter,
    job: &Job,
) -> Result<Option<JobFailure>, SubmitError> {
    let c = &shared.counters;
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(options.backoff_min)
        .with_max_delay(options.backoff_max)
        .with_factor(2.0)
        .without_max_times()
        .build();
    let mut attempts = 0u32;
    let mut renewals = 0u32;
    let give_up = |attempts: u32, error: String| JobUpdate::GaveUp {
        job_id: job.id.to_string(),
        attempts,
        error,
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            shared.unsent(job, "the run stopped".into());
            if attempts > 0 {
                writer
                    .apply(give_up(attempts, "the run stopped".into()))
                    .await?;
            }
            return Ok(None);
        }
        let result = {
            let _slot = shared.ready().await;
            if let Some(budget) = &options.budget {
                budget.take_one().await?;
            }
            let now = shared.wire_now.fetch_add(1, Ordering::SeqCst) + 1;
            shared.wire_max.fetch_max(now, Ordering::SeqCst);
            attempts += 1;
            c.attempts.fetch_add(1, Ordering::Relaxed);
            *c.timeline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(chrono::Utc::now().timestamp())
                .or_default() += 1;
            let gauge = options.progress.as_deref();
            if let Some(g) = gauge {
                g.sent.fetch_add(1, Ordering::Relaxed);
                g.in_flight.fetch_add(1, Ordering::Relaxed);
            }
            let result = client.request_usage(job).await;
            if let Some(g) = gauge {
                g.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            shared.wire_now.fetch_sub(1, Ordering::SeqCst);
            // Pause everyone before the slot is released, so no task slips in under a Retry-After.
            if let Some(wait) = result.as_ref().err().and_then(ApiError::retry_after) {
                shared.pause_for(wait);
            }
            result
        };
        let error = match result {
            Ok(request_id) => {
                tracing::debug!(job = %job.id, request_id, "submitted");
                crate::failpoint::pause_async(crate::failpoint::AFTER_POST).await;
                writer
                    .apply(JobUpdate::Submitted {
                        job_id: job.id.to_string(),
                        request_id: request_id.clone(),
                        attempts,
                    })
                    .await?;
                c.submitted.fetch_add(1, Ordering::Relaxed);
                if let Some(g) = &options.progress {
                    g.accepted.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(recorded) = &options.recorded {
                    // A collector that stopped listening no longer needs to know.
                    let _ = recorded.send((job.id.to_string(), request_id));
                }
                return Ok(None);
            }
            Err(ApiError::Reauthenticated) => {
                renewals += 1;
                if renewals > MAX_RENEWALS_PER_JOB {
                    let why = "credentials renewed and still refused".to_owned();
                    shared.unsent(job, why.clone());
                    writer.apply(give_up(attempts, why)).await?;
                    return Ok(None);
                }
                continue;
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(ApiError::Rejected {
                status,
                code,
                message,
            }) => {
                tracing::warn!(job = %job.id, status, code, "request refused");
                writer
                    .apply(JobUpdate::Failed {
                        job_id: job.id.to_string(),
                        attempts,
                        error: format!("{code}: {message}"),
                    })
                    .await?;
                c.failed.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(JobFailure {
                    job_id: job.id.to_string(),
                    window: job.window.to_string(),
                    iccids: job.iccids.len(),
                    status,
                    error_code: code,
                    error_message: message,
                }));
            }
            Err(e) => e,
        };
        match &error {
            ApiError::Throttled { .. } => c.throttled.fetch_add(1, Ordering::Relaxed),
            ApiError::Server { .. } => c.server_errors.fetch_add(1, Ordering::Relaxed),
            _ => c.transport_errors.fetch_add(1, Ordering::Relaxed),
        };
        let out_of_attempts = attempts >= options.max_attempts_per_job;
        if out_of_attempts || !shared.take_retry() {
            if !out_of_attempts {
                shared.stop_with(format!(
                    "retry budget of {} used up: the vendor looks unavailable (last error: {error}); \
                     the jobs not submitted are kept for the next run",
                    options.retry_budget
                ));
            }
            tracing::warn!(job = %job.id, attempts, error = %error, "giving up on the job for this run");
            shared.unsent(job, format!("gave up after {attempts} attempts: {error}"));
            writer.apply(give_up(attempts, error.to_string())).await?;
            return Ok(None);
        }
        c.retries.fetch_add(1, Ordering::Relaxed);
        let ceiling = backoff.next().unwrap_or(options.backoff_max);
        let wait = rng
            .below(ceiling)
            .max(error.retry_after().unwrap_or_default());
        tracing::debug!(job = %job.id, attempts, ?wait, error = %error, "retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Full jitter: a uniform duration below the backoff ceiling (xorshift; quality is not critical).
struct Jitter(u64);

impl Jitter {
    fn new(salt: u64) -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Jitter((seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn below(&mut self, ceiling: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { self.0 % nanos })
    }
}
