//! Stage 5, normalize: callback payloads → typed [`UsageRow`]s, strictly, one parser for every source.
//!
//! - [`payload`]: a body → credentials stripped → [`payload::Callback`] (usage, completion, fault).
//! - [`record`]: one usage record → [`record::ParsedRecord`] or a reject naming the field.
//! - [`values`]: the value policy for counts and timestamps.
//!
//! [`inspect`] runs when a callback is journaled (counts, rejects, which partitions it touches);
//! [`Collapser`] rebuilds a partition from the journal: one row per (iccid, usage_start, usage_end),
//! the most recently received value winning.

pub mod payload;
pub mod record;
pub mod values;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::Datelike;
use serde::Serialize;

use crate::config::PartitionBy;
use crate::ingest::Iccid;
use crate::write::rejects::RecordReject;
use payload::{Callback, CallbackKind};

/// One output row (Parquet schema v1, DESIGN §5). Times are µs since the epoch, UTC.
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
/// `source` and the requestId), and returns the partitions its good records fall in.
pub fn inspect(
    cb: &Callback<'_>,
    source: &str,
    strict_luhn: bool,
    by: PartitionBy,
    stats: &mut RecordStats,
    rejects: &mut Vec<RecordReject>,
) -> BTreeSet<String> {
    let mut partitions = BTreeSet::new();
    let CallbackKind::Usage(records) = &cb.kind else {
        return partitions;
    };
    let mut seen_keys: Vec<i64> = Vec::new();
    for (i, raw) in records.iter().enumerate() {
        stats.records += 1;
        match record::parse_record(raw, strict_luhn) {
            Ok(r) => {
                stats.accepted += 1;
                stats.recovered += u64::from(r.recovered);
                stats.luhn_warnings += u64::from(r.luhn_warning);
                let key = partition_key(r.usage_start, by);
                if !seen_keys.contains(&key) {
                    seen_keys.push(key);
                    partitions.insert(partition_of(r.usage_start, by));
                }
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
    partitions
}

/// A record's raw JSON, cut for a rejects file.
pub(crate) fn record_raw(raw: &str) -> String {
    crate::write::rejects::shorten(raw)
}

type RowKey = (Iccid, i64, i64);

/// Collapses usage records into one row per (iccid, usage_start, usage_end): feed callbacks oldest
/// first and the newest value wins. Counts how many records were superseded.
#[derive(Debug)]
pub struct Collapser {
    partition: String,
    by: PartitionBy,
    strict_luhn: bool,
    default_account: Arc<str>,
    rows: HashMap<RowKey, UsageRow>,
    /// The last partition key looked at and whether it is this partition's.
    last_key: Option<(i64, bool)>,
    /// Records read for this partition.
    pub records_in: u64,
    /// Records replaced by a newer one for the same key.
    pub collapsed: u64,
}

impl Collapser {
    pub fn new(
        partition: &str,
        by: PartitionBy,
        strict_luhn: bool,
        default_account: Arc<str>,
    ) -> Self {
        Collapser {
            partition: partition.to_owned(),
            by,
            strict_luhn,
            default_account,
            rows: HashMap::new(),
            last_key: None,
            records_in: 0,
            collapsed: 0,
        }
    }

    /// Adds the good records of `body` that fall in this partition. Bad records were reported when
    /// the callback was journaled and are skipped here.
    pub fn add(&mut self, body: &str, received_at: i64, account_name: Option<&str>) {
        let Ok(cb) = payload::parse_callback(body) else {
            return;
        };
        let CallbackKind::Usage(records) = &cb.kind else {
            return;
        };
        let account: Arc<str> = match account_name {
            Some(a) if *a != *self.default_account => Arc::from(a),
            _ => self.default_account.clone(),
        };
        let request_id: Arc<str> = Arc::from(cb.request_id.as_ref());
        for raw in records {
            let Ok(r) = record::parse_record(raw, self.strict_luhn) else {
                continue;
            };
            if !self.is_mine(r.usage_start) {
                continue;
            }
            self.records_in += 1;
            let row = UsageRow {
                account_name: account.clone(),
                iccid: r.iccid,
                usage_start: r.usage_start,
                usage_end: r.usage_end,
                data_usage_bytes: r.data_usage_bytes,
                sms_usage: r.sms_usage,
                mo_sms: r.mo_sms,
                mt_sms: r.mt_sms,
                request_id: request_id.clone(),
                received_at,
            };
            if self
                .rows
                .insert((r.iccid, r.usage_start, r.usage_end), row)
                .is_some()
            {
                self.collapsed += 1;
            }
        }
    }

    fn is_mine(&mut self, usage_start: i64) -> bool {
        let key = partition_key(usage_start, self.by);
        match self.last_key {
            Some((last, mine)) if last == key => mine,
            _ => {
                let mine = partition_of(usage_start, self.by) == self.partition;
                self.last_key = Some((key, mine));
                mine
            }
        }
    }

    /// The collapsed rows, sorted by (iccid, usage_start, usage_end) for compression and stable output.
    pub fn into_rows(self) -> Vec<UsageRow> {
        let mut rows: Vec<UsageRow> = self.rows.into_values().collect();
        rows.sort_unstable_by_key(|r| (r.iccid, r.usage_start, r.usage_end));
        rows
    }
}
