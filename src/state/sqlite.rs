//! `SqliteStore`: the state store in one SQLite file (WAL mode, `synchronous=FULL`: a commit is on disk
//! when it returns), with versioned migrations.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use std::collections::HashMap;
use std::ops::ControlFlow;

use super::lock::RunLock;
use super::segments::{self, Appender, BodyRef, Frames, Reader, Recovery};
use super::{
    ArchiveFile, ArchivedCallback, FinishedRun, JobStatus, JobUpdate, JournalEntry, Journaled,
    NewCallback, OutstandingJob, PendingPartition, PruneCounts, RecordedRequest, RunGuard,
    StateError, Store, StoredCallback, WindowStatusCount,
};
use crate::config::JournalCompression;
use crate::plan::Job;

/// How long a writer waits for another process (a `tsusage listen`) to finish its commit.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The schema, one entry per version. A store is brought up to the last version when opened.
const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE runs (
        run_id      TEXT PRIMARY KEY,
        command     TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        exit_code   INTEGER,
        report      TEXT
    );
    CREATE TABLE jobs (
        job_id       TEXT PRIMARY KEY,
        account_name TEXT NOT NULL,
        window_start TEXT NOT NULL,
        window_end   TEXT NOT NULL,
        iccids       TEXT NOT NULL,
        status       TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        last_error   TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
    );
    CREATE TABLE requests (
        request_id   TEXT PRIMARY KEY,
        job_id       TEXT NOT NULL REFERENCES jobs(job_id),
        submitted_at TEXT NOT NULL,
        completed_at TEXT
    );
    CREATE INDEX requests_by_job ON requests(job_id);
    CREATE TABLE callbacks (
        id          INTEGER PRIMARY KEY,
        request_id  TEXT NOT NULL,
        kind        TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        source      TEXT NOT NULL,
        body_sha256 BLOB NOT NULL UNIQUE,
        body        TEXT NOT NULL
    );
    CREATE INDEX callbacks_by_request ON callbacks(request_id);
    CREATE TABLE callback_partitions (
        partition   TEXT NOT NULL,
        callback_id INTEGER NOT NULL REFERENCES callbacks(id),
        PRIMARY KEY (partition, callback_id)
    ) WITHOUT ROWID;
    CREATE TABLE partitions (
        partition       TEXT PRIMARY KEY,
        written_through INTEGER NOT NULL,
        rows            INTEGER NOT NULL,
        files           INTEGER NOT NULL,
        written_at      TEXT NOT NULL,
        run_id          TEXT NOT NULL
    );
    "#,
    // v2: bodies are stored zstd-compressed (`body_encoding = 'zstd'`); older rows stay JSON text.
    r#"
    ALTER TABLE callbacks ADD COLUMN body_encoding TEXT NOT NULL DEFAULT 'json';
    "#,
    // v3: retention. Old callbacks move to archive files (recorded here, with the partitions they
    // hold, so that a partition asked for again is rebuilt from its archive and its journal).
    r#"
    CREATE INDEX callbacks_by_received ON callbacks(received_at);
    CREATE INDEX callback_partitions_by_callback ON callback_partitions(callback_id);
    CREATE TABLE archive_files (
        file        TEXT PRIMARY KEY,
        callbacks   INTEGER NOT NULL,
        first_id    INTEGER NOT NULL,
        last_id     INTEGER NOT NULL,
        bytes       INTEGER NOT NULL,
        archived_at TEXT NOT NULL,
        run_id      TEXT NOT NULL
    );
    CREATE TABLE archived_partitions (
        partition TEXT NOT NULL,
        file      TEXT NOT NULL REFERENCES archive_files(file),
        callbacks INTEGER NOT NULL,
        PRIMARY KEY (partition, file)
    ) WITHOUT ROWID;
    "#,
    // v4: several workers on one range (claims with leases, ms since the epoch) and one request
    // budget per account. SQLite serves one process, so its claims always succeed; the columns
    // keep the schema the same on both backends.
    r#"
    ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
    ALTER TABLE jobs ADD COLUMN claimed_at INTEGER;
    CREATE TABLE rate_budget (
        account    TEXT PRIMARY KEY,
        tokens     REAL NOT NULL,
        updated_at INTEGER NOT NULL
    );
    "#,
    // v5: new bodies live in append-only segment files (see `segments`); their rows are the
    // index: the segment, the frame, and the place in the decoded frame (`body` is empty, and
    // `body_encoding` is `segment`, `segment-zstd` or, later, `segment-lz4`). The digest is
    // XXH3-128 from now on; older rows keep their SHA-256 (another length: the two never compare
    // equal).
    r#"
    CREATE TABLE segments (
        id         INTEGER PRIMARY KEY,
        file       TEXT NOT NULL UNIQUE,
        committed  INTEGER NOT NULL,
        sealed     INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    ALTER TABLE callbacks RENAME COLUMN body_sha256 TO body_digest;
    ALTER TABLE callbacks ADD COLUMN segment INTEGER;
    ALTER TABLE callbacks ADD COLUMN frame_offset INTEGER;
    ALTER TABLE callbacks ADD COLUMN frame_len INTEGER;
    ALTER TABLE callbacks ADD COLUMN body_offset INTEGER;
    ALTER TABLE callbacks ADD COLUMN body_len INTEGER;
    CREATE INDEX callbacks_by_segment ON callbacks(segment) WHERE segment IS NOT NULL;
    "#,
    // v6: nothing here (PostgreSQL's v6 tunes its autovacuum); the two schemas keep one numbering.
    "",
];

/// The columns a journaled body is read back from (`callbacks c` joined with [`BODY_JOIN`]), in
/// this order; see [`SqliteStore::body_at`].
const BODY_COLUMNS: &str = "c.body, c.body_encoding, s.file, c.frame_offset, c.frame_len, \
                            c.body_offset, c.body_len, c.body_digest";
const BODY_JOIN: &str = "LEFT JOIN segments s ON s.id = c.segment";

/// A commit whose new bodies are smaller than this keeps them in its rows (each zstd-compressed, one
/// fsync: the WAL's) instead of appending them to the segment (two fsyncs: the segment's, then the
/// WAL's). A listener's group commits of a few callbacks are faster that way; a drop directory's
/// batches of up to 32 MiB go to the segment, where one frame per MiB costs less than a zstd call
/// and a SQLite blob per body.
const INLINE_BELOW_BYTES: usize = 512 << 10;

