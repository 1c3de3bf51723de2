//! Stage 2, plan: a date range and the ICCID list → one [`Job`] per (window, chunk of ICCIDs).
//!
//! Windows are UTC days grouped by `plan.window_days`, `[start, end)`, the last one cut at the end of
//! the range. Chunks are `plan.chunk_size` ICCIDs in list order. A job's id is a hash of the account,
//! the window and the sorted ICCIDs, so the same request planned again (a rerun, a resume) is the
//! same job.

use std::sync::Arc;

use std::fmt;

use chrono::{Days, NaiveDate};
use sha2::{Digest, Sha256};

use crate::ingest::Iccid;

/// A request window of whole UTC days: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub start: NaiveDate,
    /// Exclusive.
    pub end: NaiveDate,
}

impl Window {
    /// `startTime` as the vendor's example writes it: `2021-08-15T00:00:00Z`.
    pub fn start_time(&self) -> String {
        format!("{}T00:00:00Z", self.start.format("%Y-%m-%d"))
    }

    /// `endTime`, exclusive: `2021-08-16T00:00:00Z`.
    pub fn end_time(&self) -> String {
        format!("{}T00:00:00Z", self.end.format("%Y-%m-%d"))
    }

    pub fn days(&self) -> i64 {
        (self.end - self.start).num_days()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// A deterministic job id: hex of the first 16 bytes of SHA-256(account, window, sorted ICCIDs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(String);

impl JobId {
    pub fn new(account: &str, window: Window, iccids: &[Iccid]) -> JobId {
        let mut sorted: Vec<&str> = iccids.iter().map(Iccid::as_str).collect();
        sorted.sort_unstable();
        let mut hash = Sha256::new();
        hash.update(account.as_bytes());
        hash.update(b"\n");
        hash.update(window.start_time().as_bytes());
        hash.update(b"\n");
        hash.update(window.end_time().as_bytes());
        for id in sorted {
            hash.update(b"\n");
            hash.update(id.as_bytes());
        }
        let digest = hash.finalize();
        JobId(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// An id read back from the state store.
    pub fn from_stored(text: String) -> JobId {
        JobId(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One usage request to make: an account, a window and a chunk of ICCIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub account_name: String,
    pub window: Window,
    /// Sorted; shared by the jobs of every window (one copy per chunk, however many windows).
    pub iccids: Arc<[Iccid]>,
}

/// A date range problem on the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--from {from} is after --to {to}")]
    Reversed { from: NaiveDate, to: NaiveDate },
    #[error("{0}: not a date (expected YYYY-MM-DD)")]
    BadDate(String),
    #[error("give either --date D, or both --from D1 and --to D2")]
    Range,
}

/// The days asked for: `from..=to`, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub from: NaiveDate,
    /// Inclusive.
    pub to: NaiveDate,
}

impl DateRange {
    /// From the command line: `--date D`, or `--from D1 --to D2`, or (nothing) yesterday, UTC.
    pub fn from_args(
        date: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<DateRange, PlanError> {
        let range = match (date, from, to) {
            (Some(d), None, None) => {
                let d = parse_date(d)?;
                DateRange { from: d, to: d }
            }
            (None, Some(f), Some(t)) => DateRange {
                from: parse_date(f)?,
                to: parse_date(t)?,
            },
            (None, None, None) => {
                let yesterday = chrono::Utc::now().date_naive() - Days::new(1);
                DateRange {
                    from: yesterday,
                    to: yesterday,
                }
            }
            _ => return Err(PlanError::Range),
        };
        if range.from > range.to {
            return Err(PlanError::Reversed {
                from: range.from,
                to: range.to,
            });
        }
        Ok(range)
    }
}

/// Parses a `YYYY-MM-DD` command-line date.
pub fn parse_date(text: &str) -> Result<NaiveDate, PlanError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| PlanError::BadDate(text.to_owned()))
}

/// The windows covering `from..=to` (inclusive UTC days), `window_days` each, the last one cut short.
pub fn windows(from: NaiveDate, to: NaiveDate, window_days: u32) -> Result<Vec<Window>, PlanError> {
    if from > to {
        return Err(PlanError::Reversed { from, to });
    }
    let end = to + Days::new(1);
    let mut out = Vec::new();
    let mut start = from;
    while start < end {
        let next = (start + Days::new(u64::from(window_days.max(1)))).min(end);
        out.push(Window { start, end: next });
        start = next;
    }
    Ok(out)
}

/// One job per (window, chunk): windows in order, chunks in list order within each window (each
/// chunk's ICCIDs sorted).
pub fn plan(account: &str, iccids: &[Iccid], windows: &[Window], chunk_size: u32) -> Vec<Job> {
    let size = usize::try_from(chunk_size).unwrap_or(usize::MAX).max(1);
    let chunks: Vec<Arc<[Iccid]>> = iccids
        .chunks(size)
        .map(|chunk| {
            let mut chunk = chunk.to_vec();
            chunk.sort_unstable();
            Arc::from(chunk)
        })
        .collect();
    let mut jobs = Vec::with_capacity(windows.len() * chunks.len());
    for &window in windows {
        for chunk in &chunks {
            jobs.push(Job {
                id: JobId::new(account, window, chunk),
                account_name: account.to_owned(),
                window,
                iccids: chunk.clone(),
            });
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> NaiveDate {
        parse_date(text).expect("date")
    }

    fn ids(n: u32) -> Vec<Iccid> {
        (0..n)
            .map(|i| Iccid::parse(&format!("8914800000000{i:07}")).expect("iccid"))
            .collect()
    }

    #[test]
    fn windows_cover_the_inclusive_range_and_cut_the_last() {
        let w = windows(d("2021-08-15"), d("2021-08-15"), 1).expect("one day");
        assert_eq!(
            w,
            vec![Window {
                start: d("2021-08-15"),
                end: d("2021-08-16")
            }]
        );
        assert_eq!(w[0].start_time(), "2021-08-15T00:00:00Z");
        assert_eq!(w[0].end_time(), "2021-08-16T00:00:00Z");
        let w = windows(d("2021-08-01"), d("2021-08-10"), 7).expect("range");
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[1].start, w[1].end, w[1].days()),
            (d("2021-08-08"), d("2021-08-11"), 3)
        );
        assert!(windows(d("2021-08-02"), d("2021-08-01"), 1).is_err());
    }

    #[test]
    fn one_job_per_window_and_chunk_with_stable_ids() {
        let iccids = ids(450);
        let w = windows(d("2021-08-15"), d("2021-08-16"), 1).expect("range");
        let jobs = plan("0000123456-00001", &iccids, &w, 200);
        assert_eq!(jobs.len(), 6);
        assert_eq!(
            jobs.iter().map(|j| j.iccids.len()).collect::<Vec<_>>(),
            [200, 200, 50, 200, 200, 50]
        );
        let again = plan("0000123456-00001", &iccids, &w, 200);
        assert_eq!(jobs, again, "planning is deterministic");
        let mut reversed = jobs[0].iccids.to_vec();
        reversed.reverse();
        assert_eq!(
            JobId::new("0000123456-00001", w[0], &reversed),
            jobs[0].id,
            "order-independent"
        );
        assert_ne!(
            JobId::new("0000123456-00002", w[0], &jobs[0].iccids),
            jobs[0].id
        );
        assert_ne!(jobs[0].id, jobs[3].id, "windows differ");
        assert_eq!(jobs[0].id.as_str().len(), 32);
    }
}
