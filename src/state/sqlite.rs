//! `SqliteStore`: the state store in one SQLite file (WAL mode, `synchronous=FULL`: a commit is on disk
//! when it returns). The store's rules are [`super::rules`]'; this is the backend: SQLite's words,
//! its connection, the run lock (`flock`), and the journal's bodies in segment files.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, params};

use super::lock::RunLock;
use super::rules::{JournalRow, SqlStore, commit_journal, now_text, row_body};
use super::segments::{self, Appender, BodyRef, Frames, Reader, Recovery};
use super::sql::{Backend, Dialect, Exec, Family, Row, Statement, Value};
use super::{Journaled, NewCallback, RunGuard, StateError};
use crate::config::JournalCompression;

/// How long a writer waits for another process (a `tsusage listen`) to finish its commit.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

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

/// The embedded state store.
pub type SqliteStore = SqlStore<Sqlite>;

/// SQLite's words.
static SQLITE: Dialect = Dialect {
    family: Family::Sqlite,
    int: "INTEGER",
    id: "INTEGER PRIMARY KEY",
    real: "REAL",
    blob: "BLOB",
    key: "TEXT",
    without_rowid: " WITHOUT ROWID",
    request_order: "rowid",
    // One process writes at a time (`BEGIN IMMEDIATE`): nothing to skip or hold.
    skip_locked: "",
    for_update: "",
    now_ms: "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    // A conflict draws no rowid, and a subquery on `callbacks` would have SQLite copy each row
    // through a temporary table first.
    new_digest_only: "WHERE true",
    migrate_lock: None,
    journal_lock: None,
};

/// The SQLite backend: one connection to the store's file, and the journal's segment files.
#[derive(Debug)]
pub struct Sqlite {
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

impl Drop for Sqlite {
    fn drop(&mut self) {
        // Sealed: no one appends to it again (a crash leaves it to the next writer's recovery).
        if let Some(appender) = self.appender.take() {
            let _ = self.seal(appender.id);
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
        SqlStore::migrated(Sqlite::open(path, compression)?)
    }

    /// Every commit's bodies to the segment, however small (for tests of the segment path).
    #[doc(hidden)]
    pub fn always_segments(mut self) -> Self {
        self.db.inline_below = 0;
        self
    }

    /// The directory of the journal's segment files.
    pub fn segment_dir(&self) -> &Path {
        &self.db.segment_dir
    }
}

/// Binds `params` to `stmt` by name: the rules write `$1`, which SQLite reads as a parameter named
/// `$1` (numbered by first appearance, so not necessarily its first).
fn bind(stmt: &mut rusqlite::Statement<'_>, params: &[Value]) -> rusqlite::Result<()> {
    for i in 1..=stmt.parameter_count() {
        let value = stmt
            .parameter_name(i)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| params.get(n.checked_sub(1)?))
            .ok_or(rusqlite::Error::InvalidParameterCount(i, params.len()))?;
        stmt.raw_bind_parameter(i, value)?;
    }
    Ok(())
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            Value::Int(v) => ToSqlOutput::from(*v),
            Value::Real(v) => ToSqlOutput::from(*v),
            Value::Text(v) => ToSqlOutput::from(v.as_str()),
            Value::Blob(v) => ToSqlOutput::from(v.as_slice()),
            // Lists are JSON arrays, for `json_each` (see `Dialect::any`).
            Value::Texts(v) => ToSqlOutput::from(serde_json::to_string(v).unwrap_or_default()),
            Value::Ints(v) => ToSqlOutput::from(serde_json::to_string(v).unwrap_or_default()),
        })
    }
}

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let n = row.as_ref().column_count();
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        values.push(match row.get_ref(i)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(v) => Value::Int(v),
            ValueRef::Real(v) => Value::Real(v),
            ValueRef::Text(v) => Value::Text(String::from_utf8_lossy(v).into_owned()),
            ValueRef::Blob(v) => Value::Blob(v.to_vec()),
        });
    }
    Ok(Row(values))
}

/// A connection (or a transaction on it) running the rules' statements.
struct On<'c> {
    conn: &'c Connection,
    path: &'c str,
}

