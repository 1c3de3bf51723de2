//! The state store: the durable truth (callback journal, jobs, requests, runs, written partitions).
//!
//! [`Store`] holds every durable operation the stages use, 34 methods (grouped by role in
//! docs/architecture.md, "The state store"): the run lock and the coordination of workers (claims,
//! the shared rate budget), jobs and requests, runs, the journal, written partitions, the archive,
//! and a health ping.
//!
//! Its rules are written once: every statement and transaction in `rules` ([`SqlStore`]), the
//! schema in `schema`, over the small executor interface of `sql` that each backend implements.
//! [`SqliteStore`] is the embedded store (one SQLite file in WAL mode, `state.path`); [`PgStore`] is
//! the same schema on PostgreSQL (`state.url`), for several listeners and workers sharing one store.

mod lock;
mod postgres;
mod rules;
mod schema;
mod segments;
mod shared;
mod sql;
mod sqlite;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

pub use lock::RunLock;
pub use postgres::PgStore;
pub use rules::{SqlStore, encode_body};
pub use segments::{Frames, Packed, Placement, SEGMENT_DIR_EXTENSION};
pub use shared::AsyncStore;
pub use sqlite::SqliteStore;
pub use writer::{AfterCommit, Journalable, StateWriter};

use crate::plan::Job;

/// A state store failure. Nothing after it can be trusted, so the command stops (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend (SQLite, or another implementation of [`Store`]) failed.
    #[error("state store {path}: {source}")]
    Backend {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("state store {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("state store {path}: cannot create its directory: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A callback about to be journaled: its body already stripped of credentials.
#[derive(Debug, Clone)]
pub struct NewCallback<'a> {
    pub request_id: &'a str,
    /// `usage`, `completion` or `fault`.
    pub kind: &'static str,
    /// Where it came from: a file path (with line or index) or `listener`.
    pub source: &'a str,
    /// The body's text (credentials removed); each store encodes it its own way.
    pub body: &'a str,
    /// The body already compressed for a row ([`encode_body`], with its `body_encoding`): the
    /// writer thread's callers do it in their own tasks, in parallel, so that the one thread that
    /// commits does not. `None` leaves it to the store.
    pub encoded: Option<(&'a [u8], &'static str)>,
    /// The body already in a segment frame ([`Frames::pack`]), for the SQLite store to append as
    /// it is; other stores use `body`.
    pub packed: Option<(&'a Packed, Placement)>,
    /// [`body_digest`] of the body: the journal's identity of a callback.
    pub digest: &'a Digest,
    /// Output partitions its usage records fall in (empty for completion and fault callbacks).
    pub partitions: &'a BTreeSet<String>,
    /// When it was first received (µs), for a callback restored from the archive; `None` for one
    /// received now (it takes the commit's time).
    pub received_at: Option<i64>,
}

/// The journal's identity of a callback body: its XXH3-128 hash.
pub type Digest = [u8; 16];

/// The [`Digest`] of a body's text.
///
/// XXH3-128, not a cryptographic hash: it only tells a redelivered body from a new one. Forging a
/// collision would take someone who knows, before it arrives, the exact bytes of a callback the
/// vendor has yet to send, and who holds the callback credentials. That person could send usage
/// of their own in any case. An accidental collision among 2^64 bodies has a chance of about 2^-64.
/// Rows journaled before schema v5 keep their 32-byte SHA-256 in the same column, so the two never
/// meet.
pub fn body_digest(body: &str) -> Digest {
    xxhash_rust::xxh3::xxh3_128(body.as_bytes()).to_be_bytes()
}

/// What the journal did with one callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journaled {
    /// Newly stored under this journal id.
    New(i64),
    /// The same body was journaled before (a re-dropped file, a redelivery with identical content).
    AlreadyJournaled,
}

/// A partition whose journal holds callbacks newer than its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPartition {
    /// The partition directory name, e.g. `usage_date=2021-08-15`.
    pub partition: String,
    /// The highest journal id that touches it; writing it covers everything up to here.
    pub through_id: i64,
}

/// A journaled callback, as read back for normalization.
#[derive(Debug, Clone)]
pub struct StoredCallback {
    pub id: i64,
    pub request_id: String,
    /// µs since the epoch, UTC.
    pub received_at: i64,
    pub body: String,
    /// The account of the job this request belongs to, when the request is known.
    pub account_name: Option<String>,
}