/// SQLite's page cache, in KiB (its default is about 2 MiB). The digest and request-id indexes
/// take their keys in random order, so each commit of a large ingest touched nearly every one of
/// their pages: with 2 MiB each touch was a read from the WAL or the file (10 M records: 600,000
/// `pread`s). Pages are only taken as the store grows.
const CACHE_KIB: u32 = 16 << 10;
/// WAL pages after which a commit checkpoints, once this process commits batches to a segment
/// (SQLite's default, 1,000 pages or 4 MiB, otherwise). A drop directory's commit rewrites more
/// than 4 MiB when the indexes are large, so every commit was followed by a checkpoint writing the
/// same pages into the database again; at 128 MiB a page rewritten by many commits is copied once
/// (10 M records: 15.4-15.8 s instead of 19-21 s). The listener's small commits keep the default: a
/// WAL still growing makes each fsync also commit the file's new size (about 6 % fewer durable
/// callbacks/s while it grows), and a reused 4 MiB WAL does not grow.
const BATCH_CHECKPOINT_PAGES: u32 = 32 << 10;

/// zstd level for journaled bodies: callbacks compress about 5-10x even at the fastest levels, and
/// the journal is written once and read back rarely.
pub const BODY_ZSTD_LEVEL: i32 = 1;

/// A body as the journal stores it, with its `body_encoding`: zstd, or the text itself should
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

