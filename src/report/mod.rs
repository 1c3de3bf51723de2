//! The run report: what each stage counted, what was written, where the rejects are, and the exit code.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

use crate::collect::CallbackStats;
use crate::collect::drop_dir::DropDirStats;
use crate::collect::http_listener::ListenerCounts;
use crate::collect::tracker::TrackerStats;
use crate::ingest::IngestStats;
use crate::normalize::RecordStats;
use crate::submit::SubmitReport;
use crate::write::{WriteError, write_atomic};

pub mod html;
pub mod stored;
pub mod summary;

/// Exit code: everything asked for is complete.
pub const EXIT_OK: u8 = 0;
/// Exit code: failed; nothing trustworthy was written for the failed part.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: finished, but with rejects (or, in a full run, failed requests or missing callbacks).
pub const EXIT_PARTIAL: u8 = 3;

pub use crate::write::publish::{OutputReport, PartitionReport};

pub use crate::plan::PlanReport;

/// Collection and completeness (`run`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CollectReport {
    #[serde(flatten)]
    pub tracking: TrackerStats,
    /// Every planned (ICCID, window) by final state: `usage`, `no_usage`, `rejected`,
    /// `failed_request`, `missing`, and `rejected_input` for ICCID list rows that were rejected.
    pub completeness: std::collections::BTreeMap<String, u64>,
    /// The CSV listing every pair that is not usage, with its state and reason.
    pub completeness_file: PathBuf,
}

/// The run report, written as JSON to `{output.dir}/runs/{run_id}.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub command: String,
    pub tool_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// `complete` (exit 0) or `partial` (exit 3: rejects, or fault callbacks).
    pub status: String,
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iccids: Option<IngestStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submit: Option<SubmitReport>,
    /// This worker's claims, when several workers share the range (a PostgreSQL store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<crate::collect::claims::ClaimReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collect: Option<CollectReport>,
    /// What the HTTP listener answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_dir: Option<DropDirStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<CallbackStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<RecordStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputReport>,
    /// Archive files journaled back (`ingest` of an archive directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<RestoreReport>,
    /// What retention moved out of the store (`prune`, or `run` with `state.retain_days`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneReport>,
    /// Rejects files written by this run.
    pub rejects_files: Vec<PathBuf>,
}

impl RunReport {
    /// Adds what a callback source took in; `unmatched` is the tracker's count (a listener's
    /// intake cannot tell an earlier night's request from an unknown one).
    pub fn collected(&mut self, source: crate::collect::source::SourceReport, unmatched: u64) {
        self.rejects_files.extend(source.rejects_file);
        let mut callbacks = source.callbacks;
        if source.listener.is_some() {
            callbacks.unmatched = unmatched;
        }
        self.callbacks = Some(callbacks);
        self.records = Some(source.records);
        self.listener = source.listener;
        self.drop_dir = source.drop_dir;
    }

