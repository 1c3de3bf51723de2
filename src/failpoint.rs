//! Injected pauses for crash tests: `TSUSAGE_TEST_PAUSE="after_post=100,journal_commit=20"` makes the
//! process sleep that many milliseconds at those points, widening the narrow windows a `kill -9` must
//! hit (between a POST and its requestId record, inside a journal commit, inside a Parquet publish).
//! `TSUSAGE_TEST_FAIL="journal_commit,parquet_write"` makes those points fail as a full or broken disk
//! would. Unset (the normal case), every point is a no-op.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable naming the pauses.
pub const ENV: &str = "TSUSAGE_TEST_PAUSE";
/// The environment variable naming the points that fail.
pub const ENV_FAIL: &str = "TSUSAGE_TEST_FAIL";

/// Between the vendor's answer to a usage request and the durable record of its requestId.
pub const AFTER_POST: &str = "after_post";
/// Inside a journal transaction, before its commit.
pub const JOURNAL_COMMIT: &str = "journal_commit";
/// After a journal commit's bodies are written to its segment, before they are fsynced and
/// their index rows committed.
pub const JOURNAL_APPEND: &str = "journal_append";
/// After a partition's files are staged, before they are published.
pub const PARQUET_PUBLISH: &str = "parquet_publish";
/// In `run`'s collect loop, after it has read the journal and before it decides whether to go on:
/// submissions that end meanwhile must still have every requestId they recorded tracked.
pub const COLLECT_LOOK: &str = "collect_look";
/// Inside `tsusage prune`, after the archive files are durable and before the journal rows leave.
pub const PRUNE_COMMIT: &str = "prune_commit";
/// While a Parquet file is being written (fails after the first batch).
pub const PARQUET_WRITE: &str = "parquet_write";

/// The environment variable that runs the receipt clock this many days ahead (tests of retention:
/// night N of a test runs N days later, minutes apart in fact).
pub const ENV_DAYS_LATER: &str = "TSUSAGE_TEST_DAYS_LATER";

/// µs to add to the wall clock for receipt times and the retention horizon: 0 unless
/// `TSUSAGE_TEST_DAYS_LATER` is set.
pub fn clock_shift_micros() -> i64 {
    static SHIFT: OnceLock<i64> = OnceLock::new();
    *SHIFT.get_or_init(|| {
        std::env::var(ENV_DAYS_LATER)
            .ok()
            .and_then(|d| d.trim().parse::<i64>().ok())
            .map_or(0, |days| days.saturating_mul(86_400_000_000))
    })
}

/// The environment variable that overrides the size below which the SQLite store keeps a commit's
/// bodies in its rows (`0`: every commit goes to the segment), so that tests of small commits
/// exercise segment appends.
pub const ENV_INLINE_BELOW: &str = "TSUSAGE_TEST_INLINE_BELOW";

/// `default`, unless `TSUSAGE_TEST_INLINE_BELOW` says otherwise.
pub fn inline_below(default: usize) -> usize {
    static BELOW: OnceLock<Option<usize>> = OnceLock::new();
    BELOW
        .get_or_init(|| std::env::var(ENV_INLINE_BELOW).ok()?.trim().parse().ok())
        .unwrap_or(default)
}

fn pauses() -> &'static HashMap<String, Duration> {
    static PAUSES: OnceLock<HashMap<String, Duration>> = OnceLock::new();
    PAUSES.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|item| {
                let (name, ms) = item.split_once('=')?;
                Some((
                    name.trim().to_owned(),
                    Duration::from_millis(ms.trim().parse().ok()?),
                ))
            })
            .collect()
    })
}

fn failing() -> &'static Vec<String> {
    static FAILING: OnceLock<Vec<String>> = OnceLock::new();
    FAILING.get_or_init(|| {
        std::env::var(ENV_FAIL)
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()
    })
}

/// An injected I/O failure at `point`, if one is configured.
pub fn fail(point: &str) -> std::io::Result<()> {
    if failing().iter().any(|p| p == point) {
        return Err(std::io::Error::other(format!(
            "injected failure at {point} ({ENV_FAIL})"
        )));
    }
    Ok(())
}

/// Sleeps the thread at `point` if a pause is configured for it.
pub fn pause(point: &str) {
    if let Some(wait) = pauses().get(point) {
        std::thread::sleep(*wait);
    }
}

/// Sleeps the task at `point` if a pause is configured for it.
pub async fn pause_async(point: &str) {
    if let Some(wait) = pauses().get(point) {
        tokio::time::sleep(*wait).await;
    }
}
