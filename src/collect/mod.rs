//! Stage 4, collect: callback bodies from any source → checked, stripped, journaled durably, and
//! what they say about each job.
//!
//! [`Intake`] is what every source shares: [`Intake::prepare`] strips the credentials, recognizes the
//! callback and inspects its records (counting, rejecting); [`Intake::commit`] journals a batch in one
//! durable commit; [`RowKeeper`] keeps the rows of what a run journals. Sources ([`source`]):
//! [`drop_dir`] (files in a directory), [`http_listener`] (callbacks POSTed by ThingSpace, with its
//! [`listener_metrics`]), and a separate `tsusage listen` read back from the journal. The
//! [`tracker`] says which jobs are complete, overdue or missing; [`claims`] shares a range's jobs
//! among workers; [`archive`] is the format of the journal's cold archive.
//!
//! Collecting knows nothing of submitting: the loop that submits a run's jobs while it collects
//! their callbacks, and the run's live display, are wiring and live in the pipeline.

pub use crate::config::allow_list;
pub mod archive;
pub mod claims;
pub mod drop_dir;
pub mod http_listener;
pub mod listener_metrics;
pub mod source;
pub mod tracker;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::PartitionBy;
use crate::ingest::Iccid;
use crate::normalize::collapse::RowSet;
use crate::normalize::payload::{Body, BodyError, CallbackKind};
use crate::normalize::record::ParsedRecord;
use crate::normalize::{self, RecordStats};
use crate::output::rejects::RecordReject;
use crate::state::{Digest, Frames, Journaled, NewCallback, Packed, Placement, Store, body_digest};

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

impl std::ops::AddAssign for CallbackStats {
    fn add_assign(&mut self, other: CallbackStats) {
        // Destructured without `..`: a new counter does not compile until it is added here.
        let CallbackStats {
            received,
            rejected,
            usage,
            completion,
            fault,
            journaled,
            already_journaled,
            unmatched,
            unmatched_records,
        } = other;
        self.received += received;
        self.rejected += rejected;
        self.usage += usage;
        self.completion += completion;
        self.fault += fault;
        self.journaled += journaled;
        self.already_journaled += already_journaled;
        self.unmatched += unmatched;
        self.unmatched_records += unmatched_records;
    }
}

/// What stops collecting. Per-callback problems are not errors: they are rejects.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Output(#[from] crate::output::WriteError),
    #[error(transparent)]
    Listener(#[from] http_listener::ListenerError),
    /// A file or directory of a drop directory or the archive, with its path.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CollectError {
    pub(crate) fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        CollectError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = CollectError> = std::result::Result<T, E>;

/// A callback ready to journal.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub request_id: String,
    pub kind: &'static str,
    pub source: String,
    /// The body without credentials: what the journal keeps.
    pub body: String,
    /// Its [`crate::state::body_digest`]: the journal's identity of a callback.
    pub digest: Digest,
    pub partitions: BTreeSet<String>,
    /// Its accepted usage records, typed.
    pub records: Vec<ParsedRecord>,
    /// What it tells the tracker about its job (`News::Unreadable` when no tracker listens to
    /// the intake that prepared it: see [`Intake::tell_tracker`]).
    pub news: tracker::News,
    /// When it was first received (µs), for a callback restored from the archive; `None` for one
    /// received now.
    pub received_at: Option<i64>,
    /// The body already compressed in a segment frame with others (see [`pack`]).
    pub packed: Option<(Arc<Packed>, Placement)>,
}

impl crate::state::Journalable for Prepared {
    fn as_new(&self) -> NewCallback<'_> {
        Prepared::as_new(self)
    }
}

/// Compresses the bodies of `prepared` into segment frames shared by them ([`Prepared::packed`]), so
/// that the thread that commits them only appends the frames. Called by the threads that prepared
/// them, in parallel. If compressing fails, they stay unpacked (the store then compresses them).
pub fn pack(frames: &mut Frames, mut prepared: Vec<&mut Prepared>) {
    let placements: std::io::Result<Vec<Placement>> = prepared
        .iter()
        .map(|p| frames.push(p.body.as_bytes()))
        .collect();
    let packed = placements.and_then(|at| Ok((frames.pack()?, at)));
    let Ok((packed, placements)) = packed else {
        frames.clear();
        return;
    };
    let packed = Arc::new(packed);
    for (p, at) in prepared.iter_mut().zip(placements) {
        p.packed = Some((packed.clone(), at));
    }
}