    pub fn new(run_id: &str, command: &str) -> Self {
        RunReport {
            run_id: run_id.to_owned(),
            command: command.to_owned(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: now_text(),
            finished_at: String::new(),
            status: String::new(),
            exit_code: EXIT_OK,
            iccids: None,
            plan: None,
            submit: None,
            claims: None,
            collect: None,
            listener: None,
            drop_dir: None,
            callbacks: None,
            records: None,
            output: None,
            restored: None,
            prune: None,
            rejects_files: Vec::new(),
        }
    }

    /// Sets the status and exit code from what was counted: journal commits that failed (answered 503)
    /// make it failed; any reject, any request the vendor refused or reports as failed, any job left
    /// unsubmitted or missing makes it partial.
    pub fn finish(&mut self) {
        let rejected = self
            .iccids
            .as_ref()
            .map_or(0, |s| s.rejected + s.files_rejected)
            + self.callbacks.as_ref().map_or(0, |s| s.rejected + s.fault)
            + self.records.as_ref().map_or(0, |s| s.rejected)
            + self
                .drop_dir
                .as_ref()
                .map_or(0, |s| s.rejected + s.too_large)
            + self
                .submit
                .as_ref()
                .map_or(0, |s| s.failed + s.not_submitted)
            + self.collect.as_ref().map_or(0, |c| {
                c.completeness
                    .iter()
                    .filter(|(state, _)| !matches!(state.as_str(), "usage" | "no_usage"))
                    .map(|(_, n)| n)
                    .sum()
            });
        let failed = self.listener.as_ref().map_or(0, |l| l.journal_failures);
        (self.exit_code, self.status) = if failed > 0 {
            (EXIT_FAILED, "failed".to_owned())
        } else if rejected > 0 {
            (EXIT_PARTIAL, "partial".to_owned())
        } else {
            (EXIT_OK, "complete".to_owned())
        };
        self.finished_at = now_text();
    }

    /// Writes the report atomically to `{out_dir}/runs/{run_id}.json`, and its page beside it
    /// (`{run_id}.html`, see [`html`]); returns the JSON's path.
    pub fn save(&self, out_dir: &Path) -> Result<PathBuf, WriteError> {
        let path = out_dir.join("runs").join(format!("{}.json", self.run_id));
        let value = serde_json::to_value(self).map_err(|e| WriteError::io(&path, e.into()))?;
        let json =
            serde_json::to_vec_pretty(&value).map_err(|e| WriteError::io(&path, e.into()))?;
        // The page first: the JSON, whose path is printed last, is the record that the run ended.
        write_atomic(&summary::html_path(&path), html::render(&value).as_bytes())?;
        write_atomic(&path, &json)?;
        Ok(path)
    }

    /// The summary block (see [`summary::block`]) for this report saved at `report_path`.
    pub fn summary_block(&self, report_path: &Path) -> Vec<String> {
        let value = serde_json::to_value(self).unwrap_or_default();
        summary::block(&value, report_path)
    }

    /// The one-line summary printed before the report's path.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{} {}", self.command, self.status)];
        if let Some(s) = &self.iccids {
            parts.push(format!(
                "{} files, {} rows: {} ICCIDs, {} duplicates, {} rejected, {} Luhn warnings",
                s.files, s.rows, s.accepted, s.duplicates, s.rejected, s.luhn_warnings
            ));
        }
        if let Some(p) = &self.plan {
            parts.push(format!(
                "{}..{}: {} windows, {} jobs ({} already submitted)",
                p.from, p.to, p.windows, p.jobs, p.already_submitted
            ));
        }
        if let Some(s) = &self.submit {
            parts.push(format!(
                "{} submitted, {} refused, {} left for later ({} attempts, {} retries)",
                s.submitted, s.failed, s.not_submitted, s.attempts, s.retries
            ));
            if let Some(why) = &s.stopped {
                parts.push(format!("stopped early: {why}"));
            }
        }
        if let Some(c) = &self.collect {
            let states: Vec<String> = c
                .completeness
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            parts.push(format!(
                "{} jobs complete, {} re-requested; ICCID-days: {}",
                c.tracking.complete,
                c.tracking.resubmitted,
                states.join(", ")
            ));
        }
        if let Some(l) = &self.listener {
            parts.push(format!(
                "listener: {} acknowledged, {} unauthorized, {} malformed, {} journal failures",
                l.acknowledged, l.unauthorized, l.malformed, l.journal_failures
            ));
        }
        if let Some(d) = &self.drop_dir {
            parts.push(format!(
                "{} files ({} rejected, {} skipped)",
                d.files,
                d.rejected,
                d.skipped + d.too_large
            ));
        }
        if let Some(c) = &self.callbacks {
            parts.push(format!(
                "{} callbacks ({} new, {} already journaled, {} rejected)",
                c.received, c.journaled, c.already_journaled, c.rejected
            ));
        }
        if let Some(r) = &self.records {
            parts.push(format!(
                "{} records ({} accepted, {} recovered, {} rejected)",
                r.records, r.accepted, r.recovered, r.rejected
            ));
        }
        if let Some(o) = &self.output {
            parts.push(format!(
                "{} rows in {} partitions ({} files)",
                o.rows_written,
                o.partitions.len(),
                o.files_written
            ));
        }
        if let Some(r) = &self.restored {
            parts.push(format!(
                "{} archived callbacks from {} files ({} new)",
                r.callbacks, r.files, r.journaled
            ));
        }
        if let Some(p) = &self.prune {
            parts.push(format!(
                "{} callbacks archived (received before {}), store {} -> {} bytes",
                p.counts.callbacks_archived, p.horizon, p.store_bytes_before, p.store_bytes_after
            ));
        }
        parts.join("; ")
    }
}

/// What a prune did (docs/architecture.md, invariant 9: the store stays bounded under
/// `state.retain_days`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Callbacks received before this moved to the archive (RFC 3339, UTC).
    pub horizon: String,
    #[serde(flatten)]
    pub counts: crate::state::PruneCounts,
    /// Archive files written.
    pub files: Vec<PathBuf>,
    pub archive_bytes: u64,
    /// Files an interrupted earlier prune left, removed (their callbacks were still journaled).
    pub orphans_removed: u64,
    /// The state store's size on disk (database and its WAL) before and after.
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
}

pub use crate::collect::archive::RestoreReport;

