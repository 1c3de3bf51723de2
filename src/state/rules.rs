//! The store's rules, written once: every statement and transaction of [`Store`], over a
//! [`Backend`] (SQLite or PostgreSQL) that runs them.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;

use super::schema;
use super::sql::{Backend, Row, Statement, Value, json_rows, params};
use super::{
    ArchiveFile, ArchivedCallback, FinishedRun, JobStatus, JobUpdate, JournalEntry, Journaled,
    NewCallback, OutstandingJob, PendingPartition, PruneCounts, RecordedRequest, RunGuard,
    StateError, Store, StoredCallback, WindowStatusCount,
};
use crate::plan::Job;

/// A state store: the rules over a backend ([`super::SqliteStore`], [`super::PgStore`]).
#[derive(Debug)]
pub struct SqlStore<B> {
    pub(super) db: B,
}

/// The columns a journaled body is read back from (`callbacks c` joined with [`BODY_JOIN`]), in
/// this order; see [`Backend::body`].
pub const BODY_COLUMNS: &str = "c.body, c.body_encoding, s.file, c.frame_offset, c.frame_len, \
                                c.body_offset, c.body_len, c.body_digest";
pub const BODY_JOIN: &str = "LEFT JOIN segments s ON s.id = c.segment";

/// zstd level for bodies kept in rows: callbacks compress about 5-10x even at the fastest levels,
/// and the journal is written once and read back rarely.
pub const BODY_ZSTD_LEVEL: i32 = 1;

/// A body as a journal row keeps it, with its `body_encoding`: zstd, or the text itself should
/// compressing fail (it does not short of memory exhaustion), so that nothing is ever lost.
pub fn encode_body(body: &str) -> (Vec<u8>, &'static str) {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(BODY_ZSTD_LEVEL).ok();
        }
        match c.as_mut().map(|c| c.compress(body.as_bytes())) {
            Some(Ok(compressed)) => (compressed, "zstd"),
            _ => (body.as_bytes().to_vec(), "json"),
        }
    })
}

/// The body a row keeps itself ([`encode_body`]), read with [`BODY_COLUMNS`] from `first` on.
pub fn row_body(db: &impl Backend, row: &Row, first: usize) -> Result<String, StateError> {
    let bytes = row.bytes(first).map_err(|e| db.bad(e))?;
    let encoding = row.text(first + 1).map_err(|e| db.bad(e))?;
    let text = if encoding == "zstd" {
        zstd::stream::decode_all(bytes).map_err(|source| StateError::Io {
            path: db.name().to_owned(),
            source,
        })?
    } else {
        bytes.to_vec()
    };
    String::from_utf8(text).map_err(|e| StateError::Invalid {
        path: db.name().to_owned(),
        message: format!("a journaled body is not UTF-8: {e}"),
    })
}

/// A journal row about to be committed: the callback, and its body as the row keeps it (in the
/// row, or its place in a segment).
#[derive(Debug)]
pub struct JournalRow<'a> {
    pub callback: &'a NewCallback<'a>,
    pub body: Cow<'a, [u8]>,
    pub encoding: &'static str,
    /// `[segment, frame_offset, frame_len, body_offset, body_len]` for a body in a segment.
    pub at: Option<[i64; 5]>,
}

impl<'a> JournalRow<'a> {
    /// A callback whose body its row keeps (compressed by its sender, or here).
    pub fn inline(callback: &'a NewCallback<'a>) -> JournalRow<'a> {
        let (body, encoding) = match callback.encoded {
            Some((body, encoding)) => (Cow::Borrowed(body), encoding),
            None => {
                let (body, encoding) = encode_body(callback.body);
                (Cow::Owned(body), encoding)
            }
        };
        JournalRow {
            callback,
            body,
            encoding,
            at: None,
        }
    }
}