/// A journaled callback as [`Store::callbacks_since`] reads it back, in journal order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub id: i64,
    pub request_id: String,
    /// `usage`, `completion` or `fault`.
    pub kind: String,
    pub body: String,
}

/// A finished run ([`Store::last_run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedRun {
    pub run_id: String,
    pub command: String,
    /// RFC 3339, UTC.
    pub finished_at: String,
    pub exit_code: i64,
}

/// A submitted job still waiting for callbacks ([`Store::outstanding_jobs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutstandingJob {
    pub job_id: String,
    pub window_start: String,
    /// When its latest request was sent (RFC 3339, UTC).
    pub last_submitted_at: String,
}

/// How many jobs of one window are in one status ([`Store::window_status_counts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowStatusCount {
    pub window_start: String,
    pub window_end: String,
    pub status: String,
    pub jobs: u64,
}

/// A request recorded for a job ([`Store::requests_of_jobs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub request_id: String,
    pub job_id: String,
}

/// A journaled callback on its way to (or back from) the archive: everything a rebuild needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedCallback {
    /// Its journal id when it was archived.
    pub id: i64,
    pub request_id: String,
    pub kind: String,
    /// µs since the epoch, UTC.
    pub received_at: i64,
    pub source: String,
    /// The account of its job, when the request was known.
    pub account_name: Option<String>,
    pub partitions: Vec<String>,
    /// The body as journaled (credentials removed), as text.
    pub body: String,
}

/// An archive file a prune wrote, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    /// Its path below `output.dir/archive/`, e.g. `2021-09/journal-000000000001-000000004567.ndjson.zst`.
    pub file: String,
    pub callbacks: u64,
    pub first_id: i64,
    pub last_id: i64,
    pub bytes: u64,
    /// Callbacks per output partition in it.
    pub partitions: std::collections::BTreeMap<String, u64>,
}

/// What a prune's commit changed in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneCounts {
    /// Callbacks that left the journal for the archive.
    pub callbacks_archived: u64,
    /// Done jobs whose window ended before the horizon: their ICCID list is dropped (the job id,
    /// a hash of it, still says the window was asked for and how it ended).
    pub jobs_compacted: u64,
    /// Runs finished before the horizon whose report JSON is dropped from the store (the file
    /// under `output.dir/runs/` stays).
    pub run_reports_dropped: u64,
}

/// A change to a job's submission state, committed durably by [`Store::apply_job_updates`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUpdate {
    /// The vendor accepted the request: its requestId (docs/architecture.md, invariant 2: recorded
    /// as soon as it arrives).
    Submitted {
        job_id: String,
        request_id: String,
        attempts: u32,
    },
    /// The vendor refused the request for good (a 4xx other than throttling): not retried.
    Failed {
        job_id: String,
        attempts: u32,
        error: String,
    },
    /// Tries that failed for a transient reason; the job stays to be submitted by a later run.
    GaveUp {
        job_id: String,
        attempts: u32,
        error: String,
    },
    /// Every ICCID of the job has its answer (usage, or none reported): the window is done.
    Completed { job_id: String },
    /// No callbacks by the deadline after every re-request.
    Missing { job_id: String, error: String },
}

pub use crate::plan::JobStatus;

/// Refills a token bucket holding `tokens` by `elapsed_ms` at `rate` per second (up to `burst`)
/// and takes up to `want`: `(granted, tokens left)`. Both backends' `take_tokens` use it.
pub fn refill_and_take(
    tokens: f64,
    elapsed_ms: i64,
    rate: f64,
    burst: f64,
    want: u32,
) -> (u32, f64) {
    let refilled = (tokens + rate * elapsed_ms.max(0) as f64 / 1000.0).min(burst);
    let granted = refilled.floor().clamp(0.0, f64::from(want));
    (granted as u32, refilled - granted)
}

/// Held for a command's lifetime: one `run`, `submit`, `ingest` or `prune` at a time per store
/// (for SQLite an `flock` on `<state>.lock`; the kernel drops it when the holder dies).
#[derive(Debug)]
pub struct RunGuard {
    _held: Box<dyn std::fmt::Debug + Send>,
}

impl RunGuard {
    pub fn new(held: impl std::fmt::Debug + Send + 'static) -> Self {
        RunGuard {
            _held: Box::new(held),
        }
    }
}

