//! Stage 4, collect: callback bodies from any source → checked, stripped, journaled durably.
//!
//! [`Intake`] is what every source shares: [`Intake::prepare`] strips the credentials, recognizes the
//! callback and inspects its records (counting, rejecting); [`Intake::commit`] journals a batch in one
//! durable commit. Sources: [`drop_dir`] (files in a directory); the HTTP listener comes next.

pub mod allow_list;
pub mod drop_dir;
pub mod http_listener;
pub mod tracker;

use std::collections::BTreeSet;

use serde::Serialize;

use crate::config::PartitionBy;
use crate::normalize::payload::{Body, CallbackKind};
use crate::normalize::{self, RecordStats};
use crate::state::{Journaled, NewCallback, StateError, Store};
use crate::write::rejects::RecordReject;

/// Callback counts for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CallbackStats {
    /// Bodies received (good or bad).
    pub received: u64,
    /// Bodies rejected whole (not JSON, not a callback).
    pub rejected: u64,
    pub usage: u64,
    pub completion: u64,
    pub fault: u64,
    /// Newly journaled.
    pub journaled: u64,
    /// Identical to a callback already in the journal (re-dropped file, identical redelivery).
    pub already_journaled: u64,
    /// Callbacks whose requestId no job of this store sent (e.g. archived callbacks): their usage
    /// still lands, with the configured account_name.
    pub unmatched: u64,
    /// Accepted usage records in unmatched callbacks.
    pub unmatched_records: u64,
}

/// A callback ready to journal.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub request_id: String,
    pub kind: &'static str,
    pub source: String,
    /// The body without credentials.
    pub body: String,
    pub partitions: BTreeSet<String>,
    accepted_records: u64,
}

impl Prepared {
    /// The journal's view of it.
    pub fn as_new(&self) -> NewCallback<'_> {
        NewCallback {
            request_id: &self.request_id,
            kind: self.kind,
            source: &self.source,
            body: &self.body,
            partitions: &self.partitions,
        }
    }

    /// Accepted usage records in it.
    pub fn accepted_records(&self) -> u64 {
        self.accepted_records
    }
}

/// The intake shared by all callback sources.
#[derive(Debug)]
pub struct Intake {
    strict_luhn: bool,
    partition_by: PartitionBy,
    pub callbacks: CallbackStats,
    pub records: RecordStats,
}

impl Intake {
    pub fn new(strict_luhn: bool, partition_by: PartitionBy) -> Self {
        Intake {
            strict_luhn,
            partition_by,
            callbacks: CallbackStats::default(),
            records: RecordStats::default(),
        }
    }

    /// Checks one body from `source`. Record-level rejects are appended to `rejects`; a body that
    /// is not a callback at all comes back as the `Err` reject.
    pub fn prepare(
        &mut self,
        body: &str,
        source: String,
        rejects: &mut Vec<RecordReject>,
    ) -> Result<Prepared, Box<RecordReject>> {
        self.callbacks.received += 1;
        let checked = Body::parse(body).and_then(|parsed| {
            let cb = parsed.callback()?;
            let stripped = parsed.stripped();
            let mut record_stats = RecordStats::default();
            let partitions = normalize::inspect(
                &cb,
                &source,
                self.strict_luhn,
                self.partition_by,
                &mut record_stats,
                rejects,
            );
            let kind = cb.kind.name();
            let request_id = cb.request_id.to_string();
            if let CallbackKind::Fault { code, message } = &cb.kind {
                // Not a bad input, but a request whose usage will not come: listed with the rejects
                // so that the gap is visible, and the run is partial.
                let code = code.as_deref().unwrap_or("(no faultcode)");
                tracing::warn!(
                    request_id,
                    code,
                    source,
                    "fault callback: the request failed"
                );
                rejects.push(RecordReject {
                    source: source.clone(),
                    request_id: Some(request_id.clone()),
                    record: None,
                    iccid: None,
                    field: Some("faultResponse".to_owned()),
                    raw: Some(code.to_owned()),
                    code: "request_fault".to_owned(),
                    reason: format!(
                        "the vendor reports the request failed: {code}: {}",
                        message.as_deref().unwrap_or("(no faultstring)")
                    ),
                });
            }
            Ok((kind, request_id, partitions, record_stats, stripped))
        });
        match checked {
            Ok((kind, request_id, partitions, record_stats, body)) => {
                match kind {
                    "usage" => self.callbacks.usage += 1,
                    "completion" => self.callbacks.completion += 1,
                    _ => self.callbacks.fault += 1,
                }
                let accepted_records = record_stats.accepted;
                merge(&mut self.records, record_stats);
                Ok(Prepared {
                    request_id,
                    kind,
                    source,
                    body,
                    partitions,
                    accepted_records,
                })
            }
            Err(e) => {
                self.callbacks.rejected += 1;
                Err(Box::new(RecordReject {
                    source,
                    request_id: None,
                    record: None,
                    iccid: None,
                    field: None,
                    raw: None,
                    code: e.code().to_owned(),
                    reason: e.to_string(),
                }))
            }
        }
    }

    /// Journals `batch` in one durable commit and counts what was new.
    pub fn commit<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        batch: &[Prepared],
        received_at: i64,
    ) -> Result<(), StateError> {
        if batch.is_empty() {
            return Ok(());
        }
        let new: Vec<NewCallback<'_>> = batch.iter().map(Prepared::as_new).collect();
        let outcomes = store.journal(&new, received_at)?;
        for (prepared, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Journaled::New(_) => self.callbacks.journaled += 1,
                Journaled::AlreadyJournaled => self.callbacks.already_journaled += 1,
            }
            if !store.known_request(&prepared.request_id)? {
                self.callbacks.unmatched += 1;
                self.callbacks.unmatched_records += prepared.accepted_records;
            }
        }
        Ok(())
    }
}

fn merge(into: &mut RecordStats, from: RecordStats) {
    into.records += from.records;
    into.accepted += from.accepted;
    into.recovered += from.recovered;
    into.rejected += from.rejected;
    into.luhn_warnings += from.luhn_warnings;
    for (code, n) in from.rejected_by_reason {
        *into.rejected_by_reason.entry(code).or_default() += n;
    }
}

/// Now, in µs since the epoch: the `received_at` of a journal commit.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
