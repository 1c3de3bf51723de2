//! The simulator's counters, updated by the handlers and the dispatcher, and their snapshot [`SimStats`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use super::lock;

/// Most promo arrival times kept (8 MB); later arrivals are counted but their times not kept.
pub const MAX_ARRIVALS_KEPT: usize = 1_000_000;

/// A snapshot of what the simulator saw and did since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SimStats {
    /// Distinct OAuth tokens issued (a token served again within its TTL is not counted).
    pub oauth_tokens_issued: u64,
    /// Token requests refused (bad client credentials or grant type).
    pub oauth_rejected: u64,
    /// Successful M2M logins.
    pub logins_ok: u64,
    /// Failed M2M logins, wrong credentials and locked account alike.
    pub logins_failed: u64,
    /// Sessions ended by logout.
    pub logouts: u64,
    /// Whether five consecutive failed logins locked the account.
    pub account_locked: bool,
    /// M2M calls refused with 401 for a missing, wrong or expired bearer token (any endpoint).
    pub bearer_rejected: u64,
    /// M2M calls refused for a missing, unknown, ended or idle-expired session token (any endpoint).
    pub session_rejected: u64,
    /// Promo requests received, whatever their outcome.
    pub promo_requests: u64,
    /// Promo requests accepted (200 with a requestId).
    pub promo_accepted: u64,
    /// Promo requests answered 429 (throttled).
    pub promo_rejected_429: u64,
    /// Promo requests answered 5xx (injected).
    pub promo_rejected_5xx: u64,
    /// Promo requests answered 400 (session or validation).
    pub promo_rejected_400: u64,
    /// Promo requests answered 401 (bearer).
    pub promo_rejected_401: u64,
    /// Devices in accepted promo requests, after removing repeats within a request.
    pub promo_devices_accepted: u64,
    /// Most promo requests in flight at once.
    pub promo_max_in_flight: u64,
    /// Arrival of each promo request, in milliseconds since the simulator started, in arrival order
    /// (the first 1,000,000).
    pub promo_arrival_ms: Vec<u64>,
    /// When each 429 was answered, in milliseconds since the simulator started (first 1,000,000).
    pub promo_throttled_ms: Vec<u64>,
    /// Each accepted promo request: `(ms since start, window start YYYY-MM-DD, first ICCID,
    /// devices)`, in acceptance order (first 1,000,000): which windows and chunks were asked how
    /// often.
    pub promo_accepted_log: Vec<(u64, String, String, usize)>,
    /// Callback messages built for accepted requests (data and completion, before drops and copies).
    pub callback_messages: u64,
    /// Delivery attempts (HTTP POSTs started, redeliveries and duplicate copies included).
    pub callback_attempts: u64,
    /// Deliveries the receiver acknowledged with 2xx.
    pub callbacks_delivered: u64,
    /// Messages dropped by fault injection (never delivered).
    pub callbacks_dropped: u64,
    /// Extra copies sent by fault injection.
    pub callbacks_duplicated: u64,
    /// Deliveries given up: no URL registered for the account and service, or 4 attempts failed.
    pub callbacks_undeliverable: u64,
    /// Usage records whose `dataUsage` was made malformed by fault injection.
    pub records_dirtied: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub oauth_tokens_issued: AtomicU64,
    pub oauth_rejected: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub logouts: AtomicU64,
    pub account_locked: AtomicBool,
    pub bearer_rejected: AtomicU64,
    pub session_rejected: AtomicU64,
    pub promo_requests: AtomicU64,
    pub promo_accepted: AtomicU64,
    pub promo_rejected_429: AtomicU64,
    pub promo_rejected_5xx: AtomicU64,
    pub promo_rejected_400: AtomicU64,
    pub promo_rejected_401: AtomicU64,
    pub promo_devices_accepted: AtomicU64,
    pub promo_in_flight: AtomicU64,
    pub promo_max_in_flight: AtomicU64,
    pub promo_arrival_ms: Mutex<Vec<u64>>,
    pub promo_throttled_ms: Mutex<Vec<u64>>,
    pub promo_accepted_log: Mutex<Vec<(u64, String, String, usize)>>,
    pub callback_messages: AtomicU64,
    pub callback_attempts: AtomicU64,
    pub callbacks_delivered: AtomicU64,
    pub callbacks_dropped: AtomicU64,
    pub callbacks_duplicated: AtomicU64,
    pub callbacks_undeliverable: AtomicU64,
    pub records_dirtied: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Records a promo request's arrival, `ms` after start.
    pub fn promo_arrived(&self, ms: u64) {
        bump(&self.promo_requests);
        let mut arrivals = lock(&self.promo_arrival_ms);
        if arrivals.len() < MAX_ARRIVALS_KEPT {
            arrivals.push(ms);
        }
    }

    /// Records a 429 answered `ms` after start.
    pub fn promo_throttled(&self, ms: u64) {
        bump(&self.promo_rejected_429);
        let mut times = lock(&self.promo_throttled_ms);
        if times.len() < MAX_ARRIVALS_KEPT {
            times.push(ms);
        }
    }

    /// Records an accepted promo request, `ms` after start.
    pub fn promo_accepted_request(&self, ms: u64, window_start: String, first: String, n: usize) {
        let mut log = lock(&self.promo_accepted_log);
        if log.len() < MAX_ARRIVALS_KEPT {
            log.push((ms, window_start, first, n));
        }
    }

    /// Marks a promo request in flight until the guard drops.
    pub fn promo_in_flight(&self) -> InFlight<'_> {
        let now = self.promo_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.promo_max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn snapshot(&self) -> SimStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimStats {
            oauth_tokens_issued: get(&self.oauth_tokens_issued),
            oauth_rejected: get(&self.oauth_rejected),
            logins_ok: get(&self.logins_ok),
            logins_failed: get(&self.logins_failed),
            logouts: get(&self.logouts),
            account_locked: self.account_locked.load(Ordering::Relaxed),
            bearer_rejected: get(&self.bearer_rejected),
            session_rejected: get(&self.session_rejected),
            promo_requests: get(&self.promo_requests),
            promo_accepted: get(&self.promo_accepted),
            promo_rejected_429: get(&self.promo_rejected_429),
            promo_rejected_5xx: get(&self.promo_rejected_5xx),
            promo_rejected_400: get(&self.promo_rejected_400),
            promo_rejected_401: get(&self.promo_rejected_401),
            promo_devices_accepted: get(&self.promo_devices_accepted),
            promo_max_in_flight: get(&self.promo_max_in_flight),
            promo_arrival_ms: lock(&self.promo_arrival_ms).clone(),
            promo_throttled_ms: lock(&self.promo_throttled_ms).clone(),
            promo_accepted_log: lock(&self.promo_accepted_log).clone(),
            callback_messages: get(&self.callback_messages),
            callback_attempts: get(&self.callback_attempts),
            callbacks_delivered: get(&self.callbacks_delivered),
            callbacks_dropped: get(&self.callbacks_dropped),
            callbacks_duplicated: get(&self.callbacks_duplicated),
            callbacks_undeliverable: get(&self.callbacks_undeliverable),
            records_dirtied: get(&self.records_dirtied),
        }
    }
}

/// A promo request in flight; dropping it ends it.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.promo_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
