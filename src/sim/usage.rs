//! Deterministic usage: what the simulator reports for an ICCID over a window, a pure function of both.
//!
//! Each ICCID has, for each UTC day, a day total of data bytes, mobile-originated and mobile-terminated
//! SMS, derived from a hash of the ICCID and the day number. Within a day a count accrues linearly:
//! after `s` seconds of the day, `floor(total * s / 86400)` has accrued. A window's usage is what accrued
//! between its start and its end, day by day, so usage is additive: for any whole second `m` between
//! `a` and `b`, `usage(a, b) == usage(a, m) + usage(m, b)`, and a whole day reports the day total.
//! Sub-second parts of the window's ends are ignored.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::faults::splitmix64;

/// Seconds in a UTC day.
const DAY_SECS: i64 = 86_400;
/// Percent of ICCIDs that report no usage at all, for any window.
const SILENT_PERCENT: u64 = 5;
/// Most SMS per direction per day.
const MAX_SMS_PER_DAY: u64 = 4;

/// One ICCID's usage over a window, as the simulator reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimUsage {
    /// Data, in bytes.
    pub data_bytes: u64,
    /// SMS sent or received: always `mo_sms + mt_sms`.
    pub sms: u64,
    /// SMS sent by the device.
    pub mo_sms: u64,
    /// SMS received by the device.
    pub mt_sms: u64,
}

/// The usage the simulator reports for `iccid` over `[start, end)`.
///
/// `None` means the ICCID reports no usage at all (the callbacks carry no record for it): a fixed ~5% of
/// ICCIDs, chosen by a hash of the ICCID alone. An empty or reversed window reports zero usage.
///
/// ```
/// use chrono::{TimeZone, Utc};
/// use tsusage::sim::usage_for;
///
/// let day = |d| Utc.with_ymd_and_hms(2021, 8, d, 0, 0, 0).single().expect("a valid date");
/// let iccid = "89148000000800139708";
/// if let Some(two_days) = usage_for(iccid, day(15), day(17)) {
///     let first = usage_for(iccid, day(15), day(16)).expect("the same ICCID");
///     let second = usage_for(iccid, day(16), day(17)).expect("the same ICCID");
///     assert_eq!(two_days.data_bytes, first.data_bytes + second.data_bytes);
///     assert_eq!(two_days.sms, two_days.mo_sms + two_days.mt_sms);
/// }
/// ```
pub fn usage_for(iccid: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> Option<SimUsage> {
    let device = device_seed(iccid);
    if device % 100 < SILENT_PERCENT {
        return None;
    }
    let (start, end) = (start.timestamp(), end.timestamp());
    let mut usage = SimUsage::default();
    if start >= end {
        return Some(usage);
    }
    let class = DataClass::of(device);
    let mut day = start.div_euclid(DAY_SECS);
    let last_day = (end - 1).div_euclid(DAY_SECS);
    while day <= last_day {
        let day_start = day * DAY_SECS;
        let from = start.max(day_start) - day_start;
        let to = end.min(day_start + DAY_SECS) - day_start;
        let totals = DayTotals::of(device, day, class);
        usage.data_bytes += accrued(totals.data_bytes, from, to);
        usage.mo_sms += accrued(totals.mo_sms, from, to);
        usage.mt_sms += accrued(totals.mt_sms, from, to);
        day += 1;
    }
    usage.sms = usage.mo_sms + usage.mt_sms;
    Some(usage)
}

/// A hash of the ICCID's bytes alone.
fn device_seed(iccid: &str) -> u64 {
    let digest = Sha256::digest(iccid.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// How much data a device moves on a typical day.
#[derive(Debug, Clone, Copy)]
enum DataClass {
    /// Up to 1 MiB a day: meters, trackers.
    Light,
    /// Up to 50 MiB a day.
    Medium,
    /// Up to 2 GiB a day: routers, cameras.
    Heavy,
}

impl DataClass {
    fn of(device: u64) -> DataClass {
        match (device >> 8) % 10 {
            0..=2 => DataClass::Light,
            3..=8 => DataClass::Medium,
            _ => DataClass::Heavy,
        }
    }

    fn max_bytes_per_day(self) -> u64 {
        match self {
            DataClass::Light => 1 << 20,
            DataClass::Medium => 50 << 20,
            DataClass::Heavy => 2 << 30,
        }
    }
}

/// One device's totals for one whole UTC day.
struct DayTotals {
    data_bytes: u64,
    mo_sms: u64,
    mt_sms: u64,
}

impl DayTotals {
    fn of(device: u64, day: i64, class: DataClass) -> DayTotals {
        let a = splitmix64(device ^ splitmix64(day as u64));
        let b = splitmix64(a);
        // One day in eight a device is idle.
        let data_bytes = if a.is_multiple_of(8) {
            0
        } else {
            (a >> 3) % (class.max_bytes_per_day() + 1)
        };
        DayTotals {
            data_bytes,
            mo_sms: b % (MAX_SMS_PER_DAY + 1),
            mt_sms: (b >> 16) % (MAX_SMS_PER_DAY + 1),
        }
    }
}

/// What of a day total `total` accrued between second `from` and second `to` of the day.
fn accrued(total: u64, from: i64, to: i64) -> u64 {
    let at = |s: i64| (u128::from(total) * s as u128 / DAY_SECS as u128) as u64;
    at(to) - at(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().expect("valid time")
    }

    const DAY0: i64 = 1_628_985_600; // 2021-08-15T00:00:00Z

    #[test]
    fn about_five_percent_of_iccids_report_nothing() {
        let silent = (0..10_000u64)
            .filter(|i| {
                usage_for(&format!("8914800000{i:010}"), at(DAY0), at(DAY0 + DAY_SECS)).is_none()
            })
            .count();
        assert!((350..=650).contains(&silent), "{silent} of 10000 silent");
    }

    #[test]
    fn whole_day_reports_the_day_total_and_splits_add_up() {
        for i in 0..200u64 {
            let iccid = format!("8914800000{i:010}");
            let Some(day) = usage_for(&iccid, at(DAY0), at(DAY0 + DAY_SECS)) else {
                continue;
            };
            let m = DAY0 + (i as i64 * 7919) % DAY_SECS;
            let a = usage_for(&iccid, at(DAY0), at(m)).expect("same device");
            let b = usage_for(&iccid, at(m), at(DAY0 + DAY_SECS)).expect("same device");
            assert_eq!(day.data_bytes, a.data_bytes + b.data_bytes);
            assert_eq!(day.mo_sms, a.mo_sms + b.mo_sms);
            assert_eq!(day.sms, day.mo_sms + day.mt_sms);
        }
    }

    #[test]
    fn empty_or_reversed_window_reports_zero() {
        let iccid = (0..100u64)
            .map(|i| format!("8914800000{i:010}"))
            .find(|c| usage_for(c, at(0), at(1)).is_some())
            .expect("some device reports");
        assert_eq!(
            usage_for(&iccid, at(DAY0), at(DAY0)),
            Some(SimUsage::default())
        );
        assert_eq!(
            usage_for(&iccid, at(DAY0 + 5), at(DAY0)),
            Some(SimUsage::default())
        );
    }
}
