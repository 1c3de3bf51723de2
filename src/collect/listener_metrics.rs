//! The listener's Prometheus metrics (`GET /metrics`): callbacks acknowledged and rejected, journal
//! commit latency, requests in flight, and what the listener holds in memory for a run's tracker.
//!
//! Labels are fixed, closed sets (an outcome, a reason), all present from the start at 0 so that
//! `rate()` works from the first scrape. Nothing a caller sent ends up in a label or a value: no
//! bodies, no credentials, no request ids, and no account names either (the listener learns a
//! callback's account only from the store, and a billing account number is the customer's
//! identifier, not the operator's: the run report has it where it is needed).
//!
//! Encoded by `prometheus-client` in the OpenMetrics text format, which Prometheus scrapes as it
//! does its own text format (counters end in `_total`, the exposition ends with `# EOF`).

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the journal commit latency buckets: 0.5 ms (a group commit on a fast
/// disk) to 10 s (a store in trouble; the vendor's own timeout is longer).
const COMMIT_SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What became of an acknowledged (2xx) callback.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Acknowledged {
    /// Newly journaled.
    journaled,
    /// The same body was in the journal already (a redelivery): acknowledged, stored once.
    already_journaled,
}

/// Why a callback request was refused.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Rejected {
    /// Wrong or missing credentials in the body (401).
    unauthorized,
    /// Not UTF-8, not JSON, or not a callback (400).
    malformed,
    /// Not `application/json` (415).
    unsupported_media_type,
    /// Over `callbacks.max_body_bytes` (413).
    too_large,
    /// Not finished within `callbacks.request_timeout_secs` (408).
    timed_out,
    /// The journal could not commit (503, the vendor sends it again).
    journal_unavailable,
}

impl Acknowledged {
    const ALL: [Acknowledged; 2] = [Acknowledged::journaled, Acknowledged::already_journaled];
}

impl Rejected {
    const ALL: [Rejected; 6] = [
        Rejected::unauthorized,
        Rejected::malformed,
        Rejected::unsupported_media_type,
        Rejected::too_large,
        Rejected::timed_out,
        Rejected::journal_unavailable,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Acknowledged,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Rejected,
}

/// The listener's metrics and their registry.
#[derive(Debug)]
pub struct ListenerMetrics {
    registry: Registry,
    acknowledged: Family<OutcomeLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    commit_seconds: Histogram,
    in_flight: Gauge,
    tracker_news: Gauge,
}

impl Default for ListenerMetrics {
    fn default() -> Self {
        ListenerMetrics::new()
    }
}

impl ListenerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tsusage");
        let acknowledged = Family::<OutcomeLabel, Counter>::default();
        for outcome in Acknowledged::ALL {
            drop(acknowledged.get_or_create(&OutcomeLabel { outcome }));
        }
        registry.register(
            "callbacks_acknowledged",
            "Callbacks answered 2xx, each only after it was durable in the journal",
            acknowledged.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        for reason in Rejected::ALL {
            drop(rejected.get_or_create(&ReasonLabel { reason }));
        }
        registry.register(
            "callbacks_rejected",
            "Callback requests refused, by reason",
            rejected.clone(),
        );
        let commit_seconds = Histogram::new(COMMIT_SECONDS_BUCKETS);
        registry.register_with_unit(
            "journal_commit",
            "Time from handing a callback to the journal writer until it is durable (or failed), group commit included",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "listener_requests_in_flight",
            "Callback requests being received or journaled now",
            in_flight.clone(),
        );
        let tracker_news = Gauge::default();
        registry.register(
            "listener_tracker_news_pending",
            "Journaled callbacks whose news waits in memory for the run's tracker (drained at each of its polls; always 0 in tsusage listen, which has no tracker)",
            tracker_news.clone(),
        );
        ListenerMetrics {
            registry,
            acknowledged,
            rejected,
            commit_seconds,
            in_flight,
            tracker_news,
        }
    }

    pub fn acknowledged(&self, outcome: Acknowledged) {
        self.acknowledged
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn rejected(&self, reason: Rejected) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn journal_committed(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Counts a callback request in flight until the guard is dropped (also when the request is
    /// cut by its timeout or its connection).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// How many journaled callbacks' news the listener holds for the run's tracker now.
    pub fn tracker_news_pending(&self, pending: usize) {
        self.tracker_news
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// A request in flight; see [`ListenerMetrics::in_flight`].
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_there_from_the_start_at_zero() {
        let metrics = ListenerMetrics::new();
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("tsusage_callbacks_acknowledged_total{outcome=\"journaled\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tsusage_callbacks_rejected_total{reason=\"journal_unavailable\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tsusage_listener_requests_in_flight 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tsusage_listener_tracker_news_pending 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn counts_observations_and_in_flight_requests() {
        let metrics = ListenerMetrics::new();
        metrics.acknowledged(Acknowledged::already_journaled);
        metrics.rejected(Rejected::unauthorized);
        metrics.rejected(Rejected::unauthorized);
        metrics.journal_committed(Duration::from_millis(3));
        let guard = metrics.in_flight();
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("outcome=\"already_journaled\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("reason=\"unauthorized\"} 2\n"), "{text}");
        assert!(
            text.contains("tsusage_journal_commit_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tsusage_journal_commit_seconds_bucket{le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("tsusage_listener_requests_in_flight 1\n"),
            "{text}"
        );
        drop(guard);
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains("tsusage_listener_requests_in_flight 0\n"),
            "{text}"
        );
    }
}