/// The journal's writer thread, journaling prepared callbacks.
pub type Writer = crate::state::StateWriter<Prepared>;

/// Callbacks whose rows a [`RowKeeper`] keeps, at most (about 100 bytes of memory each).
pub const MAX_KEPT_CALLBACKS: usize = 1 << 20;

/// Keeps the rows of what a writer journals (see [`RowKeeper::after_commit`]), so that partitions
/// only this run fed are written without parsing the callbacks again. If keeping fails (a spill
/// file cannot be written), it keeps nothing: the partitions are then rebuilt from the journal.
#[derive(Debug, Clone)]
pub struct RowKeeper {
    kept: Arc<Mutex<Option<RowSet>>>,
    /// Callbacks it keeps rows for, at most ([`MAX_KEPT_CALLBACKS`]).
    limit: usize,
}

impl RowKeeper {
    pub fn new(rows: RowSet) -> Self {
        RowKeeper {
            kept: Arc::new(Mutex::new(Some(rows))),
            limit: MAX_KEPT_CALLBACKS,
        }
    }

    /// The hook for [`crate::state::StateWriter::spawn_with`]: adds the records of the newly
    /// journaled callbacks of each commit, in journal order. Past [`MAX_KEPT_CALLBACKS`] it keeps
    /// nothing more (the rows spill to disk, but each callback's requestId stays in memory).
    pub fn after_commit(&self) -> crate::state::AfterCommit<Prepared> {
        let (kept, limit) = (self.kept.clone(), self.limit);
        Box::new(move |store, done, received_at| {
            let mut guard = kept.lock().unwrap_or_else(|e| e.into_inner());
            let Some(rows) = guard.as_mut() else { return };
            let new: Vec<&Prepared> = done
                .iter()
                .filter(|(p, o)| matches!(o, Journaled::New(_)) && !p.records.is_empty())
                .map(|(p, _)| p)
                .collect();
            if new.is_empty() {
                return;
            }
            if rows.origins().len() + new.len() > limit {
                tracing::info!(
                    callbacks = rows.origins().len(),
                    "this run journaled more callbacks than it keeps rows for; its partitions will be rebuilt from the journal"
                );
                *guard = None;
                return;
            }
            let ids: Vec<&str> = new.iter().map(|p| p.request_id.as_str()).collect();
            let kept = store
                .request_accounts(&ids)
                .map_err(|e| e.to_string())
                .and_then(|accounts| {
                    new.iter().try_for_each(|p| {
                        keep_rows(rows, p, &accounts, received_at).map_err(|e| e.to_string())
                    })
                });
            if let Err(error) = kept {
                tracing::warn!(%error, "keeping rows failed; partitions will be rebuilt from the journal");
                *guard = None;
            }
        })
    }

    /// The rows kept, once the writer has finished (`None` if keeping failed).
    pub fn take(self) -> Option<RowSet> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Prepared {
    /// The journal's view of it.
    pub fn as_new(&self) -> NewCallback<'_> {
        NewCallback {
            request_id: &self.request_id,
            kind: self.kind,
            source: &self.source,
            body: &self.body,
            encoded: None,
            packed: self.packed.as_ref().map(|(p, at)| (&**p, *at)),
            digest: &self.digest,
            partitions: &self.partitions,
            received_at: self.received_at,
        }
    }

    /// What it tells the tracker, taken out of it (the journal does not need it).
    pub fn take_heard(&mut self) -> tracker::Heard {
        tracker::Heard {
            request_id: self.request_id.clone(),
            news: std::mem::take(&mut self.news),
        }
    }

    /// Accepted usage records in it.
    pub fn accepted_records(&self) -> u64 {
        self.records.len() as u64
    }
}

/// The intake shared by all callback sources.
#[derive(Debug)]
pub struct Intake {
    strict_luhn: bool,
    partition_by: PartitionBy,
    /// The `received_at` of the last commit: commits never go back in time, so that "newest wins"
    /// by received time agrees with the journal's order.
    last_received_at: i64,
    pub callbacks: CallbackStats,
    pub records: RecordStats,
    /// What the callbacks newly journaled by [`Intake::commit`] tell the tracker, when it listens
    /// ([`Intake::tell_tracker`]); taken with [`Intake::take_heard`].
    heard: Option<Vec<tracker::Heard>>,
}