/// Commits `rows` to the journal in one transaction, in order: a body the journal holds (or one
/// twice in `rows`) is [`Journaled::AlreadyJournaled`], found by the insert itself. With
/// `segment`, `(id, committed length)` of the segment that holds their bodies.
///
/// `ON CONFLICT` on the unique digest is the guarantee; the dialect's `new_digest_only` spares a
/// duplicate an id where the conflict would draw one.
pub fn commit_journal(
    db: &mut impl Backend,
    rows: &[JournalRow<'_>],
    segment: Option<(i64, i64)>,
    received_at: i64,
) -> Result<Vec<Journaled>, StateError> {
    let d = db.dialect();
    let name = db.name().to_owned();
    let insert = format!(
        "INSERT INTO callbacks
           (request_id, kind, received_at, source, body_digest, body, body_encoding,
            segment, frame_offset, frame_len, body_offset, body_len)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 {}
         ON CONFLICT (body_digest) DO NOTHING",
        d.new_digest_only
    );
    db.transaction(|tx| {
        if let Some(lock) = d.journal_lock {
            tx.query(lock, &[])?;
        }
        let inserts: Vec<Vec<Value>> = rows
            .iter()
            .map(|r| {
                let cb = r.callback;
                let at = |n: usize| r.at.map(|a| a[n]);
                params![
                    cb.request_id,
                    cb.kind,
                    cb.received_at.unwrap_or(received_at),
                    cb.source,
                    &cb.digest[..],
                    &*r.body,
                    r.encoding,
                    at(0),
                    at(1),
                    at(2),
                    at(3),
                    at(4),
                ]
            })
            .collect();
        let inserted = tx.insert_all(&insert, inserts)?;
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut partitions = Vec::new();
        for (r, new) in rows.iter().zip(inserted) {
            match new {
                Some(id) => {
                    for p in r.callback.partitions {
                        partitions.push((p, id));
                    }
                    outcomes.push(Journaled::New(id));
                }
                None => outcomes.push(Journaled::AlreadyJournaled),
            }
        }
        if !partitions.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO callback_partitions (partition, callback_id)
                     SELECT c0, c1 FROM {} z WHERE true ON CONFLICT DO NOTHING",
                    d.rows_of(1, &["text", "bigint"])
                ),
                &[json_rows(&partitions)],
            )?;
        }
        if let Some((id, end)) = segment {
            tx.execute(
                "UPDATE segments SET committed = $2 WHERE id = $1",
                &params![id, end],
            )?;
        }
        crate::failpoint::pause(crate::failpoint::JOURNAL_COMMIT);
        crate::failpoint::fail(crate::failpoint::JOURNAL_COMMIT).map_err(|source| {
            StateError::Io {
                path: name.clone(),
                source,
            }
        })?;
        Ok(outcomes)
    })
}

pub fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl<B: Backend> SqlStore<B> {
    /// The store on `db`, migrated to the current schema.
    pub(super) fn migrated(mut db: B) -> Result<SqlStore<B>, StateError> {
        schema::migrate(&mut db)?;
        Ok(SqlStore { db })
    }

    /// The schema version the store is at.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        Ok(schema::version(&self.db, self.db.name())?.unwrap_or(0))
    }

    /// The rows `sql` answers, each read by `read`.
    fn rows<T>(
        &self,
        sql: &str,
        params: &[Value],
        read: impl Fn(&Row) -> Result<T, super::sql::BadColumn>,
    ) -> Result<Vec<T>, StateError> {
        self.db
            .query(sql, params)?
            .iter()
            .map(|r| read(r).map_err(|e| self.db.bad(e)))
            .collect()
    }

    /// The one integer `sql` answers.
    fn count(&self, sql: &str, params: &[Value]) -> Result<i64, StateError> {
        Ok(self
            .rows(sql, params, |r| r.int(0))?
            .first()
            .copied()
            .unwrap_or(0))
    }
}

impl<B: Backend> Store for SqlStore<B> {
    fn lock(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        self.db.lock(run_id, command, false)
    }

    fn lock_shared(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        self.db.lock(run_id, command, true)
    }

    fn lock_publish(&self, _run_id: &str) -> Result<Option<RunGuard>, StateError> {
        self.db.lock_publish()
    }

    fn shares_work(&self) -> bool {
        self.db.shares_work()
    }

    fn clock_ms(&self) -> Result<i64, StateError> {
        self.count(&format!("SELECT {}", self.db.dialect().now_ms), &[])
    }