impl On<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Backend {
            path: self.path.to_owned(),
            source: Box::new(source),
        }
    }
}

impl Exec for On<'_> {
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StateError> {
        let mut rows = Vec::new();
        self.query_each(sql, params, &mut |row| {
            rows.push(row);
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(rows)
    }

    fn query_each(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        bind(&mut stmt, params).map_err(self.err())?;
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(self.err())? {
            if each(read_row(row).map_err(self.err())?)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StateError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        bind(&mut stmt, params).map_err(self.err())?;
        let changed = stmt.raw_execute().map_err(self.err())?;
        Ok(changed as u64)
    }

    fn execute_all(&self, statements: Vec<Statement<'_>>) -> Result<Vec<u64>, StateError> {
        statements
            .iter()
            .map(|(sql, params)| self.execute(sql, params))
            .collect()
    }

    fn insert_all(&self, sql: &str, rows: Vec<Vec<Value>>) -> Result<Vec<Option<i64>>, StateError> {
        // `last_insert_rowid`, not `RETURNING`: SQLite would open a temporary table for each.
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        rows.iter()
            .map(|params| {
                bind(&mut stmt, params)?;
                let inserted = stmt.raw_execute()? == 1;
                Ok(inserted.then(|| self.conn.last_insert_rowid()))
            })
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())
    }

    fn batch(&self, sql: &str) -> Result<(), StateError> {
        self.conn.execute_batch(sql).map_err(self.err())
    }
}

impl Sqlite {
    fn open(path: &Path, compression: JournalCompression) -> Result<Sqlite, StateError> {
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
        let mut db = Sqlite {
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
        db.configure()?;
        Ok(db)
    }

    fn on(&self) -> On<'_> {
        On {
            conn: &self.conn,
            path: &self.path,
        }
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Backend {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }

    fn io_err(&self) -> impl Fn(std::io::Error) -> StateError + '_ {
        |source| StateError::Io {
            path: self.path.clone(),
            source,
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

    /// Marks segment `id` sealed: no one appends to it again.
    fn seal(&self, id: i64) -> Result<(), StateError> {
        self.execute(
            "UPDATE segments SET sealed = 1 WHERE id = $1",
            &[Value::Int(id)],
        )
        .map(drop)
    }

    /// Removes segment `id`'s row (its file is gone, or goes next).
    fn forget_segment(&self, id: i64) -> Result<(), StateError> {
        self.execute("DELETE FROM segments WHERE id = $1", &[Value::Int(id)])
            .map(drop)
    }

    /// This process's segment, created on first use.
    fn appender(&mut self) -> Result<Appender, StateError> {
        if let Some(appender) = self.appender.take() {
            if appender.end() < segments::ROLL_BYTES {
                return Ok(appender);
            }
            self.seal(appender.id)?;
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
                    self.seal(*id)?;
                }
                Recovery::Missing => {
                    self.forget_segment(*id)?;
                }
            }
        }
        let known: Vec<String> = rows.into_iter().map(|r| r.1).collect();
        for stray in segments::remove_strays(&self.segment_dir, &known).map_err(self.io_err())? {
            tracing::info!(segment = %stray, "journal segment: removed a file no commit recorded");
        }
        Ok(())
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
            self.forget_segment(id)?;
            segments::remove(&self.segment_dir, &file).map_err(self.io_err())?;
        }
        Ok(())
    }
}

impl Exec for Sqlite {
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StateError> {
        self.on().query(sql, params)
    }

    fn query_each(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError> {
        self.on().query_each(sql, params, each)
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StateError> {
        self.on().execute(sql, params)
    }

    fn execute_all(&self, statements: Vec<Statement<'_>>) -> Result<Vec<u64>, StateError> {
        self.on().execute_all(statements)
    }

    fn insert_all(&self, sql: &str, rows: Vec<Vec<Value>>) -> Result<Vec<Option<i64>>, StateError> {
        self.on().insert_all(sql, rows)
    }

    fn batch(&self, sql: &str) -> Result<(), StateError> {
        self.on().batch(sql)
    }
}

impl Backend for Sqlite {
    fn name(&self) -> &str {
        &self.path
    }

    fn dialect(&self) -> &'static Dialect {
        &SQLITE
    }

    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&dyn Exec) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let path = self.path.clone();
        let err = |source: rusqlite::Error| StateError::Backend {
            path: path.clone(),
            source: Box::new(source),
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        // Rolled back on drop when `f` fails.
        let out = f(&On {
            conn: &tx,
            path: &path,
        })?;
        tx.commit().map_err(err)?;
        Ok(out)
    }