impl Intake {
    pub fn new(strict_luhn: bool, partition_by: PartitionBy) -> Self {
        Intake {
            strict_luhn,
            partition_by,
            last_received_at: 0,
            callbacks: CallbackStats::default(),
            records: RecordStats::default(),
            heard: None,
        }
    }

    /// Keeps what newly journaled callbacks tell the tracker, for a run's collection.
    pub fn tell_tracker(mut self) -> Self {
        self.heard = Some(Vec::new());
        self
    }

    /// Keeps what a callback newly journaled elsewhere (through the writer thread) tells the
    /// tracker, if it listens.
    pub fn journaled(&mut self, heard: tracker::Heard) {
        if let Some(kept) = self.heard.as_mut() {
            kept.push(heard);
        }
    }

    /// What the callbacks journaled since the last call tell the tracker.
    pub fn take_heard(&mut self) -> Vec<tracker::Heard> {
        self.heard.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// How many journaled callbacks' news wait for [`Intake::take_heard`] (always 0 when no
    /// tracker listens: nothing is kept per callback then).
    pub fn pending_news(&self) -> usize {
        self.heard.as_ref().map_or(0, Vec::len)
    }

    /// An intake with the same settings and no counts, for a worker thread; see [`Intake::absorb`].
    pub fn worker(&self) -> Intake {
        let worker = Intake::new(self.strict_luhn, self.partition_by);
        if self.heard.is_some() {
            worker.tell_tracker()
        } else {
            worker
        }
    }

    /// Adds the counts of a worker's intake.
    pub fn absorb(&mut self, worker: Intake) {
        self.callbacks += worker.callbacks;
        self.records += worker.records;
    }

    /// Checks one body from `source`. Record-level rejects are appended to `rejects`; a body that
    /// is not a callback at all comes back as the `Err` reject.
    pub fn prepare(
        &mut self,
        body: &str,
        source: String,
        rejects: &mut Vec<RecordReject>,
    ) -> Result<Prepared, Box<RecordReject>> {
        self.prepare_parsed(Body::parse(body), source, rejects)
    }

    /// [`Intake::prepare`] for a body whose top level is already read (the listener reads it to
    /// check the credentials first).
    pub fn prepare_parsed(
        &mut self,
        parsed: Result<Body<'_>, BodyError>,
        source: String,
        rejects: &mut Vec<RecordReject>,
    ) -> Result<Prepared, Box<RecordReject>> {
        self.callbacks.received += 1;
        let checked = parsed.and_then(|parsed| {
            let (cb, stripped) = parsed.into_callback_stripped()?;
            let mut record_stats = RecordStats::default();
            let first_reject = rejects.len();
            let (partitions, records) = normalize::inspect(
                &cb,
                &source,
                self.strict_luhn,
                self.partition_by,
                &mut record_stats,
                rejects,
            );
            let kind = cb.kind.name();
            let request_id = cb.request_id.to_string();
            let count: fn(&mut CallbackStats) = match &cb.kind {
                CallbackKind::Usage(_) => |c| c.usage += 1,
                CallbackKind::Completion => |c| c.completion += 1,
                CallbackKind::Fault { .. } => |c| c.fault += 1,
            };
            // Only a run's tracker listens (`tsusage listen` journals for others to read).
            let news = match &cb.kind {
                _ if self.heard.is_none() => tracker::News::default(),
                CallbackKind::Completion => tracker::News::Completion,
                CallbackKind::Fault { code, message } => {
                    tracker::News::fault(code.as_deref(), message.as_deref())
                }
                CallbackKind::Usage(_) => tracker::News::Usage {
                    accepted: records.iter().map(|r| r.iccid).collect(),
                    rejected: rejects[first_reject..]
                        .iter()
                        .filter_map(|r| {
                            let iccid = Iccid::parse(r.iccid.as_deref()?).ok()?;
                            let field = r.field.as_deref().unwrap_or_default();
                            Some((iccid, format!("{field}: {}", r.reason)))
                        })
                        .collect(),
                },
            };
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
            Ok((
                kind,
                request_id,
                partitions,
                records,
                news,
                count,
                record_stats,
                stripped,
            ))
        });
        match checked {
            Ok((kind, request_id, partitions, records, news, count, record_stats, body)) => {
                count(&mut self.callbacks);
                self.records += record_stats;
                Ok(Prepared {
                    request_id,
                    kind,
                    source,
                    digest: body_digest(&body),
                    body: body.into_owned(),
                    partitions,
                    records,
                    news,
                    received_at: None,
                    packed: None,
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

    /// Journals `batch` in one durable commit and counts what was new. With `rows`, the records of
    /// the newly journaled callbacks are added to it (in journal order, which is "newest wins" order).
    pub fn commit<S: Store + ?Sized>(
        &mut self,
        store: &mut S,
        batch: &[Prepared],
        received_at: i64,
        mut rows: Option<&mut RowSet>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let received_at = received_at.max(self.last_received_at);
        self.last_received_at = received_at;
        let new: Vec<NewCallback<'_>> = batch.iter().map(Prepared::as_new).collect();
        let outcomes = store.journal(&new, received_at)?;
        let ids: Vec<&str> = batch.iter().map(|p| p.request_id.as_str()).collect();
        let accounts = store.request_accounts(&ids)?;
        for (prepared, outcome) in batch.iter().zip(outcomes) {
            let account = accounts.get(&prepared.request_id);
            if account.is_none() {
                self.callbacks.unmatched += 1;
                self.callbacks.unmatched_records += prepared.accepted_records();
            }
            match outcome {
                Journaled::New(_) => {
                    self.callbacks.journaled += 1;
                    if let Some(heard) = self.heard.as_mut() {
                        heard.push(tracker::Heard {
                            request_id: prepared.request_id.clone(),
                            news: prepared.news.clone(),
                        });
                    }
                }
                Journaled::AlreadyJournaled => {
                    self.callbacks.already_journaled += 1;
                    continue;
                }
            }
            if let Some(rows) = rows.as_deref_mut() {
                let received_at = prepared.received_at.unwrap_or(received_at);
                keep_rows(rows, prepared, &accounts, received_at)?;
            }
        }
        Ok(())
    }
}

/// Adds the records of a newly journaled callback to `rows`, with its job's account (from
/// [`Store::request_accounts`]). Call in journal order.
fn keep_rows(
    rows: &mut RowSet,
    prepared: &Prepared,
    accounts: &std::collections::HashMap<String, String>,
    received_at: i64,
) -> Result<(), crate::output::WriteError> {
    if prepared.records.is_empty() {
        return Ok(());
    }
    let account = accounts.get(&prepared.request_id).map(String::as_str);
    let origin = rows.add_origin(&prepared.request_id, account, received_at);
    for record in &prepared.records {
        rows.push(origin, record)?;
    }
    Ok(())
}

/// Now, in µs since the epoch: the `received_at` of a journal commit.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros() + crate::failpoint::clock_shift_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(request_id: &str) -> String {
        format!(
            r#"{{"requestId":"{request_id}","deviceResponse":{{"devicePromoUsageResponse":[{{"deviceIdentifierCollection":[{{"id":"89148000000000000019","kind":"ICCID"}}],"dataUsage":"10","smsUsage":"1","moSms":"1","mtSms":"0","startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000"}}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#
        )
    }

    /// A run keeps the rows of what it journals up to its limit of callbacks; past it, it keeps
    /// nothing (memory stays bounded, and the partitions are rebuilt from the journal).
    #[test]
    fn a_keeper_past_its_limit_of_callbacks_keeps_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::state::SqliteStore::open(&dir.path().join("s.db")).expect("store");
        let mut intake = Intake::new(false, PartitionBy::Day);
        let done: Vec<(Prepared, Journaled)> = (0..3)
            .map(|n| {
                let mut rejects = Vec::new();
                let p = intake
                    .prepare(&usage(&format!("r-{n}")), "test".into(), &mut rejects)
                    .expect("a callback");
                (p, Journaled::New(n + 1))
            })
            .collect();
        let spill = dir.path().join("spill");
        let rows = || RowSet::new(PartitionBy::Day, Arc::from("acct"), 1 << 20, &spill);
        let commit_all = |keeper: &RowKeeper| {
            let mut hook = keeper.after_commit();
            hook(&store, &done[..1], 1);
            hook(&store, &done[1..], 2);
        };
        let within = RowKeeper {
            limit: 3,
            ..RowKeeper::new(rows())
        };
        commit_all(&within);
        assert_eq!(within.take().map(|r| r.origins().len()), Some(3));
        let past = RowKeeper {
            limit: 2,
            ..RowKeeper::new(rows())
        };
        commit_all(&past);
        assert!(
            past.take().is_none(),
            "past its limit a keeper keeps nothing"
        );
    }
}