/// A journaled body back as text, from the `body` and `body_encoding` columns.
fn decode_body(value: rusqlite::types::ValueRef<'_>, encoding: &str) -> rusqlite::Result<String> {
    let bytes = match value {
        rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => b,
        other => {
            return Err(rusqlite::Error::InvalidColumnType(
                0,
                "body".into(),
                other.data_type(),
            ));
        }
    };
    let text = if encoding == "zstd" {
        zstd::stream::decode_all(bytes).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
        })?
    } else {
        bytes.to_vec()
    };
    String::from_utf8(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

/// The embedded state store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: String,
    /// Where the journal's segment files are, and how new frames are written.
    segment_dir: PathBuf,
    compression: JournalCompression,
    /// The frames of the commit being made, reused (created by the first commit).
    frames: Option<Frames>,
    /// This process's segment, created by its first journal commit to a segment.
    appender: Option<Appender>,
    /// Whether this process's first journal commit has recovered what crashed writers left.
    recovered: bool,
    /// A commit with fewer new body bytes than this keeps them in its rows ([`INLINE_BELOW_BYTES`]).
    inline_below: usize,
    reader: Reader,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Sealed: no one appends to it again (a crash leaves it to the next writer's recovery).
        if let Some(appender) = self.appender.take() {
            let _ = self.conn.execute(
                "UPDATE segments SET sealed = 1 WHERE id = ?1",
                [appender.id],
            );
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        SqliteStore::open_with(path, JournalCompression::default())
    }

    /// [`SqliteStore::open`], writing new journal frames with `compression`.
    pub fn open_with(
        path: &Path,
        compression: JournalCompression,
    ) -> Result<SqliteStore, StateError> {
        let display = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
                path: display.clone(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StateError::Backend {
            path: display.clone(),
            source: Box::new(source),
        })?;
        let mut store = SqliteStore {
            conn,
            path: display,
            segment_dir: segments::dir_for(path),
            compression,
            frames: None,
            appender: None,
            recovered: false,
            inline_below: crate::failpoint::inline_below(INLINE_BELOW_BYTES),
            reader: Reader::default(),
        };
        store.configure()?;
        store.migrate()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Backend {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    fn configure(&mut self) -> Result<(), StateError> {
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(self.err())?;
        // A new store frees pages incrementally after a prune (an existing one is converted by its
        // first prune: the setting only takes effect on an empty file or through a VACUUM).
        self.conn
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
            .map_err(self.err())?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(self.err())?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StateError::Invalid {
                path: self.path.clone(),
                message: format!("cannot switch to WAL mode (got {mode})"),
            });
        }
        // FULL: the WAL is fsynced at every commit, so a committed callback survives power loss.
        self.conn
            .execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(self.err())?;
        self.conn
            .execute_batch(&format!("PRAGMA cache_size = -{CACHE_KIB};"))
            .map_err(self.err())
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(err)?;
        let current: i64 = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map_err(err)?
            .unwrap_or(0);
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StateError::Invalid {
                path,
                message: format!(
                    "schema version {current} was written by a newer tsusage (this one knows {known})"
                ),
            });
        }
        for sql in &MIGRATIONS[current as usize..] {
            tx.execute_batch(sql).map_err(err)?;
        }
        if current == 0 {
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [known])
                .map_err(err)?;
        } else if current < known {
            tx.execute("UPDATE schema_version SET version = ?1", [known])
                .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// The schema version the store is at.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// Every commit's bodies to the segment, however small (for tests of the segment path).
    #[doc(hidden)]
    pub fn always_segments(mut self) -> Self {
        self.inline_below = 0;
        self
    }

    /// The directory of the journal's segment files.
    pub fn segment_dir(&self) -> &Path {
        &self.segment_dir
    }

    fn io_err(&self) -> impl Fn(std::io::Error) -> StateError + '_ {
        |source| StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The body of a row read with [`BODY_COLUMNS`] starting at column `first`: from its segment
    /// (checked against its digest), or from the row itself for rows older than segments.
    fn body_at(&self, row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<String> {
        let encoding = row.get_ref(first + 1)?.as_str()?;
        let Some(compression) = segments::compression_of(encoding) else {
            return decode_body(row.get_ref(first)?, encoding);
        };
        let at = |i: usize| -> rusqlite::Result<u64> {
            Ok(u64::try_from(row.get::<_, i64>(first + i)?).unwrap_or(0))
        };
        let file: Option<String> = row.get(first + 2)?;
        let failed = |e: Box<dyn std::error::Error + Send + Sync>| {
            rusqlite::Error::FromSqlConversionFailure(first, rusqlite::types::Type::Blob, e)
        };
        let file =
            file.ok_or_else(|| failed("a journaled body's segment is not recorded".into()))?;
        let r = BodyRef {
            file,
            frame_offset: at(3)?,
            frame_len: at(4)?,
            body_offset: at(5)?,
            body_len: at(6)?,
            compression,
        };
        let digest = row.get_ref(first + 7)?.as_blob()?;
        self.reader
            .read(&self.segment_dir, &r, digest)
            .map_err(failed)
    }

    /// This process's segment, created on first use.
    fn appender(&mut self) -> Result<Appender, StateError> {
        if let Some(appender) = self.appender.take() {
            if appender.end() < segments::ROLL_BYTES {
                return Ok(appender);
            }
            self.conn
                .execute(
                    "UPDATE segments SET sealed = 1 WHERE id = ?1",
                    [appender.id],
                )
                .map_err(self.err())?;
        }
        // This process commits batches (set again at each new segment: harmless, and rare).
        self.conn
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {BATCH_CHECKPOINT_PAGES};"
            ))
            .map_err(self.err())?;
        // Created and locked before it is recorded: recovery never sees a row whose file is
        // not yet held.
        let (name, file) = Appender::create(&self.segment_dir).map_err(self.io_err())?;
        self.conn
            .execute(
                "INSERT INTO segments (file, committed, created_at) VALUES (?1, 0, ?2)",
                params![name, now_text()],
            )
            .map_err(self.err())?;
        Ok(Appender::new(self.conn.last_insert_rowid(), name, file))
    }

    /// Seals the segments of writers that are gone, cutting off the unreferenced tail a crash
    /// during an append leaves, and removes segment files no row records.
    fn recover_segments(&mut self) -> Result<(), StateError> {
        let rows: Vec<(i64, String, i64, bool)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id, file, committed, sealed FROM segments")
                .map_err(self.err())?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(self.err())?
                .collect::<Result<_, _>>()
                .map_err(self.err())?
        };
        for (id, file, committed, _) in rows.iter().filter(|r| !r.3) {
            let committed = u64::try_from(*committed).unwrap_or(0);
            match segments::recover(&self.segment_dir, file, committed).map_err(self.io_err())? {
                Recovery::InUse => {}
                Recovery::Sealed { truncated } => {
                    if truncated > 0 {
                        tracing::warn!(
                            segment = %file,
                            bytes = truncated,
                            "journal segment: removed the unreferenced tail of an interrupted commit"
                        );
                    }
                    self.conn
                        .execute("UPDATE segments SET sealed = 1 WHERE id = ?1", [id])
                        .map_err(self.err())?;
                }
                Recovery::Missing => {
                    self.conn
                        .execute("DELETE FROM segments WHERE id = ?1", [id])
                        .map_err(self.err())?;
                }
            }
        }
        let known: Vec<String> = rows.into_iter().map(|r| r.1).collect();
        for stray in segments::remove_strays(&self.segment_dir, &known).map_err(self.io_err())? {
            tracing::info!(segment = %stray, "journal segment: removed a file no commit recorded");
        }
        Ok(())
    }

    /// Commits the rows of the new bodies `fresh` of `batch` in one transaction: with `placed`
    /// (where each is in the segment, the segment, and its new committed length), index rows and
    /// the segment's length; without, rows that hold their body themselves (zstd). Returns their
    /// outcomes, in order.
    fn commit_index(
        &mut self,
        batch: &[NewCallback<'_>],
        fresh: &[usize],
        placed: Option<(&[BodyRef], &Appender, u64)>,
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let encoding = segments::encoding(self.compression);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut outcomes = Vec::with_capacity(fresh.len());
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO callbacks
                       (request_id, kind, received_at, source, body_digest, body, body_encoding,
                        segment, frame_offset, frame_len, body_offset, body_len)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(err)?;
            let mut index = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO callback_partitions (partition, callback_id) VALUES (?1, ?2)",
                )
                .map_err(err)?;
            let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            for (k, &i) in fresh.iter().enumerate() {
                let cb = &batch[i];
                let (body, body_encoding, at) = match placed {
                    Some((refs, appender, _)) => {
                        let r = &refs[k];
                        let at = [
                            appender.id,
                            int(r.frame_offset),
                            int(r.frame_len),
                            int(r.body_offset),
                            int(r.body_len),
                        ];
                        (Cow::Borrowed(&[][..]), encoding, Some(at))
                    }
                    None => match cb.encoded {
                        Some((body, body_encoding)) => (Cow::Borrowed(body), body_encoding, None),
                        None => {
                            let (body, body_encoding) = encode_body(cb.body);
                            (Cow::Owned(body), body_encoding, None)
                        }
                    },
                };
                let at = |n: usize| at.map(|a| a[n]);
                let inserted = insert
                    .execute(params![
                        cb.request_id,
                        cb.kind,
                        cb.received_at.unwrap_or(received_at),
                        cb.source,
                        &cb.digest[..],
                        &*body,
                        body_encoding,
                        at(0),
                        at(1),
                        at(2),
                        at(3),
                        at(4),
                    ])
                    .map_err(err)?;
                if inserted == 0 {
                    // Journaled meanwhile by another process: its bytes here stay unreferenced.
                    outcomes.push(Journaled::AlreadyJournaled);
                    continue;
                }
                let id = tx.last_insert_rowid();
                for partition in cb.partitions {
                    index.execute(params![partition, id]).map_err(err)?;
                }
                outcomes.push(Journaled::New(id));
            }
        }
        if let Some((_, appender, end)) = placed {
            tx.execute(
                "UPDATE segments SET committed = ?2 WHERE id = ?1",
                params![appender.id, i64::try_from(end).unwrap_or(i64::MAX)],
            )
            .map_err(err)?;
        }
        crate::failpoint::pause(crate::failpoint::JOURNAL_COMMIT);
        crate::failpoint::fail(crate::failpoint::JOURNAL_COMMIT).map_err(|source| {
            StateError::Io {
                path: path.clone(),
                source,
            }
        })?;
        tx.commit().map_err(err)?;
        Ok(outcomes)
    }

    /// Deletes the sealed segments no journal row refers to any more (after a prune).
    fn remove_unreferenced_segments(&mut self) -> Result<(), StateError> {
        let gone: Vec<(i64, String)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, file FROM segments s WHERE sealed = 1
                     AND NOT EXISTS (SELECT 1 FROM callbacks c WHERE c.segment = s.id)",
                )
                .map_err(self.err())?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.err())?
                .collect::<Result<_, _>>()
                .map_err(self.err())?
        };
        for (id, file) in gone {
            // The row goes first: a crash between the two leaves a stray file, which the next
            // writer's recovery removes.
            self.conn
                .execute("DELETE FROM segments WHERE id = ?1", [id])
                .map_err(self.err())?;
            segments::remove(&self.segment_dir, &file).map_err(self.io_err())?;
        }
        Ok(())
    }
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Store for SqliteStore {
    fn lock(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        Ok(RunGuard::new(RunLock::acquire(
            Path::new(&self.path),
            run_id,
            command,
        )?))
    }

    fn lock_shared(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        // One process per SQLite file: the exclusive lock, as before workers existed.
        self.lock(run_id, command)
    }

    fn lock_publish(&self, _run_id: &str) -> Result<Option<RunGuard>, StateError> {
        Ok(None)
    }

    fn shares_work(&self) -> bool {
        false
    }

    fn claim_jobs(
        &mut self,
        job_ids: &[&str],
        worker: &str,
        now: i64,
        lease_until: i64,
        since: i64,
        max: usize,
    ) -> Result<Vec<String>, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let mut ids: Vec<&str> = job_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut claimed = Vec::new();
        {
            let mut claim = tx
                .prepare_cached(
                    "UPDATE jobs SET claimed_by = ?2, lease_until = ?4, claimed_at = ?3
                     WHERE job_id = ?1
                       AND (claimed_by IS NULL OR lease_until < ?3 OR claimed_by = ?2)
                       AND (status IN ('planned', 'submitted') OR claimed_at IS NULL
                            OR claimed_at < ?5)",
                )
                .map_err(err)?;
            for id in ids {
                if claimed.len() >= max {
                    break;
                }
                if claim
                    .execute(params![id, worker, now, lease_until, since])
                    .map_err(err)?
                    == 1
                {
                    claimed.push(id.to_owned());
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(claimed)
    }

    fn renew_claims(
        &mut self,
        worker: &str,
        job_ids: &[&str],
        lease_until: i64,
    ) -> Result<u64, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET lease_until = ?3 WHERE job_id = ?1 AND claimed_by = ?2",
            )
            .map_err(self.err())?;
        let mut held = 0;
        for id in job_ids {
            held += stmt
                .execute(params![id, worker, lease_until])
                .map_err(self.err())? as u64;
        }
        Ok(held)
    }

    fn release_claims(&mut self, worker: &str, job_ids: &[&str]) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET claimed_by = NULL, lease_until = NULL
                 WHERE job_id = ?1 AND claimed_by = ?2",
            )
            .map_err(self.err())?;
        for id in job_ids {
            stmt.execute(params![id, worker]).map_err(self.err())?;
        }
        Ok(())
    }

    fn take_tokens(
        &mut self,
        account: &str,
        rate: f64,
        burst: f64,
        want: u32,
        now: i64,
    ) -> Result<u32, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let row: Option<(f64, i64)> = tx
            .query_row(
                "SELECT tokens, updated_at FROM rate_budget WHERE account = ?1",
                [account],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let (tokens, updated_at) = row.unwrap_or((burst, now));
        let (granted, left) = super::refill_and_take(tokens, now - updated_at, rate, burst, want);
        tx.execute(
            "INSERT INTO rate_budget (account, tokens, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (account) DO UPDATE SET tokens = excluded.tokens,
               updated_at = excluded.updated_at",
            params![account, left, now.max(updated_at)],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(granted)
    }

    /// Up to `limit` journaled callbacks after `id` (exclusive): `(id, request_id, kind, body)`.
    fn callbacks_since(&self, id: i64, limit: usize) -> Result<Vec<JournalEntry>, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT c.id, c.request_id, c.kind, {BODY_COLUMNS} FROM callbacks c {BODY_JOIN}
                 WHERE c.id > ?1 ORDER BY c.id LIMIT ?2"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![id, limit as i64], |r| {
                Ok(JournalEntry {
                    id: r.get(0)?,
                    request_id: r.get(1)?,
                    kind: r.get(2)?,
                    body: self.body_at(r, 3)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The last finished run: `(run_id, command, finished_at, exit_code)`.
    fn last_run(&self) -> Result<Option<FinishedRun>, StateError> {
        self.conn
            .query_row(
                "SELECT run_id, command, finished_at, exit_code FROM runs
                 WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
                [],
                |r| {
                    Ok(FinishedRun {
                        run_id: r.get(0)?,
                        command: r.get(1)?,
                        finished_at: r.get(2)?,
                        exit_code: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Submitted jobs still waiting for callbacks, with their latest request time:
    /// `(job_id, window_start, latest submitted_at)`.
    fn outstanding_jobs(&self) -> Result<Vec<OutstandingJob>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT j.job_id, j.window_start, MAX(r.submitted_at) FROM jobs j
                 JOIN requests r ON r.job_id = j.job_id
                 WHERE j.status = 'submitted' GROUP BY j.job_id ORDER BY j.window_start",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(OutstandingJob {
                    job_id: r.get(0)?,
                    window_start: r.get(1)?,
                    last_submitted_at: r.get(2)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Jobs per window and status for windows starting in `[from, to)` (texts like
    /// `2021-08-15T00:00:00Z`): `(window_start, window_end, status, jobs)`.
    fn window_status_counts(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<WindowStatusCount>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT window_start, window_end, status, COUNT(*) FROM jobs
                 WHERE window_start >= ?1 AND window_start < ?2
                 GROUP BY window_start, window_end, status ORDER BY window_start, window_end, status",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([from, to], |r| {
                Ok(WindowStatusCount {
                    window_start: r.get(0)?,
                    window_end: r.get(1)?,
                    status: r.get(2)?,
                    jobs: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// How many jobs are in each status.
    fn job_status_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn record_jobs(&mut self, jobs: &[Job]) -> Result<u64, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let now = now_text();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut new = 0u64;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO jobs
                       (job_id, account_name, window_start, window_end, iccids, status, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                )
                .map_err(err)?;
            for job in jobs {
                let iccids: Vec<&str> = job.iccids.iter().map(|i| i.as_str()).collect();
                new += insert
                    .execute(params![
                        job.id.as_str(),
                        job.account_name,
                        job.window.start_time(),
                        job.window.end_time(),
                        iccids.join(","),
                        JobStatus::Planned.as_str(),
                        now
                    ])
                    .map_err(err)? as u64;
            }
        }
        tx.commit().map_err(err)?;
        Ok(new)
    }

    fn job_statuses(&self, job_ids: &[&str]) -> Result<HashMap<String, JobStatus>, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT status FROM jobs WHERE job_id = ?1")
            .map_err(self.err())?;
        let mut out = HashMap::with_capacity(job_ids.len());
        for id in job_ids {
            let status: Option<String> = stmt
                .query_row([id], |r| r.get(0))
                .optional()
                .map_err(self.err())?;
            if let Some(text) = status {
                let status = JobStatus::parse(&text).ok_or_else(|| StateError::Invalid {
                    path: self.path.clone(),
                    message: format!("job {id} has an unknown status {text:?}"),
                })?;
                out.insert((*id).to_owned(), status);
            }
        }
        Ok(out)
    }

    fn apply_job_updates(&mut self, updates: &[JobUpdate]) -> Result<(), StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let now = now_text();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        for update in updates {
            match update {
                JobUpdate::Submitted {
                    job_id,
                    request_id,
                    attempts,
                } => {
                    tx.execute(
                        "INSERT OR IGNORE INTO requests (request_id, job_id, submitted_at) VALUES (?1, ?2, ?3)",
                        params![request_id, job_id, now],
                    )
                    .map_err(err)?;
                    tx.execute(
                        "UPDATE jobs SET status = ?2, attempts = attempts + ?3, last_error = NULL, updated_at = ?4
                         WHERE job_id = ?1",
                        params![job_id, JobStatus::Submitted.as_str(), attempts, now],
                    )
                    .map_err(err)?;
                }
                JobUpdate::Failed {
                    job_id,
                    attempts,
                    error,
                } => {
                    tx.execute(
                        "UPDATE jobs SET status = ?2, attempts = attempts + ?3, last_error = ?4, updated_at = ?5,
                           claimed_by = NULL, lease_until = NULL
                         WHERE job_id = ?1",
                        params![job_id, JobStatus::Failed.as_str(), attempts, error, now],
                    )
                    .map_err(err)?;
                }
                JobUpdate::GaveUp {
                    job_id,
                    attempts,
                    error,
                } => {
                    tx.execute(
                        "UPDATE jobs SET attempts = attempts + ?2, last_error = ?3, updated_at = ?4
                         WHERE job_id = ?1",
                        params![job_id, attempts, error, now],
                    )
                    .map_err(err)?;
                }
                JobUpdate::Completed { job_id } => {
                    tx.execute(
                        "UPDATE jobs SET status = ?2, last_error = NULL, updated_at = ?3,
                           claimed_by = NULL, lease_until = NULL WHERE job_id = ?1",
                        params![job_id, JobStatus::Complete.as_str(), now],
                    )
                    .map_err(err)?;
                }
                JobUpdate::Missing { job_id, error } => {
                    tx.execute(
                        "UPDATE jobs SET status = ?2, last_error = ?3, updated_at = ?4,
                           claimed_by = NULL, lease_until = NULL WHERE job_id = ?1",
                        params![job_id, JobStatus::Missing.as_str(), error, now],
                    )
                    .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }

    fn begin_run(&mut self, run_id: &str, command: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO runs (run_id, command, started_at) VALUES (?1, ?2, ?3)",
                params![run_id, command, now_text()],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn finish_run(
        &mut self,
        run_id: &str,
        exit_code: u8,
        report_json: &str,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE runs SET finished_at = ?2, exit_code = ?3, report = ?4 WHERE run_id = ?1",
                params![run_id, now_text(), exit_code, report_json],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError> {
        if !self.recovered {
            self.recover_segments()?;
            self.recovered = true;
        }
        // Bodies their senders compressed for rows (a listener's group) go straight to the insert:
        // `INSERT OR IGNORE` on the unique digest finds what the journal holds, and a body twice in
        // the group, without a lookup of each first (a read transaction per commit, on the writer
        // thread every callback waits for).
        if self.inline_below > 0 && !batch.is_empty() && batch.iter().all(|cb| cb.encoded.is_some())
        {
            let all: Vec<usize> = (0..batch.len()).collect();
            return self.commit_index(batch, &all, None, received_at);
        }
        // Which bodies are new: the journal's, and a body twice in one batch, once.
        let mut outcomes = vec![Journaled::AlreadyJournaled; batch.len()];
        let mut fresh = Vec::with_capacity(batch.len());
        {
            // In one read transaction: the file lock is taken once, not once per lookup.
            let read = self.conn.unchecked_transaction().map_err(self.err())?;
            let mut known = read
                .prepare_cached("SELECT 1 FROM callbacks WHERE body_digest = ?1")
                .map_err(self.err())?;
            let mut seen = std::collections::HashSet::with_capacity(batch.len());
            for (i, cb) in batch.iter().enumerate() {
                if seen.insert(cb.digest) && !known.exists([&cb.digest[..]]).map_err(self.err())? {
                    fresh.push(i);
                }
            }
            drop(known);
            read.commit().map_err(self.err())?;
        }
        if fresh.is_empty() {
            return Ok(outcomes);
        }
        // Rows also keep the bodies of a small commit. A batch (drop directory, archive) goes to
        // the segment.
        let bytes: usize = fresh.iter().map(|&i| batch[i].body.len()).sum();
        if self.inline_below > 0 && bytes < self.inline_below {
            let new = self.commit_index(batch, &fresh, None, received_at)?;
            for (&i, outcome) in fresh.iter().zip(new) {
                outcomes[i] = outcome;
            }
            return Ok(outcomes);
        }
        // Their bodies go to this process's segment first, durably; the rows that index them
        // commit after (a crash between the two leaves an unreferenced tail, see `segments`).
        let mut appender = self.appender()?;
        let mut frames = match self.frames.take() {
            Some(frames) => frames,
            None => Frames::new(self.compression).map_err(self.io_err())?,
        };
        frames.clear();
        // Bodies its caller packed in frames of this store's kind are appended as they are.
        let packed: Option<Vec<_>> = fresh
            .iter()
            .map(|&i| {
                batch[i]
                    .packed
                    .filter(|(p, _)| p.compression() == self.compression)
            })
            .collect();
        let appended = match packed {
            Some(packed) => Ok(frames.adopt(appender.end(), &packed, &appender.name)),
            None => fresh
                .iter()
                .map(|&i| frames.push(batch[i].body.as_bytes()))
                .collect::<std::io::Result<Vec<_>>>()
                .and_then(|placements| frames.finish(appender.end(), &placements, &appender.name)),
        }
        .and_then(|(bytes, refs)| Ok((appender.append(bytes)?, refs)));
        self.frames = Some(frames);
        let (end, refs) = match appended {
            Ok(done) => done,
            Err(e) => {
                self.appender = Some(appender);
                return Err(self.io_err()(e));
            }
        };
        let committed =
            self.commit_index(batch, &fresh, Some((&refs, &appender, end)), received_at);
        if let Ok(new) = &committed {
            appender.committed(end);
            for (&i, outcome) in fresh.iter().zip(new) {
                outcomes[i] = *outcome;
            }
        }
        self.appender = Some(appender);
        committed.map(|_| outcomes)
    }

    fn pending_partitions(&self) -> Result<Vec<PendingPartition>, StateError> {
        // The distinct partitions by jumps through the (partition, callback_id) key, and each one's
        // newest callback by a seek: a handful of index lookups per partition, however long the
        // journal (a GROUP BY over every row grew with the history).
        let mut stmt = self
            .conn
            .prepare_cached(
                "WITH RECURSIVE parts(partition) AS (
                   SELECT MIN(partition) FROM callback_partitions
                   UNION ALL
                   SELECT (SELECT MIN(cp.partition) FROM callback_partitions cp
                           WHERE cp.partition > parts.partition)
                   FROM parts WHERE parts.partition IS NOT NULL
                 )
                 SELECT parts.partition,
                        (SELECT MAX(cp.callback_id) FROM callback_partitions cp
                         WHERE cp.partition = parts.partition) AS through
                 FROM parts LEFT JOIN partitions p ON p.partition = parts.partition
                 WHERE parts.partition IS NOT NULL
                   AND through > COALESCE(p.written_through, 0)
                 ORDER BY parts.partition",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PendingPartition {
                    partition: r.get(0)?,
                    through_id: r.get(1)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    fn callbacks_for_partition(
        &self,
        partition: &str,
        through_id: i64,
        each: &mut dyn FnMut(StoredCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT c.id, c.request_id, c.received_at, j.account_name, {BODY_COLUMNS}
                 FROM callback_partitions cp
                 JOIN callbacks c ON c.id = cp.callback_id
                 {BODY_JOIN}
                 LEFT JOIN requests r ON r.request_id = c.request_id
                 LEFT JOIN jobs j ON j.job_id = r.job_id
                 WHERE cp.partition = ?1 AND cp.callback_id <= ?2
                 ORDER BY c.received_at, c.id"
            ))
            .map_err(self.err())?;
        let mut rows = stmt
            .query(params![partition, through_id])
            .map_err(self.err())?;
        while let Some(row) = rows.next().map_err(self.err())? {
            let cb = (|| {
                Ok(StoredCallback {
                    id: row.get(0)?,
                    request_id: row.get(1)?,
                    received_at: row.get(2)?,
                    body: self.body_at(row, 4)?,
                    account_name: row.get(3)?,
                })
            })()
            .map_err(self.err())?;
            if each(cb).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn mark_written(
        &mut self,
        partition: &str,
        through_id: i64,
        rows: u64,
        files: u64,
        run_id: &str,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO partitions (partition, written_through, rows, files, written_at, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (partition) DO UPDATE SET
                   written_through = MAX(written_through, excluded.written_through),
                   rows = excluded.rows, files = excluded.files,
                   written_at = excluded.written_at, run_id = excluded.run_id",
                params![partition, through_id, rows as i64, files as i64, now_text(), run_id],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn request_accounts(
        &self,
        request_ids: &[&str],
    ) -> Result<HashMap<String, String>, StateError> {
        // One statement for the whole batch (the ids as a JSON array), not one per callback.
        let ids = serde_json::to_string(request_ids).unwrap_or_else(|_| "[]".into());
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT r.request_id, j.account_name FROM requests r JOIN jobs j ON j.job_id = r.job_id
                 WHERE r.request_id IN (SELECT value FROM json_each(?1))",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([ids], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn partition_callbacks(&self, partition: &str, through_id: i64) -> Result<u64, StateError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM callback_partitions WHERE partition = ?1 AND callback_id <= ?2",
                params![partition, through_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(self.err())
    }

    fn ping(&self) -> Result<(), StateError> {
        self.conn
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map(drop)
            .map_err(self.err())
    }

    fn journal_len(&self) -> Result<u64, StateError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM callbacks", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.err())
    }

    fn journal_high_water(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM callbacks", [], |r| {
                r.get(0)
            })
            .map_err(self.err())
    }

    fn requests_of_jobs(&self, job_ids: &[&str]) -> Result<Vec<RecordedRequest>, StateError> {
        let ids = serde_json::to_string(job_ids).unwrap_or_else(|_| "[]".into());
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT request_id, job_id FROM requests
                 WHERE job_id IN (SELECT value FROM json_each(?1)) ORDER BY rowid",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([ids], |r| {
                Ok(RecordedRequest {
                    request_id: r.get(0)?,
                    job_id: r.get(1)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn archivable(
        &self,
        before: i64,
        each: &mut dyn FnMut(ArchivedCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT c.id, c.request_id, c.kind, c.received_at, c.source, j.account_name,
                        (SELECT json_group_array(partition) FROM callback_partitions
                          WHERE callback_id = c.id),
                        {BODY_COLUMNS}
                 FROM callbacks c
                 {BODY_JOIN}
                 LEFT JOIN requests r ON r.request_id = c.request_id
                 LEFT JOIN jobs j ON j.job_id = r.job_id
                 WHERE c.received_at < ?1
                   AND c.id < (SELECT MAX(id) FROM callbacks)
                   AND (j.status IS NULL OR j.status NOT IN (?2, ?3))
                   AND NOT EXISTS (
                     SELECT 1 FROM callback_partitions cp
                     LEFT JOIN partitions p ON p.partition = cp.partition
                     WHERE cp.callback_id = c.id
                       AND (p.written_through IS NULL OR p.written_through < cp.callback_id))
                 ORDER BY c.received_at, c.id"
            ))
            .map_err(self.err())?;
        let mut rows = stmt
            .query(params![
                before,
                JobStatus::Planned.as_str(),
                JobStatus::Submitted.as_str()
            ])
            .map_err(self.err())?;
        while let Some(row) = rows.next().map_err(self.err())? {
            let cb = (|| {
                let partitions: String = row.get(6)?;
                Ok(ArchivedCallback {
                    id: row.get(0)?,
                    request_id: row.get(1)?,
                    kind: row.get(2)?,
                    received_at: row.get(3)?,
                    source: row.get(4)?,
                    body: self.body_at(row, 7)?,
                    account_name: row.get(5)?,
                    partitions: serde_json::from_str(&partitions).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            6,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                })
            })()
            .map_err(self.err())?;
            if each(cb).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn archive_files(&self) -> Result<std::collections::BTreeSet<String>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT file FROM archive_files")
            .map_err(self.err())?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn partition_archives(&self, partition: &str) -> Result<Vec<String>, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT ap.file FROM archived_partitions ap JOIN archive_files f ON f.file = ap.file
                 WHERE ap.partition = ?1 ORDER BY f.archived_at, f.first_id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([partition], |r| r.get(0))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn commit_archive(
        &mut self,
        files: &[ArchiveFile],
        ids: &[i64],
        before: i64,
        run_id: &str,
    ) -> Result<PruneCounts, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let now = now_text();
        let before_text = chrono::DateTime::from_timestamp_micros(before)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut counts = PruneCounts::default();
        for f in files {
            tx.execute(
                "INSERT INTO archive_files (file, callbacks, first_id, last_id, bytes, archived_at, run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    f.file,
                    f.callbacks as i64,
                    f.first_id,
                    f.last_id,
                    f.bytes as i64,
                    now,
                    run_id
                ],
            )
            .map_err(err)?;
            for (partition, n) in &f.partitions {
                tx.execute(
                    "INSERT INTO archived_partitions (partition, file, callbacks) VALUES (?1, ?2, ?3)",
                    params![partition, f.file, *n as i64],
                )
                .map_err(err)?;
            }
        }
        for chunk in ids.chunks(10_000) {
            let list = serde_json::to_string(chunk).unwrap_or_else(|_| "[]".into());
            tx.execute(
                "DELETE FROM callback_partitions
                 WHERE callback_id IN (SELECT value FROM json_each(?1))",
                [&list],
            )
            .map_err(err)?;
            counts.callbacks_archived += tx
                .execute(
                    "DELETE FROM callbacks WHERE id IN (SELECT value FROM json_each(?1))",
                    [&list],
                )
                .map_err(err)? as u64;
        }
        // Windows end at midnight, `YYYY-MM-DDT00:00:00Z`: compared as text with the horizon.
        counts.jobs_compacted = tx
            .execute(
                "UPDATE jobs SET iccids = '' WHERE iccids <> '' AND window_end < ?1
                   AND status IN (?2, ?3, ?4)",
                params![
                    &before_text[..10.min(before_text.len())],
                    JobStatus::Complete.as_str(),
                    JobStatus::Failed.as_str(),
                    JobStatus::Missing.as_str()
                ],
            )
            .map_err(err)? as u64;
        counts.run_reports_dropped = tx
            .execute(
                "UPDATE runs SET report = NULL WHERE report IS NOT NULL AND finished_at < ?1",
                [&before_text],
            )
            .map_err(err)? as u64;
        crate::failpoint::pause(crate::failpoint::PRUNE_COMMIT);
        tx.commit().map_err(err)?;
        self.remove_unreferenced_segments()?;
        Ok(counts)
    }

    fn reclaim_space(&mut self) -> Result<(), StateError> {
        let mode: i64 = self
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .map_err(self.err())?;
        if mode == 2 {
            self.conn
                .execute_batch("PRAGMA incremental_vacuum")
                .map_err(self.err())?;
        } else {
            // Once per store: rewrites it (now that the prune made it small) with incremental
            // vacuum on, so that later prunes free pages without rewriting anything.
            self.conn
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM")
                .map_err(self.err())?;
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(self.err())
    }

    fn callbacks_of_requests(
        &self,
        request_ids: &[&str],
        through_id: i64,
        each: &mut dyn FnMut(i64, String, String),
    ) -> Result<(), StateError> {
        let ids = serde_json::to_string(request_ids).unwrap_or_else(|_| "[]".into());
        // Through the index on request_id: the cost is these requests' callbacks, not the journal's.
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT c.id, c.request_id, {BODY_COLUMNS} FROM callbacks c {BODY_JOIN}
                 WHERE c.request_id IN (SELECT value FROM json_each(?1)) AND c.id <= ?2
                 ORDER BY c.id"
            ))
            .map_err(self.err())?;
        let mut rows = stmt.query(params![ids, through_id]).map_err(self.err())?;
        while let Some(row) = rows.next().map_err(self.err())? {
            let (id, request_id, body) =
                (|| Ok((row.get(0)?, row.get(1)?, self.body_at(row, 2)?)))().map_err(self.err())?;
            each(id, request_id, body);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn journal_is_idempotent_on_identical_bodies_and_tracks_partitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s/t.db");
        let mut store = SqliteStore::open(&path).expect("open");
        assert_eq!(
            store.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        let parts: BTreeSet<String> = ["usage_date=2021-08-15".to_string()].into();
        let body = r#"{"requestId":"r1"}"#;
        let digest = super::super::body_digest(body);
        let cb = NewCallback {
            request_id: "r1",
            digest: &digest,
            kind: "usage",
            source: "a.json",
            body,
            encoded: None,
            packed: None,
            partitions: &parts,
            received_at: None,
        };
        let first = store
            .journal(std::slice::from_ref(&cb), 10)
            .expect("journal");
        assert!(matches!(first[0], Journaled::New(_)));
        let again = store.journal(&[cb], 20).expect("journal");
        assert_eq!(again, vec![Journaled::AlreadyJournaled]);
        assert_eq!(store.journal_len().expect("len"), 1);

        let pending = store.pending_partitions().expect("pending");
        assert_eq!(pending.len(), 1);
        store
            .mark_written("usage_date=2021-08-15", pending[0].through_id, 1, 1, "run")
            .expect("mark");
        assert!(store.pending_partitions().expect("pending").is_empty());

        // Reopening keeps everything and does not migrate twice.
        drop(store);
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.journal_len().expect("len"), 1);
    }

    fn callback<'a>(
        request_id: &'a str,
        body: &'a str,
        digest: &'a crate::state::Digest,
        parts: &'a BTreeSet<String>,
    ) -> NewCallback<'a> {
        NewCallback {
            request_id,
            digest,
            kind: "usage",
            source: "a.json",
            body,
            encoded: None,
            packed: None,
            partitions: parts,
            received_at: None,
        }
    }

    /// A listener's group (bodies its senders compressed): a body the journal holds and a body
    /// twice in the group are each "already journaled", found by the insert itself; the rest are
    /// new, in order, with their partitions, and read back as sent.
    #[test]
    fn a_group_of_compressed_bodies_is_journaled_once_each_without_a_lookup_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        let parts: BTreeSet<String> = ["usage_date=2021-08-15".to_string()].into();
        let bodies = [
            r#"{"requestId":"r1"}"#,
            r#"{"requestId":"r2"}"#,
            r#"{"requestId":"r3"}"#,
        ];
        let digests: Vec<_> = bodies
            .iter()
            .map(|b| super::super::body_digest(b))
            .collect();
        let encoded: Vec<_> = bodies.iter().map(|b| encode_body(b)).collect();
        let sent = |i: usize| NewCallback {
            encoded: Some((&encoded[i].0, encoded[i].1)),
            ..callback("r", bodies[i], &digests[i], &parts)
        };
        assert!(matches!(
            store.journal(&[sent(0)], 10).expect("journal")[..],
            [Journaled::New(_)]
        ));
        // r1 again, r2, r3, r2 again: in one group.
        let outcomes = store
            .journal(&[sent(0), sent(1), sent(2), sent(1)], 20)
            .expect("journal");
        let [a, b, c, d] = outcomes[..] else {
            panic!("four outcomes: {outcomes:?}");
        };
        assert_eq!(
            (a, d),
            (Journaled::AlreadyJournaled, Journaled::AlreadyJournaled)
        );
        let (Journaled::New(b), Journaled::New(c)) = (b, c) else {
            panic!("r2 and r3 are new: {outcomes:?}");
        };
        assert!(b < c, "journal order is the group's order");
        assert_eq!(store.journal_len().expect("len"), 3);
        assert_eq!(
            store
                .partition_callbacks("usage_date=2021-08-15", c)
                .expect("count"),
            3
        );
        let mut read = Vec::new();
        store
            .callbacks_for_partition("usage_date=2021-08-15", c, &mut |cb| {
                read.push(cb.body);
                std::ops::ControlFlow::Continue(())
            })
            .expect("read");
        assert_eq!(read, bodies);
    }

    /// Each journaled body's `body_encoding`, oldest first.
    fn body_encodings(store: &SqliteStore) -> Vec<String> {
        store
            .conn
            .prepare("SELECT body_encoding FROM callbacks ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// A store written night after night while `journal_compression` changes (an upgrade to the
    /// LZ4 default, a switch back to zstd): every body reads back, each from frames of its own kind.
    #[test]
    fn bodies_written_with_each_compression_in_turn_all_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let parts: BTreeSet<String> = ["usage_date=2021-08-15".to_string()].into();
        let kinds = [
            JournalCompression::Zstd,
            JournalCompression::Lz4,
            JournalCompression::None,
            JournalCompression::Zstd,
        ];
        let bodies: Vec<String> = (0..kinds.len() * 2)
            .map(|i| format!(r#"{{"requestId":"r{i}","pad":"{}"}}"#, "xy".repeat(i * 200)))
            .collect();
        let digests: Vec<_> = bodies
            .iter()
            .map(|b| super::super::body_digest(b))
            .collect();
        let ids: Vec<String> = (0..bodies.len()).map(|i| format!("r{i}")).collect();
        for (night, &compression) in kinds.iter().enumerate() {
            let mut store = SqliteStore::open_with(&path, compression)
                .expect("open")
                .always_segments();
            let cbs: Vec<NewCallback<'_>> = (night * 2..night * 2 + 2)
                .map(|i| callback(&ids[i], &bodies[i], &digests[i], &parts))
                .collect();
            store.journal(&cbs, 10 + night as i64).expect("journal");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        let encodings = body_encodings(&store);
        let expected: Vec<&str> = kinds
            .iter()
            .flat_map(|&k| [segments::encoding(k); 2])
            .collect();
        assert_eq!(encodings, expected);
        let since: Vec<String> = store
            .callbacks_since(0, 100)
            .expect("since")
            .into_iter()
            .map(|c| c.body)
            .collect();
        assert_eq!(since, bodies);
    }

    /// Bodies in segments (compressed or not) and in rows read back the same through every reading
    /// path; a prune that archives a sealed segment's callbacks deletes the segment.
    #[test]
    fn bodies_in_segments_and_rows_read_back_the_same_and_pruned_segments_go() {
        for compression in [
            JournalCompression::Lz4,
            JournalCompression::Zstd,
            JournalCompression::None,
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.db");
            let parts: BTreeSet<String> = ["usage_date=2021-08-15".to_string()].into();
            let bodies: Vec<String> = (0..6)
                .map(|i| format!(r#"{{"requestId":"r{i}","pad":"{}"}}"#, "x".repeat(i * 300)))
                .collect();
            let digests: Vec<_> = bodies
                .iter()
                .map(|b| super::super::body_digest(b))
                .collect();
            let ids: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
            let cbs: Vec<NewCallback<'_>> = (0..6)
                .map(|i| callback(&ids[i], &bodies[i], &digests[i], &parts))
                .collect();
            {
                // Two commits to a segment, then one kept in its rows.
                let mut store = SqliteStore::open_with(&path, compression)
                    .expect("open")
                    .always_segments();
                let first = store.journal(&cbs[..2], 10).expect("journal");
                let second = store.journal(&cbs[..4], 20).expect("journal");
                assert_eq!(
                    second[..2],
                    [Journaled::AlreadyJournaled, Journaled::AlreadyJournaled],
                    "{first:?} {second:?}"
                );
                store.inline_below = usize::MAX;
                store.journal(&cbs[4..], 30).expect("journal");
                let encodings = body_encodings(&store);
                let segment = segments::encoding(compression);
                assert_eq!(encodings[..4], [segment; 4]);
                assert_eq!(encodings[4..], ["zstd"; 2]);
            }
            let store = SqliteStore::open(&path).expect("reopen");
            let since: Vec<String> = store
                .callbacks_since(0, 100)
                .expect("since")
                .into_iter()
                .map(|c| c.body)
                .collect();
            assert_eq!(since, bodies);
            let mut by_partition = Vec::new();
            store
                .callbacks_for_partition("usage_date=2021-08-15", i64::MAX, &mut |c| {
                    by_partition.push(c.body);
                    ControlFlow::Continue(())
                })
                .expect("partition");
            assert_eq!(by_partition, bodies);
            let mut of_requests = Vec::new();
            let asked: Vec<&str> = ids.iter().map(String::as_str).collect();
            store
                .callbacks_of_requests(&asked, i64::MAX, &mut |_, _, body| of_requests.push(body))
                .expect("requests");
            assert_eq!(of_requests, bodies);

            // Archive the segment's four callbacks (the journal's newest always stays).
            let mut store = store;
            let high = store.journal_high_water().expect("high");
            store
                .mark_written("usage_date=2021-08-15", high, 6, 1, "run")
                .expect("mark");
            let mut archivable = Vec::new();
            store
                .archivable(i64::MAX, &mut |c| {
                    archivable.push((c.id, c.body));
                    ControlFlow::Continue(())
                })
                .expect("archivable");
            assert_eq!(archivable.len(), 5);
            assert_eq!(archivable[0].1, bodies[0]);
            let seg_dir = store.segment_dir().to_owned();
            let files = || std::fs::read_dir(&seg_dir).map_or(0, |d| d.count());
            assert_eq!(files(), 1);
            let ids: Vec<i64> = archivable[..4].iter().map(|a| a.0).collect();
            store
                .commit_archive(&[], &ids, i64::MAX, "prune")
                .expect("prune");
            assert_eq!(files(), 0, "the emptied, sealed segment is deleted");
            assert_eq!(store.journal_len().expect("len"), 2);
        }
    }
}
