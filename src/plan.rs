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

/// What planning produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanReport {
    /// First day asked for (UTC).
    pub from: String,
    /// Last day asked for, inclusive.
    pub to: String,
    pub windows: u64,
    pub jobs: u64,
    /// Jobs recorded as intent for the first time by this run.
    pub new_jobs: u64,
    /// Jobs skipped because an earlier run already has their requestId.
    pub already_submitted: u64,
    /// Jobs skipped because the vendor refused them in an earlier run.
    pub already_failed: u64,
    /// Jobs skipped because an earlier run has all their callbacks.
    pub already_complete: u64,
    /// Jobs an earlier run recorded as intent without a requestId (never sent, or killed between the
    /// POST and the record): sent again, which is harmless (the data collapses).
    pub unknown_outcome: u64,
    /// Their job ids (the first 1,000).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_outcome_jobs: Vec<String>,
    /// Jobs asked again although done (`--force`, or `plan.lookback_days`).
    pub requested_again: u64,
}

/// Where a job stands in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobStatus {
    /// Recorded as intent, no requestId yet (or its POST outcome is unknown).
    Planned,
    /// A requestId is recorded.
    Submitted,
    /// The vendor refused the request (or reported it failed).
    Failed,
    /// All its callbacks are in: usage or no usage for every ICCID.
    Complete,
    /// No callbacks by the deadline after every re-request.
    Missing,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Planned,
        JobStatus::Submitted,
        JobStatus::Failed,
        JobStatus::Complete,
        JobStatus::Missing,
    ];

    /// The name the store keeps (and `status` prints).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Planned => "planned",
            JobStatus::Submitted => "submitted",
            JobStatus::Failed => "failed",
            JobStatus::Complete => "complete",
            JobStatus::Missing => "missing",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Which planned jobs a command sends and which it only tracks: the one copy of these rules, shared
/// by `run` and `submit`.
#[derive(Debug, Default)]
pub struct Selection {
    /// Jobs to ask ThingSpace for now.
    pub to_send: Vec<Job>,
    /// Jobs whose callbacks this command waits for: `to_send` and those an earlier command sent
    /// that are still waiting (`submitted`).
    pub tracked: Vec<Job>,
    /// Jobs skipped because done: their counts and the reasons, for the run report.
    pub report: PlanReport,
}

/// Splits `jobs` by the status an earlier command left them in (`earlier`, by job id; absent means
/// never planned before):
/// - `complete`, `failed`: done, skipped; `submitted`: tracked, not sent again
///   (docs/architecture.md, invariant 2);
/// - `planned` (intent without requestId: never sent, or killed between the POST and the record),
///   `missing`, or new: sent;
/// - with `again` true for a job (`--force`, or a `plan.lookback_days` day), every status is sent.
pub fn select(
    jobs: Vec<Job>,
    earlier: &std::collections::HashMap<String, JobStatus>,
    again: impl Fn(&Job) -> bool,
) -> Selection {
    let mut out = Selection::default();
    let report = &mut out.report;
    report.jobs = jobs.len() as u64;
    for job in jobs {
        let status = earlier.get(job.id.as_str()).copied();
        let again = again(&job);
        match status {
            Some(JobStatus::Complete) if !again => report.already_complete += 1,
            Some(JobStatus::Failed) if !again => report.already_failed += 1,
            Some(JobStatus::Submitted) if !again => {
                report.already_submitted += 1;
                out.tracked.push(job);
            }
            status => {
                if status == Some(JobStatus::Planned) {
                    // Sending again is harmless: the data collapses on the business key.
                    report.unknown_outcome += 1;
                    if report.unknown_outcome_jobs.len() < MAX_LISTED_JOBS {
                        report.unknown_outcome_jobs.push(job.id.to_string());
                    }
                } else if status.is_some() {
                    report.requested_again += 1;
                }
                out.to_send.push(job.clone());
                out.tracked.push(job);
            }
        }
    }
    out
}

/// Job ids listed in a report at most (the counts are always complete).
const MAX_LISTED_JOBS: usize = 1000;

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

    #[test]
    fn select_sends_new_and_unsent_jobs_tracks_submitted_and_skips_done_ones() {
        let w = windows(d("2021-08-14"), d("2021-08-15"), 1).expect("range");
        let jobs = plan("0000123456-00001", &ids(30), &w, 10);
        let (first_day, second_day) = jobs.split_at(3);
        let status = |j: &Job, s: JobStatus| (j.id.to_string(), s);
        let earlier: std::collections::HashMap<String, JobStatus> = [
            status(&second_day[0], JobStatus::Complete),
            status(&second_day[1], JobStatus::Submitted),
            status(&second_day[2], JobStatus::Planned),
            status(&first_day[0], JobStatus::Complete),
            status(&first_day[1], JobStatus::Failed),
        ]
        .into();
        // The first day is a lookback day: asked again whatever its status.
        let lookback = |j: &Job| j.window.start < d("2021-08-15");
        let s = select(jobs.clone(), &earlier, lookback);
        let sent: Vec<&Job> = s.to_send.iter().collect();
        assert_eq!(
            sent,
            [&first_day[0], &first_day[1], &first_day[2], &second_day[2]]
        );
        assert_eq!(s.tracked.len(), 5, "the sent ones and the submitted one");
        assert!(s.tracked.contains(&second_day[1]));
        let r = &s.report;
        assert_eq!(
            (
                r.jobs,
                r.already_complete,
                r.already_submitted,
                r.unknown_outcome
            ),
            (6, 1, 1, 1)
        );
        assert_eq!(
            r.requested_again, 2,
            "the lookback day's complete and failed jobs"
        );
        assert_eq!(r.unknown_outcome_jobs, [second_day[2].id.to_string()]);

        // Without lookback: nothing done is sent again.
        let s = select(jobs, &earlier, |_| false);
        assert_eq!(s.to_send.len(), 2, "the planned one and the never-seen one");
        assert_eq!((s.report.already_complete, s.report.already_failed), (2, 1));
    }
}