    fn lock(&self, run_id: &str, command: &str, _shared: bool) -> Result<RunGuard, StateError> {
        // One process per SQLite file: always the exclusive lock, as before workers existed.
        Ok(RunGuard::new(RunLock::acquire(
            Path::new(&self.path),
            run_id,
            command,
        )?))
    }

    fn lock_publish(&self) -> Result<Option<RunGuard>, StateError> {
        Ok(None)
    }

    fn shares_work(&self) -> bool {
        false
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
        // the insert on the unique digest finds what the journal holds, and a body twice in
        // the group, without a lookup of each first (a read transaction per commit, on the writer
        // thread every callback waits for).
        if self.inline_below > 0 && !batch.is_empty() && batch.iter().all(|cb| cb.encoded.is_some())
        {
            let rows: Vec<JournalRow<'_>> = batch.iter().map(JournalRow::inline).collect();
            return commit_journal(self, &rows, None, received_at);
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
            let rows: Vec<JournalRow<'_>> = fresh
                .iter()
                .map(|&i| JournalRow::inline(&batch[i]))
                .collect();
            let new = commit_journal(self, &rows, None, received_at)?;
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
        let encoding = segments::encoding(self.compression);
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let rows: Vec<JournalRow<'_>> = fresh
            .iter()
            .zip(&refs)
            .map(|(&i, r)| JournalRow {
                callback: &batch[i],
                body: Cow::Borrowed(&[][..]),
                encoding,
                at: Some([
                    appender.id,
                    int(r.frame_offset),
                    int(r.frame_len),
                    int(r.body_offset),
                    int(r.body_len),
                ]),
            })
            .collect();
        let committed = commit_journal(self, &rows, Some((appender.id, int(end))), received_at);
        if let Ok(new) = &committed {
            appender.committed(end);
            for (&i, outcome) in fresh.iter().zip(new) {
                outcomes[i] = *outcome;
            }
        }
        self.appender = Some(appender);
        committed.map(|_| outcomes)
    }

    /// A body in a segment (checked against its digest), or in the row itself for rows older than
    /// segments and small commits.
    fn body(&self, row: &Row, first: usize) -> Result<String, StateError> {
        let bad = |e| self.bad(e);
        let encoding = row.text(first + 1).map_err(bad)?;
        let Some(compression) = segments::compression_of(&encoding) else {
            return row_body(self, row, first);
        };
        let at = |i: usize| -> Result<u64, StateError> {
            Ok(u64::try_from(row.int(first + i).map_err(bad)?).unwrap_or(0))
        };
        let file = row
            .opt_text(first + 2)
            .map_err(bad)?
            .ok_or_else(|| StateError::Invalid {
                path: self.path.clone(),
                message: "a journaled body's segment is not recorded".into(),
            })?;
        let r = BodyRef {
            file,
            frame_offset: at(3)?,
            frame_len: at(4)?,
            body_offset: at(5)?,
            body_len: at(6)?,
            compression,
        };
        let digest = row.bytes(first + 7).map_err(bad)?;
        self.reader
            .read(&self.segment_dir, &r, digest)
            .map_err(|source| StateError::Backend {
                path: self.path.clone(),
                source,
            })
    }

    fn pruned(&mut self) -> Result<(), StateError> {
        self.remove_unreferenced_segments()
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Store, encode_body, schema};
    use std::collections::BTreeSet;

    #[test]
    fn journal_is_idempotent_on_identical_bodies_and_tracks_partitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s/t.db");
        let mut store = SqliteStore::open(&path).expect("open");
        assert_eq!(store.schema_version().expect("version"), schema::VERSION);
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
            .db
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
                store.db.inline_below = usize::MAX;
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
