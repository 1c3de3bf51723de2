//! One request budget per account across processes: a token bucket row in the shared store
//! (`Store::take_tokens`) from which each worker takes small grants that its local governor
//! limiter then spends, so that the sum over every worker stays within `api.requests_per_sec`
//! (plus `api.burst`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;

use crate::state::{AsyncStore, StateError};

/// Tokens a worker asks for at a time: a fifth of a second's worth, so that tokens a worker holds
/// but has not spent (and loses when it ends) stay few, and the store sees ~5 grants a second.
pub const GRANTS_PER_SEC: u32 = 5;

/// What a worker's share of the budget was, for the run report's submit section.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BudgetReport {
    /// The bucket's account.
    pub account: String,
    /// Grants taken from the shared bucket (store round trips that granted at least one token).
    pub grants: u64,
    /// Tokens granted in total (each pays for one request).
    pub tokens: u64,
    /// Tokens granted that this worker never spent (lost when it ended).
    pub unspent: u64,
    /// Time spent waiting for the shared budget, in seconds.
    pub waited_secs: f64,
}

/// A worker's access to the shared bucket.
pub struct SharedBudget {
    store: AsyncStore,
    account: String,
    rate: f64,
    burst: f64,
    grant: u32,
    /// Tokens granted and not yet spent.
    held: Mutex<u32>,
    grants: AtomicU64,
    tokens: AtomicU64,
    waited_us: AtomicU64,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget")
            .field("account", &self.account)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl SharedBudget {
    /// The budget of `account`: `requests_per_sec` sustained, `burst` at most at once.
    pub fn new(store: AsyncStore, account: &str, requests_per_sec: u32, burst: u32) -> Self {
        let rate = requests_per_sec.max(1);
        SharedBudget {
            store,
            account: account.to_owned(),
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            grant: rate.div_ceil(GRANTS_PER_SEC).clamp(1, burst.max(1)),
            held: Mutex::new(0),
            grants: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
        }
    }

    /// Waits until the shared bucket pays for one request.
    pub async fn take_one(&self) -> Result<(), StateError> {
        let mut held = self.held.lock().await;
        let started = tokio::time::Instant::now();
        while *held == 0 {
            let (account, rate, burst, want) =
                (self.account.clone(), self.rate, self.burst, self.grant);
            let granted = self
                .store
                .call(move |s| s.take_tokens(&account, rate, burst, want))
                .await?;
            if granted > 0 {
                self.grants.fetch_add(1, Ordering::Relaxed);
                self.tokens.fetch_add(u64::from(granted), Ordering::Relaxed);
                *held = granted;
            } else {
                // About one token's time: the bucket refills at `rate` for every worker.
                tokio::time::sleep(Duration::from_secs_f64(1.0 / self.rate)).await;
            }
        }
        *held -= 1;
        let waited = started.elapsed().as_micros();
        self.waited_us
            .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(())
    }

    /// This worker's figures so far.
    pub async fn report(&self) -> BudgetReport {
        BudgetReport {
            account: self.account.clone(),
            grants: self.grants.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            unspent: u64::from(*self.held.lock().await),
            waited_secs: self.waited_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}