/// The store named by `[state]`: the one way the stages reach one.
pub fn open(config: &crate::config::StateConfig) -> Result<Box<dyn Store + Send>, StateError> {
    match &config.url {
        Some(url) => Ok(Box::new(PgStore::open(url.expose())?)),
        None => Ok(Box::new(SqliteStore::open_with(
            &config.path,
            config.journal_compression,
        )?)),
    }
}

/// The durable state the pipeline needs.
pub trait Store {
    /// Takes the store's run lock, or says who holds it.
    fn lock(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError>;

    /// Takes the run lock shared with other workers of the same range (PostgreSQL: a shared
    /// advisory lock, so that `prune`, which takes the exclusive one, waits for every worker); a
    /// store that cannot share work (SQLite) takes its exclusive [`Store::lock`].
    fn lock_shared(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError>;

    /// Waits for the partition writer's lock (one writer of partitions at a time among processes
    /// that share the store); `None` where the run lock already excludes every other writer.
    fn lock_publish(&self, run_id: &str) -> Result<Option<RunGuard>, StateError>;

    /// Whether several processes can share a run's work on this store (claims, one rate budget).
    fn shares_work(&self) -> bool;

    /// The store's clock, ms since the epoch: the one clock of every worker's leases (a worker's
    /// own clock may run ahead or behind).
    fn clock_ms(&self) -> Result<i64, StateError>;

    /// Of `job_ids`, claims up to `max` for `worker` for `lease_ms` from now by the store's clock,
    /// and returns them, in job id order. A job is claimable when its lease is free, expired (by
    /// the store's clock) or already `worker`'s, and it still needs work: planned or submitted, or
    /// (asked again: forced, lookback, missing) not claimed by anyone since `since` (the store's
    /// [`Store::clock_ms`] when the claiming run started), so that the workers of one range re-pull
    /// such a job once between them.
    fn claim_jobs(
        &mut self,
        job_ids: &[&str],
        worker: &str,
        lease_ms: i64,
        since: i64,
        max: usize,
    ) -> Result<Vec<String>, StateError>;

    /// Extends `worker`'s leases on `job_ids` to `lease_ms` from now by the store's clock; returns
    /// how many it still held.
    fn renew_claims(
        &mut self,
        worker: &str,
        job_ids: &[&str],
        lease_ms: i64,
    ) -> Result<u64, StateError>;

    /// Gives `worker`'s claims on `job_ids` back (a final status releases a claim too).
    fn release_claims(&mut self, worker: &str, job_ids: &[&str]) -> Result<(), StateError>;

    /// Takes up to `want` request tokens from `account`'s bucket (refilled at `rate` per second up
    /// to `burst`, starting full, by the store's clock) in one transaction; returns how many were
    /// granted.
    fn take_tokens(
        &mut self,
        account: &str,
        rate: f64,
        burst: f64,
        want: u32,
    ) -> Result<u32, StateError>;

    /// Up to `limit` journaled callbacks after `id` (exclusive), in journal order.
    fn callbacks_since(&self, id: i64, limit: usize) -> Result<Vec<JournalEntry>, StateError>;

    /// The last finished run.
    fn last_run(&self) -> Result<Option<FinishedRun>, StateError>;

    /// Submitted jobs still waiting for callbacks, with their latest request time, by window.
    fn outstanding_jobs(&self) -> Result<Vec<OutstandingJob>, StateError>;

    /// Jobs per window and status for windows starting in `[from, to)` (texts like
    /// `2021-08-15T00:00:00Z`), ordered by window and status.
    fn window_status_counts(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<WindowStatusCount>, StateError>;

    /// How many jobs are in each status.
    fn job_status_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, StateError>;

    /// Records planned jobs as intent (before anything is sent); existing jobs are kept as they are.
    /// Returns how many were new.
    fn record_jobs(&mut self, jobs: &[Job]) -> Result<u64, StateError>;

    /// The status of each of `job_ids`, by job id (absent: never planned).
    fn job_statuses(&self, job_ids: &[&str]) -> Result<HashMap<String, JobStatus>, StateError>;

    /// Applies job updates in one durable commit.
    fn apply_job_updates(&mut self, updates: &[JobUpdate]) -> Result<(), StateError>;

    /// Records the start of a run.
    fn begin_run(&mut self, run_id: &str, command: &str) -> Result<(), StateError>;

    /// Records the end of a run with its report.
    fn finish_run(
        &mut self,
        run_id: &str,
        exit_code: u8,
        report_json: &str,
    ) -> Result<(), StateError>;

    /// Journals a batch in one durable commit (fsync before return); all or nothing.
    /// `received_at` is µs since the epoch, shared by the batch.
    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError>;

    /// Partitions with journaled callbacks not yet written.
    fn pending_partitions(&self) -> Result<Vec<PendingPartition>, StateError>;

    /// Every journaled callback touching `partition` with id ≤ `through_id`, oldest received first
    /// (ties by journal id), so that later ones win when collapsed.
    fn callbacks_for_partition(
        &self,
        partition: &str,
        through_id: i64,
        each: &mut dyn FnMut(StoredCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError>;

    /// Records that `partition` now holds everything journaled up to `through_id`.
    fn mark_written(
        &mut self,
        partition: &str,
        through_id: i64,
        rows: u64,
        files: u64,
        run_id: &str,
    ) -> Result<(), StateError>;

    /// The account of the job that sent each of these requests, by request id; requests no job of
    /// this store sent are absent.
    fn request_accounts(&self, request_ids: &[&str])
    -> Result<HashMap<String, String>, StateError>;

    /// How many journaled callbacks with id ≤ `through_id` touch `partition`.
    fn partition_callbacks(&self, partition: &str, through_id: i64) -> Result<u64, StateError>;

    /// Answers when the store does (SQLite: `SELECT 1` on its connection): the listener's
    /// readiness (`GET /healthz`, asked through the writer thread so that it proves that alive too).
    fn ping(&self) -> Result<(), StateError>;

    /// How many callbacks the journal holds.
    fn journal_len(&self) -> Result<u64, StateError>;

    /// The highest journal id so far (0 for an empty journal): callbacks journaled from now on have
    /// higher ids.
    fn journal_high_water(&self) -> Result<i64, StateError>;

    /// The requests recorded for each of `job_ids`, oldest first.
    fn requests_of_jobs(&self, job_ids: &[&str]) -> Result<Vec<RecordedRequest>, StateError>;

    /// Journaled callbacks that may move to the archive, oldest received first: received before
    /// `before` (µs), every partition they touch written through them, their job not waiting for
    /// callbacks, and never the journal's newest (so that journal ids never repeat).
    fn archivable(
        &self,
        before: i64,
        each: &mut dyn FnMut(ArchivedCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError>;

    /// The archive files recorded so far (paths below `output.dir/archive/`).
    fn archive_files(&self) -> Result<BTreeSet<String>, StateError>;

    /// The archive files holding callbacks of `partition`, oldest first.
    fn partition_archives(&self, partition: &str) -> Result<Vec<String>, StateError>;

    /// In one durable commit: records `files`, removes the callbacks `ids` (which they hold) from
    /// the journal, and compacts what ended before `before` (µs): done jobs, run reports.
    fn commit_archive(
        &mut self,
        files: &[ArchiveFile],
        ids: &[i64],
        before: i64,
        run_id: &str,
    ) -> Result<PruneCounts, StateError>;

    /// Gives the space freed by a prune back to the file system.
    fn reclaim_space(&mut self) -> Result<(), StateError>;

    /// Journaled callbacks of `request_ids` with id ≤ `through_id`, in journal order:
    /// `(id, request_id, body)`.
    fn callbacks_of_requests(
        &self,
        request_ids: &[&str],
        through_id: i64,
        each: &mut dyn FnMut(i64, String, String),
    ) -> Result<(), StateError>;
}

/// Runs `visit`, a store method that streams rows to a callback, with a callback that can fail: the
/// first error stops the visit and is returned.
///
/// ```ignore
/// state::try_each(|each| store.callbacks_for_partition(p, through, each), |cb| add(cb))?;
/// ```
pub fn try_each<T, E: From<StateError>>(
    visit: impl FnOnce(&mut dyn FnMut(T) -> ControlFlow<()>) -> Result<(), StateError>,
    mut each: impl FnMut(T) -> Result<(), E>,
) -> Result<(), E> {
    let mut failed = None;
    visit(&mut |item| match each(item) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    })?;
    failed.map_or(Ok(()), Err)
}
