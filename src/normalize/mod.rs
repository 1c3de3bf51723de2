//! Stage 5, normalize: callback payloads → typed [`UsageRow`]s, strictly, one parser for every source.
//!
//! - [`payload`]: a body → credentials stripped → [`payload::Callback`] (usage, completion, fault).
//! - [`record`]: one usage record → [`record::ParsedRecord`] or a reject naming the field.
//! - [`values`]: the value policy for counts and timestamps.
//!
//! - [`collapse`]: rows of partitions in bounded memory, one per (iccid, usage_start, usage_end), the
//!   most recently received value winning.
//!
//! [`inspect`] runs when a callback is received (counts, rejects, which partitions it touches, and its
//! accepted records, which go straight to the output when the partition is new).

pub mod collapse;
pub mod payload;
pub mod record;
mod scan;
pub mod values;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::Datelike;
use serde::Serialize;

use crate::config::PartitionBy;
use crate::ingest::Iccid;
use crate::output::rejects::RecordReject;
use payload::{Callback, CallbackKind};

/// One output row (Parquet schema v1: README, "The output"). Times are µs since the epoch, UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub account_name: Arc<str>,
    pub iccid: Iccid,
    pub usage_start: i64,
    pub usage_end: i64,
    pub data_usage_bytes: i64,
    pub sms_usage: i64,
    pub mo_sms: i64,
    pub mt_sms: i64,
    pub request_id: Arc<str>,
    pub received_at: i64,
}

/// Record counts for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecordStats {
    /// Usage records seen in new callbacks.
    pub records: u64,
    /// Records that passed the policy (including the recovered ones).
    pub accepted: u64,
    /// Accepted records that needed leniency (whitespace around digits, JSON integers).
    pub recovered: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Accepted records whose ICCID fails the Luhn check.
    pub luhn_warnings: u64,
}

impl std::ops::AddAssign for RecordStats {
    fn add_assign(&mut self, other: RecordStats) {
        // Destructured without `..`: a new counter does not compile until it is added here.
        let RecordStats {
            records,
            accepted,
            recovered,
            rejected,
            rejected_by_reason,
            luhn_warnings,
        } = other;
        self.records += records;
        self.accepted += accepted;
        self.recovered += recovered;
        self.rejected += rejected;
        self.luhn_warnings += luhn_warnings;
        for (code, n) in rejected_by_reason {
            *self.rejected_by_reason.entry(code).or_default() += n;
        }
    }
}

impl RecordStats {
    pub fn reject(&mut self, code: &str) {
        self.rejected += 1;
        *self.rejected_by_reason.entry(code.to_owned()).or_default() += 1;
    }
}

const DAY_US: i64 = 86_400_000_000;

/// A number per partition (days or months since the epoch): cheap to compare per record.
pub fn partition_key(usage_start_us: i64, by: PartitionBy) -> i64 {
    let day = usage_start_us.div_euclid(DAY_US);
    match by {
        PartitionBy::Day => day,
        PartitionBy::Month => {
            let date = chrono::DateTime::from_timestamp(day * 86_400, 0).unwrap_or_default();
            i64::from(date.year()) * 12 + i64::from(date.month0())
        }
    }
}

/// The partition directory a usage start time falls in: `usage_date=YYYY-MM-DD` or `usage_month=YYYY-MM`.
pub fn partition_of(usage_start_us: i64, by: PartitionBy) -> String {
    let when = chrono::DateTime::from_timestamp_micros(usage_start_us).unwrap_or_default();
    match by {
        PartitionBy::Day => format!("usage_date={}", when.format("%Y-%m-%d")),
        PartitionBy::Month => format!("usage_month={}", when.format("%Y-%m")),
    }
}

/// Inspects a newly received callback: counts its records, turns bad ones into rejects (with
/// `source` and the requestId), and returns the partitions its good records fall in, with those records.
pub fn inspect(
    cb: &Callback<'_>,
    source: &str,
    strict_luhn: bool,
    by: PartitionBy,
    stats: &mut RecordStats,
    rejects: &mut Vec<RecordReject>,
) -> (BTreeSet<String>, Vec<record::ParsedRecord>) {
    let mut partitions = BTreeSet::new();
    let CallbackKind::Usage(records) = &cb.kind else {
        return (partitions, Vec::new());
    };
    let mut accepted = Vec::with_capacity(records.len());
    let mut seen_keys: Vec<i64> = Vec::new();
    for (i, parsed) in records.parsed(strict_luhn).enumerate() {
        stats.records += 1;
        match parsed {
            Ok(r) => {
                stats.accepted += 1;
                stats.recovered += u64::from(r.recovered);
                stats.luhn_warnings += u64::from(r.luhn_warning);
                let key = partition_key(r.usage_start, by);
                if !seen_keys.contains(&key) {
                    seen_keys.push(key);
                    partitions.insert(partition_of(r.usage_start, by));
                }
                accepted.push(r);
            }
            Err(e) => {
                stats.reject(e.code);
                rejects.push(RecordReject {
                    source: source.to_owned(),
                    request_id: Some(cb.request_id.to_string()),
                    record: Some(i),
                    iccid: e.iccid,
                    field: Some(e.field.to_owned()),
                    raw: e.raw,
                    code: e.code.to_owned(),
                    reason: e.reason,
                });
            }
        }
    }
    (partitions, accepted)
}

/// A record's raw JSON, cut for a rejects file.
pub(crate) fn record_raw(raw: &str) -> String {
    crate::output::rejects::shorten(raw)
}