/// `tsusage status` as text: jobs by state, requests outstanding and overdue (past
/// `callbacks.deadline_secs`), the last run's outcome, and with a range, each window's completeness.
pub fn status(
    store: &dyn crate::state::Store,
    config: &crate::config::Config,
    range: Option<crate::plan::DateRange>,
) -> Result<String, crate::state::StateError> {
    let mut lines = Vec::new();
    if let Some(range) = range {
        let from = format!("{}T00:00:00Z", range.from);
        let to = format!("{}T00:00:00Z", range.to + chrono::Days::new(1));
        let mut windows: std::collections::BTreeMap<(String, String), Vec<(String, u64)>> =
            Default::default();
        for w in store.window_status_counts(&from, &to)? {
            windows
                .entry((w.window_start, w.window_end))
                .or_default()
                .push((w.status, w.jobs));
        }
        let planned_days = (range.to - range.from).num_days() + 1;
        lines.push(format!(
            "windows of {}..{} ({planned_days} days):",
            range.from, range.to
        ));
        let covered = |day: &str| {
            windows
                .keys()
                .any(|(start, end)| start.as_str() <= day && day < end.as_str())
        };
        let mut day = range.from;
        while day <= range.to {
            let text = format!("{day}T00:00:00Z");
            if !covered(&text) {
                lines.push(format!("  {day}: never requested"));
            }
            day = day + chrono::Days::new(1);
        }
        for ((start, end), statuses) in &windows {
            let total: u64 = statuses.iter().map(|(_, n)| n).sum();
            let complete = statuses
                .iter()
                .find(|(s, _)| s == crate::state::JobStatus::Complete.as_str())
                .map_or(0, |(_, n)| *n);
            let state = if complete == total {
                "complete"
            } else {
                "incomplete"
            };
            let detail: Vec<String> = statuses.iter().map(|(s, n)| format!("{n} {s}")).collect();
            lines.push(format!(
                "  {}..{}: {state} ({complete}/{total} jobs complete: {})",
                &start[..10.min(start.len())],
                &end[..10.min(end.len())],
                detail.join(", ")
            ));
        }
    }
    let counts = store.job_status_counts()?;
    let total: u64 = counts.values().sum();
    let by_state: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    lines.push(format!(
        "jobs: {total}{}{}",
        if by_state.is_empty() { "" } else { ": " },
        by_state.join(", ")
    ));
    let outstanding = store.outstanding_jobs()?;
    let deadline = chrono::Duration::seconds(
        i64::try_from(config.callbacks.deadline_secs).unwrap_or(i64::MAX),
    );
    let now = chrono::Utc::now();
    let overdue: Vec<&crate::state::OutstandingJob> = outstanding
        .iter()
        .filter(|job| {
            chrono::DateTime::parse_from_rfc3339(&job.last_submitted_at)
                .is_ok_and(|t| now.signed_duration_since(t) > deadline)
        })
        .collect();
    lines.push(format!(
        "requests outstanding: {} ({} overdue, past callbacks.deadline_secs = {})",
        outstanding.len(),
        overdue.len(),
        config.callbacks.deadline_secs
    ));
    for job in overdue.iter().take(20) {
        lines.push(format!(
            "  overdue: job {} window {} requested {}",
            job.job_id, job.window_start, job.last_submitted_at
        ));
    }
    match store.last_run()? {
        Some(run) => lines.push(format!(
            "last run: {} ({}) finished {}, exit code {}; report: {}",
            run.run_id,
            run.command,
            run.finished_at,
            run.exit_code,
            config
                .output
                .dir
                .join("runs")
                .join(format!("{}.json", run.run_id))
                .display()
        )),
        None => lines.push("last run: none".into()),
    }
    Ok(lines.join("\n"))
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The run id the `tsusage` command chose before anything ran (see [`use_run_id`]).
static COMMAND_RUN_ID: OnceLock<String> = OnceLock::new();

/// Makes [`new_run_id`] return `id` from now on in this process: the `tsusage` command picks its run
/// id first, so that every log line, from the first, carries the id of the report the command
/// writes. Returns false when an id was already set (it is kept).
pub fn use_run_id(id: String) -> bool {
    COMMAND_RUN_ID.set(id).is_ok()
}

/// The run id for a command's report: the one set by [`use_run_id`], else a fresh one (UTC time to
/// the second plus a process-unique suffix, sortable by start).
pub fn new_run_id() -> String {
    if let Some(id) = COMMAND_RUN_ID.get() {
        return id.clone();
    }
    fresh_run_id()
}

/// A new run id, whatever [`use_run_id`] set.
pub fn fresh_run_id() -> String {
    let now = chrono::Utc::now();
    format!(
        "{}-{:05x}",
        now.format("%Y%m%dT%H%M%SZ"),
        (std::process::id() ^ now.timestamp_subsec_micros()) & 0xfffff
    )
}