    fn claim_jobs(
        &mut self,
        job_ids: &[&str],
        worker: &str,
        lease_ms: i64,
        since: i64,
        max: usize,
    ) -> Result<Vec<String>, StateError> {
        let d = self.db.dialect();
        // Every time here is the store's: a worker whose clock runs ahead takes no live claim.
        let sql = format!(
            "UPDATE jobs SET claimed_by = $2, lease_until = {now} + $3, claimed_at = {now}
             WHERE job_id IN (
               SELECT job_id FROM jobs
               WHERE {}
                 AND (claimed_by IS NULL OR lease_until < {now} OR claimed_by = $2)
                 AND (status IN ('planned', 'submitted') OR claimed_at IS NULL
                      OR claimed_at < $4)
               ORDER BY job_id LIMIT $5{})
             RETURNING job_id",
            d.any("job_id", 1),
            d.skip_locked,
            now = d.now_ms,
        );
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let mut claimed =
            self.rows(&sql, &params![job_ids, worker, lease_ms, since, max], |r| {
                r.text(0)
            })?;
        claimed.sort_unstable();
        Ok(claimed)
    }

    fn renew_claims(
        &mut self,
        worker: &str,
        job_ids: &[&str],
        lease_ms: i64,
    ) -> Result<u64, StateError> {
        let d = self.db.dialect();
        let sql = format!(
            "UPDATE jobs SET lease_until = {} + $3 WHERE {} AND claimed_by = $2",
            d.now_ms,
            d.any("job_id", 1)
        );
        self.db.execute(&sql, &params![job_ids, worker, lease_ms])
    }

    fn release_claims(&mut self, worker: &str, job_ids: &[&str]) -> Result<(), StateError> {
        let sql = format!(
            "UPDATE jobs SET claimed_by = NULL, lease_until = NULL WHERE {} AND claimed_by = $2",
            self.db.dialect().any("job_id", 1)
        );
        self.db.execute(&sql, &params![job_ids, worker]).map(drop)
    }

    fn take_tokens(
        &mut self,
        account: &str,
        rate: f64,
        burst: f64,
        want: u32,
    ) -> Result<u32, StateError> {
        let d = self.db.dialect();
        let name = self.db.name().to_owned();
        let bad = |e: super::sql::BadColumn| StateError::Invalid {
            path: name.clone(),
            message: e.to_string(),
        };
        self.db.transaction(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO rate_budget (account, tokens, updated_at)
                     VALUES ($1, $2, {}) ON CONFLICT DO NOTHING",
                    d.now_ms
                ),
                &params![account, burst],
            )?;
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT tokens, updated_at FROM rate_budget WHERE account = $1{}",
                        d.for_update
                    ),
                    &params![account],
                )?
                .unwrap_or(Row(vec![Value::Real(burst), Value::Null]));
            // The store's clock, read once the row is held: one clock for every worker.
            let now = tx
                .query_opt(&format!("SELECT {}", d.now_ms), &[])?
                .map(|r| r.int(0))
                .transpose()
                .map_err(bad)?
                .unwrap_or(0);
            let tokens = row.real(0).map_err(bad)?;
            let updated_at = row.opt_int(1).map_err(bad)?.unwrap_or(now);
            let (granted, left) =
                super::refill_and_take(tokens, now - updated_at, rate, burst, want);
            tx.execute(
                "UPDATE rate_budget SET tokens = $2, updated_at = $3 WHERE account = $1",
                &params![account, left, now.max(updated_at)],
            )?;
            Ok(granted)
        })
    }

    fn callbacks_since(&self, id: i64, limit: usize) -> Result<Vec<JournalEntry>, StateError> {
        let sql = format!(
            "SELECT c.id, c.request_id, c.kind, {BODY_COLUMNS} FROM callbacks c {BODY_JOIN}
             WHERE c.id > $1 ORDER BY c.id LIMIT $2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db
            .query(&sql, &params![id, limit])?
            .iter()
            .map(|r| {
                let bad = |e| self.db.bad(e);
                Ok(JournalEntry {
                    id: r.int(0).map_err(bad)?,
                    request_id: r.text(1).map_err(bad)?,
                    kind: r.text(2).map_err(bad)?,
                    body: self.db.body(r, 3)?,
                })
            })
            .collect()
    }

    fn last_run(&self) -> Result<Option<FinishedRun>, StateError> {
        Ok(self
            .rows(
                "SELECT run_id, command, finished_at, exit_code FROM runs
                 WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
                &[],
                |r| {
                    Ok(FinishedRun {
                        run_id: r.text(0)?,
                        command: r.text(1)?,
                        finished_at: r.text(2)?,
                        exit_code: r.int(3)?,
                    })
                },
            )?
            .pop())
    }

    fn outstanding_jobs(&self) -> Result<Vec<OutstandingJob>, StateError> {
        self.rows(
            "SELECT j.job_id, j.window_start, MAX(r.submitted_at) FROM jobs j
             JOIN requests r ON r.job_id = j.job_id
             WHERE j.status = 'submitted' GROUP BY j.job_id ORDER BY j.window_start",
            &[],
            |r| {
                Ok(OutstandingJob {
                    job_id: r.text(0)?,
                    window_start: r.text(1)?,
                    last_submitted_at: r.text(2)?,
                })
            },
        )
    }

    fn window_status_counts(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<WindowStatusCount>, StateError> {
        self.rows(
            "SELECT window_start, window_end, status, COUNT(*) FROM jobs
             WHERE window_start >= $1 AND window_start < $2
             GROUP BY window_start, window_end, status ORDER BY window_start, window_end, status",
            &params![from, to],
            |r| {
                Ok(WindowStatusCount {
                    window_start: r.text(0)?,
                    window_end: r.text(1)?,
                    status: r.text(2)?,
                    jobs: u64::try_from(r.int(3)?).unwrap_or(0),
                })
            },
        )
    }

    fn job_status_counts(&self) -> Result<BTreeMap<String, u64>, StateError> {
        Ok(self
            .rows(
                "SELECT status, COUNT(*) FROM jobs GROUP BY status",
                &[],
                |r| Ok((r.text(0)?, u64::try_from(r.int(1)?).unwrap_or(0))),
            )?
            .into_iter()
            .collect())
    }

    fn record_jobs(&mut self, jobs: &[Job]) -> Result<u64, StateError> {
        let rows: Vec<[String; 5]> = jobs
            .iter()
            .map(|job| {
                let iccids: Vec<&str> = job.iccids.iter().map(|i| i.as_str()).collect();
                [
                    job.id.as_str().to_owned(),
                    job.account_name.to_string(),
                    job.window.start_time(),
                    job.window.end_time(),
                    iccids.join(","),
                ]
            })
            .collect();
        // One statement for the batch.
        let sql = format!(
            "INSERT INTO jobs (job_id, account_name, window_start, window_end, iccids,
                               status, created_at, updated_at)
             SELECT c0, c1, c2, c3, c4, $2, $3, $3 FROM {} z WHERE true ON CONFLICT DO NOTHING",
            self.db.dialect().rows_of(1, &["text"; 5])
        );
        self.db.execute(
            &sql,
            &params![json_rows(&rows), JobStatus::Planned.as_str(), now_text()],
        )
    }

    fn job_statuses(&self, job_ids: &[&str]) -> Result<HashMap<String, JobStatus>, StateError> {
        let sql = format!(
            "SELECT job_id, status FROM jobs WHERE {}",
            self.db.dialect().any("job_id", 1)
        );
        self.rows(&sql, &params![job_ids], |r| Ok((r.text(0)?, r.text(1)?)))?
            .into_iter()
            .map(|(id, text)| {
                let status = JobStatus::parse(&text).ok_or_else(|| StateError::Invalid {
                    path: self.db.name().to_owned(),
                    message: format!("job {id} has an unknown status {text:?}"),
                })?;
                Ok((id, status))
            })
            .collect()
    }

    fn apply_job_updates(&mut self, updates: &[JobUpdate]) -> Result<(), StateError> {
        let now = now_text();
        let now = now.as_str();
        let mut statements: Vec<Statement<'_>> = Vec::with_capacity(updates.len() * 2);
        for update in updates {
            match update {
                JobUpdate::Submitted {
                    job_id,
                    request_id,
                    attempts,
                } => {
                    statements.push((
                        "INSERT INTO requests (request_id, job_id, submitted_at) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        params![request_id, job_id, now],
                    ));
                    statements.push((
                        "UPDATE jobs SET status = $2, attempts = attempts + $3, last_error = NULL,
                           updated_at = $4 WHERE job_id = $1",
                        params![job_id, JobStatus::Submitted.as_str(), *attempts, now],
                    ));
                }
                JobUpdate::Failed {
                    job_id,
                    attempts,
                    error,
                } => statements.push((
                    "UPDATE jobs SET status = $2, attempts = attempts + $3, last_error = $4,
                       updated_at = $5, claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                    params![job_id, JobStatus::Failed.as_str(), *attempts, error, now],
                )),
                JobUpdate::GaveUp {
                    job_id,
                    attempts,
                    error,
                } => statements.push((
                    "UPDATE jobs SET attempts = attempts + $2, last_error = $3, updated_at = $4
                     WHERE job_id = $1",
                    params![job_id, *attempts, error, now],
                )),
                JobUpdate::Completed { job_id } => statements.push((
                    "UPDATE jobs SET status = $2, last_error = NULL, updated_at = $3,
                       claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                    params![job_id, JobStatus::Complete.as_str(), now],
                )),
                JobUpdate::Missing { job_id, error } => statements.push((
                    "UPDATE jobs SET status = $2, last_error = $3, updated_at = $4,
                       claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                    params![job_id, JobStatus::Missing.as_str(), error, now],
                )),
            }
        }
        self.db
            .transaction(|tx| tx.execute_all(statements))
            .map(drop)
    }

    fn begin_run(&mut self, run_id: &str, command: &str) -> Result<(), StateError> {
        self.db
            .execute(
                "INSERT INTO runs (run_id, command, started_at) VALUES ($1, $2, $3)",
                &params![run_id, command, now_text()],
            )
            .map(drop)
    }

    fn finish_run(
        &mut self,
        run_id: &str,
        exit_code: u8,
        report_json: &str,
    ) -> Result<(), StateError> {
        self.db
            .execute(
                "UPDATE runs SET finished_at = $2, exit_code = $3, report = $4 WHERE run_id = $1",
                &params![run_id, now_text(), exit_code, report_json],
            )
            .map(drop)
    }

    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError> {
        self.db.journal(batch, received_at)
    }

    fn pending_partitions(&self) -> Result<Vec<PendingPartition>, StateError> {
        // The distinct partitions by jumps through the (partition, callback_id) key, and each one's
        // newest callback by a seek: a handful of index lookups per partition, however long the
        // journal (a GROUP BY over every row grew with the history).
        self.rows(
            "WITH RECURSIVE parts(partition) AS (
               SELECT MIN(partition) FROM callback_partitions
               UNION ALL
               SELECT (SELECT MIN(cp.partition) FROM callback_partitions cp
                       WHERE cp.partition > parts.partition)
               FROM parts WHERE parts.partition IS NOT NULL
             ),
             newest AS (
               SELECT parts.partition,
                      (SELECT MAX(cp.callback_id) FROM callback_partitions cp
                       WHERE cp.partition = parts.partition) AS through
               FROM parts WHERE parts.partition IS NOT NULL
             )
             SELECT newest.partition, newest.through
             FROM newest LEFT JOIN partitions p ON p.partition = newest.partition
             WHERE newest.through > COALESCE(p.written_through, 0)
             ORDER BY newest.partition",
            &[],
            |r| {
                Ok(PendingPartition {
                    partition: r.text(0)?,
                    through_id: r.int(1)?,
                })
            },
        )
    }

    fn callbacks_for_partition(
        &self,
        partition: &str,
        through_id: i64,
        each: &mut dyn FnMut(StoredCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        let sql = format!(
            "SELECT c.id, c.request_id, c.received_at, j.account_name, {BODY_COLUMNS}
             FROM callback_partitions cp
             JOIN callbacks c ON c.id = cp.callback_id
             {BODY_JOIN}
             LEFT JOIN requests r ON r.request_id = c.request_id
             LEFT JOIN jobs j ON j.job_id = r.job_id
             WHERE cp.partition = $1 AND cp.callback_id <= $2
             ORDER BY c.received_at, c.id"
        );
        self.db
            .query_each(&sql, &params![partition, through_id], &mut |r| {
                let bad = |e| self.db.bad(e);
                Ok(each(StoredCallback {
                    id: r.int(0).map_err(bad)?,
                    request_id: r.text(1).map_err(bad)?,
                    received_at: r.int(2).map_err(bad)?,
                    account_name: r.opt_text(3).map_err(bad)?,
                    body: self.db.body(&r, 4)?,
                }))
            })
    }

    fn mark_written(
        &mut self,
        partition: &str,
        through_id: i64,
        rows: u64,
        files: u64,
        run_id: &str,
    ) -> Result<(), StateError> {
        self.db
            .execute(
                "INSERT INTO partitions (partition, written_through, rows, files, written_at, run_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (partition) DO UPDATE SET
                   written_through = CASE
                     WHEN excluded.written_through > partitions.written_through
                     THEN excluded.written_through ELSE partitions.written_through END,
                   rows = excluded.rows, files = excluded.files,
                   written_at = excluded.written_at, run_id = excluded.run_id",
                &params![partition, through_id, rows, files, now_text(), run_id],
            )
            .map(drop)
    }

    fn request_accounts(
        &self,
        request_ids: &[&str],
    ) -> Result<HashMap<String, String>, StateError> {
        let sql = format!(
            "SELECT r.request_id, j.account_name FROM requests r JOIN jobs j ON j.job_id = r.job_id
             WHERE {}",
            self.db.dialect().any("r.request_id", 1)
        );
        Ok(self
            .rows(&sql, &params![request_ids], |r| {
                Ok((r.text(0)?, r.text(1)?))
            })?
            .into_iter()
            .collect())
    }

    fn partition_callbacks(&self, partition: &str, through_id: i64) -> Result<u64, StateError> {
        self.count(
            "SELECT COUNT(*) FROM callback_partitions WHERE partition = $1 AND callback_id <= $2",
            &params![partition, through_id],
        )
        .map(|n| u64::try_from(n).unwrap_or(0))
    }

    fn ping(&self) -> Result<(), StateError> {
        self.count("SELECT 1", &[]).map(drop)
    }

    fn journal_len(&self) -> Result<u64, StateError> {
        self.count("SELECT COUNT(*) FROM callbacks", &[])
            .map(|n| u64::try_from(n).unwrap_or(0))
    }

    fn journal_high_water(&self) -> Result<i64, StateError> {
        self.count("SELECT COALESCE(MAX(id), 0) FROM callbacks", &[])
    }

    fn requests_of_jobs(&self, job_ids: &[&str]) -> Result<Vec<RecordedRequest>, StateError> {
        let d = self.db.dialect();
        let sql = format!(
            "SELECT request_id, job_id FROM requests WHERE {} ORDER BY {}",
            d.any("job_id", 1),
            d.request_order
        );
        self.rows(&sql, &params![job_ids], |r| {
            Ok(RecordedRequest {
                request_id: r.text(0)?,
                job_id: r.text(1)?,
            })
        })
    }

    fn archivable(
        &self,
        before: i64,
        each: &mut dyn FnMut(ArchivedCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        // Archivable: older than `before`, not the journal's newest (its id is the high-water
        // mark), not of a job still waiting, and in every partition already written.
        let sql = format!(
            "SELECT c.id, c.request_id, c.kind, c.received_at, c.source, j.account_name,
                    (SELECT {} FROM callback_partitions WHERE callback_id = c.id),
                    {BODY_COLUMNS}
             FROM callbacks c
             {BODY_JOIN}
             LEFT JOIN requests r ON r.request_id = c.request_id
             LEFT JOIN jobs j ON j.job_id = r.job_id
             WHERE c.received_at < $1
               AND c.id < (SELECT MAX(id) FROM callbacks)
               AND (j.status IS NULL OR j.status NOT IN ($2, $3))
               AND NOT EXISTS (
                 SELECT 1 FROM callback_partitions cp
                 LEFT JOIN partitions p ON p.partition = cp.partition
                 WHERE cp.callback_id = c.id
                   AND (p.written_through IS NULL OR p.written_through < cp.callback_id))
             ORDER BY c.received_at, c.id",
            self.db.dialect().json_array("partition")
        );
        let params = params![
            before,
            JobStatus::Planned.as_str(),
            JobStatus::Submitted.as_str()
        ];
        self.db.query_each(&sql, &params, &mut |r| {
            let bad = |e| self.db.bad(e);
            let partitions = match r.opt_text(6).map_err(bad)? {
                Some(json) => serde_json::from_str(&json).map_err(|e| StateError::Invalid {
                    path: self.db.name().to_owned(),
                    message: format!("the partitions of a callback: {e}"),
                })?,
                None => Vec::new(),
            };
            Ok(each(ArchivedCallback {
                id: r.int(0).map_err(bad)?,
                request_id: r.text(1).map_err(bad)?,
                kind: r.text(2).map_err(bad)?,
                received_at: r.int(3).map_err(bad)?,
                source: r.text(4).map_err(bad)?,
                account_name: r.opt_text(5).map_err(bad)?,
                partitions,
                body: self.db.body(&r, 7)?,
            }))
        })
    }

    fn archive_files(&self) -> Result<BTreeSet<String>, StateError> {
        Ok(self
            .rows("SELECT file FROM archive_files", &[], |r| r.text(0))?
            .into_iter()
            .collect())
    }

    fn partition_archives(&self, partition: &str) -> Result<Vec<String>, StateError> {
        self.rows(
            "SELECT ap.file FROM archived_partitions ap JOIN archive_files f ON f.file = ap.file
             WHERE ap.partition = $1 ORDER BY f.archived_at, f.first_id",
            &params![partition],
            |r| r.text(0),
        )
    }

    fn commit_archive(
        &mut self,
        files: &[ArchiveFile],
        ids: &[i64],
        before: i64,
        run_id: &str,
    ) -> Result<PruneCounts, StateError> {
        let d = self.db.dialect();
        let now = now_text();
        let before_text = chrono::DateTime::from_timestamp_micros(before)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // Windows end at midnight, `YYYY-MM-DDT00:00:00Z`: compared as text with the horizon.
        let day = &before_text[..10.min(before_text.len())];
        let mut recorded: Vec<Statement<'_>> = Vec::new();
        for f in files {
            recorded.push((
                "INSERT INTO archive_files
                   (file, callbacks, first_id, last_id, bytes, archived_at, run_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                params![
                    &f.file,
                    f.callbacks,
                    f.first_id,
                    f.last_id,
                    f.bytes,
                    now.as_str(),
                    run_id
                ],
            ));
            for (partition, n) in &f.partitions {
                recorded.push((
                    "INSERT INTO archived_partitions (partition, file, callbacks)
                     VALUES ($1, $2, $3)",
                    params![partition, &f.file, *n],
                ));
            }
        }
        let unindex = format!(
            "DELETE FROM callback_partitions WHERE {}",
            d.any("callback_id", 1)
        );
        let delete = format!("DELETE FROM callbacks WHERE {}", d.any("id", 1));
        let counts = self.db.transaction(|tx| {
            tx.execute_all(recorded)?;
            let mut counts = PruneCounts::default();
            for chunk in ids.chunks(10_000) {
                tx.execute(&unindex, &params![chunk])?;
                counts.callbacks_archived += tx.execute(&delete, &params![chunk])?;
            }
            counts.jobs_compacted = tx.execute(
                "UPDATE jobs SET iccids = '' WHERE iccids <> '' AND window_end < $1
                   AND status IN ($2, $3, $4)",
                &params![
                    day,
                    JobStatus::Complete.as_str(),
                    JobStatus::Failed.as_str(),
                    JobStatus::Missing.as_str()
                ],
            )?;
            counts.run_reports_dropped = tx.execute(
                "UPDATE runs SET report = NULL WHERE report IS NOT NULL AND finished_at < $1",
                &params![before_text.as_str()],
            )?;
            crate::failpoint::pause(crate::failpoint::PRUNE_COMMIT);
            Ok(counts)
        })?;
        self.db.pruned()?;
        Ok(counts)
    }

    fn reclaim_space(&mut self) -> Result<(), StateError> {
        self.db.reclaim_space()
    }

    fn callbacks_of_requests(
        &self,
        request_ids: &[&str],
        through_id: i64,
        each: &mut dyn FnMut(i64, String, String),
    ) -> Result<(), StateError> {
        // Through the index on request_id: the cost is these requests' callbacks, not the journal's.
        let sql = format!(
            "SELECT c.id, c.request_id, {BODY_COLUMNS} FROM callbacks c {BODY_JOIN}
             WHERE {} AND c.id <= $2 ORDER BY c.id",
            self.db.dialect().any("c.request_id", 1)
        );
        self.db
            .query_each(&sql, &params![request_ids, through_id], &mut |r| {
                let bad = |e| self.db.bad(e);
                each(
                    r.int(0).map_err(bad)?,
                    r.text(1).map_err(bad)?,
                    self.db.body(&r, 2)?,
                );
                Ok(ControlFlow::Continue(()))
            })
    }
}
