//! `PgStore`: the state store on PostgreSQL (`state.url`), for several listeners and workers sharing
//! one store: the same tables and migrations as [`super::SqliteStore`], behind the same [`Store`]
//! trait.
//!
//! # Calling a synchronous trait from anywhere
//!
//! [`Store`] is synchronous, and it is called from a plain thread (the [`super::StateWriter`]),
//! from tokio's blocking pool and straight from async tasks on multi-thread and current-thread
//! runtimes. `block_on` panics inside a runtime, so the store owns one thread of its own running a
//! current-thread runtime with the connection pool; each call is sent there as a future and its
//! answer awaited with a blocking `std` channel receive. That works the same in every context (the
//! caller's thread blocks, as a SQLite call blocks it, and never needs a runtime), and there is one
//! place where the store's async code runs. Rows are fetched in pages of [`PAGE`] so that a partition
//! of many callbacks is never held whole in memory and the caller's closures run on its own thread.
//!
//! # Ordering and locks
//!
//! - Journal ids are handed out at insert, not at commit: with several writer processes, a reader
//!   could see id 12 committed while id 11 is still to commit, and skip 11 for good (readers follow
//!   the journal by id: `callbacks_since`, `journal_high_water`, `mark_written(through_id)`). Each
//!   journal transaction therefore takes a transaction-level advisory lock before its first insert
//!   (`pg_advisory_xact_lock`, released by the commit), so ids are committed in increasing order.
//! - The run lock ([`Store::lock`]) is a session-level advisory lock on a connection held for the
//!   guard's lifetime; the server drops it when that connection ends, however the holder dies.
//! - Migrations run under a transaction-level advisory lock, so replicas starting together migrate
//!   once.
//!
//! Every advisory key is (a constant per use, `hashtext(current_schema())`): one store per schema.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{FromSql, ToSql};

use super::{
    ArchiveFile, ArchivedCallback, FinishedRun, JobStatus, JobUpdate, JournalEntry, Journaled,
    NewCallback, OutstandingJob, PendingPartition, PruneCounts, RecordedRequest, RunGuard,
    StateError, Store, StoredCallback, WindowStatusCount,
};
use crate::plan::Job;

/// Rows per page when reading callbacks back (bodies of a few KB each).
pub const PAGE: i64 = 1000;
/// Connections the store's pool keeps (the store serves one call at a time; the run lock has its
/// own connection, taken out of the pool).
const POOL_SIZE: usize = 2;
/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping the run lock waits for the server to release it.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Advisory lock classes (the first key; the second is the schema's hash).
const RUN_LOCK: i32 = 0x7473_7501;
const JOURNAL_LOCK: i32 = 0x7473_7502;
const MIGRATE_LOCK: i32 = 0x7473_7503;
/// One writer of partitions at a time among the workers of a range (session-level, exclusive).
const PUBLISH_LOCK: i32 = 0x7473_7504;

/// The schema, one entry per version, as [`super::SqliteStore`]'s with PostgreSQL types: BIGINT
/// for SQLite's INTEGER, BYTEA for its blobs, identity columns for its rowids (`requests.seq` keeps
/// the order requests were recorded in, which SQLite reads from the rowid), and byte-wise text
/// order (`COLLATE "C"`) as SQLite compares text.
const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE runs (
        run_id      TEXT COLLATE "C" PRIMARY KEY,
        command     TEXT NOT NULL,
        started_at  TEXT COLLATE "C" NOT NULL,
        finished_at TEXT COLLATE "C",
        exit_code   BIGINT,
        report      TEXT
    );
    CREATE TABLE jobs (
        job_id       TEXT COLLATE "C" PRIMARY KEY,
        account_name TEXT NOT NULL,
        window_start TEXT COLLATE "C" NOT NULL,
        window_end   TEXT COLLATE "C" NOT NULL,
        iccids       TEXT NOT NULL,
        status       TEXT COLLATE "C" NOT NULL,
        attempts     BIGINT NOT NULL DEFAULT 0,
        last_error   TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
    );
    CREATE TABLE requests (
        request_id   TEXT COLLATE "C" PRIMARY KEY,
        job_id       TEXT COLLATE "C" NOT NULL REFERENCES jobs(job_id),
        submitted_at TEXT COLLATE "C" NOT NULL,
        completed_at TEXT,
        seq          BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX requests_by_job ON requests(job_id);
    CREATE TABLE callbacks (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id  TEXT COLLATE "C" NOT NULL,
        kind        TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        source      TEXT NOT NULL,
        body_sha256 BYTEA NOT NULL UNIQUE,
        body        BYTEA NOT NULL
    );
    CREATE INDEX callbacks_by_request ON callbacks(request_id);
    CREATE TABLE callback_partitions (
        partition   TEXT COLLATE "C" NOT NULL,
        callback_id BIGINT NOT NULL REFERENCES callbacks(id),
        PRIMARY KEY (partition, callback_id)
    );
    CREATE TABLE partitions (
        partition       TEXT COLLATE "C" PRIMARY KEY,
        written_through BIGINT NOT NULL,
        rows            BIGINT NOT NULL,
        files           BIGINT NOT NULL,
        written_at      TEXT NOT NULL,
        run_id          TEXT NOT NULL
    );
    "#,
    // v2: bodies are stored zstd-compressed (`body_encoding = 'zstd'`).
    r#"
    ALTER TABLE callbacks ADD COLUMN body_encoding TEXT NOT NULL DEFAULT 'json';
    "#,
    // v3: retention (archive files and the partitions they hold).
    r#"
    CREATE INDEX callbacks_by_received ON callbacks(received_at);
    CREATE INDEX callback_partitions_by_callback ON callback_partitions(callback_id);
    CREATE TABLE archive_files (
        file        TEXT COLLATE "C" PRIMARY KEY,
        callbacks   BIGINT NOT NULL,
        first_id    BIGINT NOT NULL,
        last_id     BIGINT NOT NULL,
        bytes       BIGINT NOT NULL,
        archived_at TEXT COLLATE "C" NOT NULL,
        run_id      TEXT NOT NULL
    );
    CREATE TABLE archived_partitions (
        partition TEXT COLLATE "C" NOT NULL,
        file      TEXT COLLATE "C" NOT NULL REFERENCES archive_files(file),
        callbacks BIGINT NOT NULL,
        PRIMARY KEY (partition, file)
    );
    "#,
    // v4: several workers on one range (claims with leases, ms since the epoch) and one request
    // budget per account.
    r#"
    ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until BIGINT;
    ALTER TABLE jobs ADD COLUMN claimed_at BIGINT;
    CREATE TABLE rate_budget (
        account    TEXT COLLATE "C" PRIMARY KEY,
        tokens     DOUBLE PRECISION NOT NULL,
        updated_at BIGINT NOT NULL
    );
    "#,
    // v5: the digest is XXH3-128 (the SQLite store's name for the column); older rows keep
    // their SHA-256 (another length: the two never compare equal).
    r#"
    ALTER TABLE callbacks RENAME COLUMN body_sha256 TO body_digest;
    "#,
    // v6: the journal's two insert-only tables are vacuumed after every 200,000 new rows instead
    // of after a fifth of the table (PostgreSQL's default): each vacuum then has the same work at
    // 1 M rows as at 100 M, instead of ever longer ones that a listener's throughput dips through
    // (docs/performance.md, "A listener up for weeks: the soak").
    r#"
    ALTER TABLE callbacks SET (autovacuum_vacuum_insert_scale_factor = 0,
                               autovacuum_vacuum_insert_threshold = 200000);
    ALTER TABLE callback_partitions SET (autovacuum_vacuum_insert_scale_factor = 0,
                                         autovacuum_vacuum_insert_threshold = 200000);
    "#,
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Task = Box<dyn FnOnce(Pool) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A PostgreSQL failure as text: each cause in turn, a server error as `severity: message
/// (SQLSTATE)` (never its DETAIL, which can quote row values).
#[derive(Debug)]
struct PgFailure(String);

impl std::fmt::Display for PgFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgFailure {}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        if !text.is_empty() {
            text.push_str(": ");
        }
        match e.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => text.push_str(&format!(
                "{}: {} ({})",
                db.severity(),
                db.message(),
                db.code().code()
            )),
            None => text.push_str(&e.to_string()),
        }
        next = e.source();
    }
    text
}

/// The state store on PostgreSQL.
#[derive(Debug)]
pub struct PgStore {
    tasks: mpsc::UnboundedSender<Task>,
    /// The URL with its password redacted.
    name: String,
}

/// The URL's connection settings, with what tokio-postgres does not read taken out: `sslrootcert`
/// (a PEM file of CAs to trust beyond the system's) and libpq's `verify-ca` / `verify-full`
/// (read as `require`: the server's certificate is always verified).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Option<String>), BoxError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut root_cert = None;
    let mut kept = Vec::new();
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        match param.split_once('=') {
            Some(("sslrootcert", file)) => root_cert = Some(file.to_owned()),
            Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require".into()),
            _ => kept.push(param.to_owned()),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&url)
        .map_err(|e| PgFailure(format!("not a PostgreSQL URL: {}", describe(&e))))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // Acknowledged means durable: a commit returns once it is flushed, whatever the server's
    // default.
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} -c synchronous_commit=on"),
        _ => "-c synchronous_commit=on".to_owned(),
    };
    config.options(options);
    if config.get_application_name().is_none() {
        config.application_name("tsusage");
    }
    Ok((config, root_cert))
}

/// rustls (ring) trusting the system's CAs and those of `root_cert`.
fn tls_config(root_cert: Option<&str>) -> Result<rustls::ClientConfig, BoxError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(file) = root_cert {
        for cert in CertificateDer::pem_file_iter(file)
            .map_err(|e| PgFailure(format!("sslrootcert {file}: {e}")))?
        {
            let cert = cert.map_err(|e| PgFailure(format!("sslrootcert {file}: {e}")))?;
            roots.add(cert)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl PgStore {
    /// Connects to the store at `url` (`postgres://…`; TLS with `sslmode=require`) and migrates it to
    /// the current schema.
    pub fn open(url: &str) -> Result<PgStore, StateError> {
        let name = crate::config::redact_url(url);
        let invalid = |e: BoxError| StateError::Backend {
            path: name.clone(),
            source: e,
        };
        let (config, root_cert) = parse_url(url).map_err(invalid)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if config.get_ssl_mode() == SslMode::Require {
            let tls = tls_config(root_cert.as_deref()).map_err(invalid)?;
            Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                manager_config,
            )
        } else {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| invalid(Box::new(PgFailure(e.to_string()))))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StateError::Io {
                path: name.clone(),
                source,
            })?;
        let (tasks, mut queue) = mpsc::unbounded_channel::<Task>();
        std::thread::Builder::new()
            .name("tsusage-pg".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(task) = queue.recv().await {
                        task(pool.clone()).await;
                    }
                });
            })
            .map_err(|source| StateError::Io {
                path: name.clone(),
                source,
            })?;
        let store = PgStore { tasks, name };
        store.migrate()?;
        Ok(store)
    }

    fn fail(&self, e: BoxError) -> StateError {
        StateError::Backend {
            path: self.name.clone(),
            source: Box::new(PgFailure(describe(&*e))),
        }
    }

    /// Runs `f` on the store's thread and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, BoxError>> + Send + 'static,
    {
        call_on(&self.tasks, f)
            .ok_or_else(|| StateError::Invalid {
                path: self.name.clone(),
                message: "the PostgreSQL connection thread stopped".into(),
            })?
            .map_err(|e| self.fail(e))
    }

    fn migrate(&self) -> Result<(), StateError> {
        let (current, known) = self.call(|pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
                &[&MIGRATE_LOCK],
            )
            .await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
                .await?;
            let current: i64 = tx
                .query_opt("SELECT version FROM schema_version", &[])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(0);
            let known = MIGRATIONS.len() as i64;
            if current > known {
                return Ok((current, known));
            }
            for sql in &MIGRATIONS[current as usize..] {
                tx.batch_execute(sql).await?;
            }
            if current == 0 {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&known],
                )
                .await?;
            } else if current < known {
                tx.execute("UPDATE schema_version SET version = $1", &[&known])
                    .await?;
            }
            tx.commit().await?;
            Ok((current, known))
        })?;
        if current > known {
            return Err(StateError::Invalid {
                path: self.name.clone(),
                message: format!(
                    "schema version {current} was written by a newer tsusage (this one knows {known})"
                ),
            });
        }
        Ok(())
    }

    /// The schema version the store is at.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query_one("SELECT version FROM schema_version", &[])
                .await?
                .try_get(0)?)
        })
    }

    /// The store's name in logs and errors: its URL without the password.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Sends `f` to the store's thread and waits; `None` when the thread is gone.
fn call_on<T, F, Fut>(tasks: &mpsc::UnboundedSender<Task>, f: F) -> Option<Result<T, BoxError>>
where
    T: Send + 'static,
    F: FnOnce(Pool) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, BoxError>> + Send + 'static,
{
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let task: Task = Box::new(move |pool| {
        Box::pin(async move {
            let _ = reply.send(f(pool).await);
        })
    });
    tasks.send(task).ok()?;
    answer.recv().ok()
}

/// The run lock: a session-level advisory lock on its own connection, released on drop (and by
/// the server if this process dies).
struct PgRunLock {
    client: Option<deadpool_postgres::ClientWrapper>,
    tasks: mpsc::UnboundedSender<Task>,
    /// The advisory key, and whether it is held shared.
    key: i32,
    shared: bool,
}

impl std::fmt::Debug for PgRunLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgRunLock")
    }
}

impl Drop for PgRunLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // Unlocked explicitly (then the connection closes), so that the next lock of this process
        // finds it free at once; the answer is awaited a bounded time.
        let (reply, answer) = std::sync::mpsc::sync_channel::<()>(1);
        let (key, shared) = (self.key, self.shared);
        let task: Task = Box::new(move |_pool| {
            Box::pin(async move {
                let unlock = if shared {
                    "SELECT pg_advisory_unlock_shared($1, hashtext(current_schema()))"
                } else {
                    "SELECT pg_advisory_unlock($1, hashtext(current_schema()))"
                };
                if let Err(e) = client.execute(unlock, &[&key]).await {
                    tracing::debug!(error = %describe(&e), "unlocking the state store");
                }
                drop(client);
                let _ = reply.send(());
            })
        });
        if self.tasks.send(task).is_ok() {
            let _ = answer.recv_timeout(UNLOCK_TIMEOUT);
        }
    }
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A journaled body back as text.
fn decode_body(body: &[u8], encoding: &str) -> Result<String, BoxError> {
    let text = if encoding == "zstd" {
        zstd::stream::decode_all(body)?
    } else {
        body.to_vec()
    };
    Ok(String::from_utf8(text)?)
}

/// A callback to journal, owned (it crosses to the store's thread).
struct OwnedCallback {
    request_id: String,
    kind: &'static str,
    source: String,
    body: Vec<u8>,
    body_encoding: &'static str,
    digest: Vec<u8>,
    partitions: Vec<String>,
    received_at: i64,
}

fn owned(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// One page of `callbacks_for_partition`: `(id, request_id, received_at, body, account, encoding)`.
type PartitionRow = (i64, String, i64, Vec<u8>, Option<String>, String);
/// One page of `archivable`.
type ArchiveRow = (
    i64,
    String,
    String,
    i64,
    String,
    Vec<u8>,
    String,
    Option<String>,
    Vec<String>,
);

impl PgStore {
    /// Takes the run lock, exclusive or shared, on a connection of its own.
    fn run_lock(&self, run_id: &str, command: &str, shared: bool) -> Result<RunGuard, StateError> {
        let try_lock = if shared {
            "SELECT pg_try_advisory_lock_shared($1, hashtext(current_schema()))"
        } else {
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))"
        };
        // application_name holds at most 63 bytes: enough for the command, run id and pid.
        let me: String = format!("tsusage {command} {run_id} pid {}", std::process::id())
            .chars()
            .take(63)
            .collect();
        let (client, holder) = self.call(move |pool| async move {
            let client = deadpool_postgres::Object::take(pool.get().await?);
            let got: bool = client
                .query_one(try_lock, &[&RUN_LOCK])
                .await?
                .try_get(0)?;
            if got {
                client
                    .execute("SELECT set_config('application_name', $1, false)", &[&me])
                    .await?;
                return Ok((Some(client), None));
            }
            let holder = client
                .query_opt(
                    "SELECT a.application_name, COALESCE(host(a.client_addr), 'local socket')
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND l.classid = $1::int4::oid
                       AND l.objid = hashtext(current_schema())::oid
                     LIMIT 1",
                    &[&RUN_LOCK],
                )
                .await?
                .map(|r| -> Result<_, tokio_postgres::Error> { Ok(format!("{} (from {})", r.try_get::<_, String>(0)?, r.try_get::<_, String>(1)?)) })
                .transpose()?;
            Ok((None, Some(holder)))
        })?;
        match client {
            Some(client) => Ok(RunGuard::new(PgRunLock {
                client: Some(client),
                tasks: self.tasks.clone(),
                key: RUN_LOCK,
                shared,
            })),
            None => Err(StateError::Invalid {
                path: self.name.clone(),
                message: format!(
                    "in use by {}; wait for it to finish (the lock is a PostgreSQL advisory lock)",
                    holder
                        .flatten()
                        .unwrap_or_else(|| "another tsusage process".into())
                ),
            }),
        }
    }
}

/// A row's columns as a tuple of their types, in column order.
trait FromRow: Sized {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error>;
}

macro_rules! from_row_tuple {
    ($($t:ident $i:tt),+) => {
        impl<$($t: for<'a> FromSql<'a>),+> FromRow for ($($t,)+) {
            fn from_row(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
                Ok(($(row.try_get($i)?,)+))
            }
        }
    };
}
from_row_tuple!(A 0, B 1);
from_row_tuple!(A 0, B 1, C 2);
from_row_tuple!(A 0, B 1, C 2, D 3);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4, F 5);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
from_row_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);

/// Reads `row` as a tuple ([`FromRow`]): `rows.iter().map(tuple)`.
fn tuple<T: FromRow>(row: &tokio_postgres::Row) -> Result<T, tokio_postgres::Error> {
    T::from_row(row)
}

impl Store for PgStore {
    fn lock(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        self.run_lock(run_id, command, false)
    }

    fn lock_shared(&self, run_id: &str, command: &str) -> Result<RunGuard, StateError> {
        self.run_lock(run_id, command, true)
    }

    fn lock_publish(&self, _run_id: &str) -> Result<Option<RunGuard>, StateError> {
        // Waits (bounded by the other writer's publish) rather than failing: the workers of a
        // range finish at about the same time and each writes what is pending then.
        let client = self.call(move |pool| async move {
            let client = deadpool_postgres::Object::take(pool.get().await?);
            client
                .execute(
                    "SELECT pg_advisory_lock($1, hashtext(current_schema()))",
                    &[&PUBLISH_LOCK],
                )
                .await?;
            Ok(client)
        })?;
        Ok(Some(RunGuard::new(PgRunLock {
            client: Some(client),
            tasks: self.tasks.clone(),
            key: PUBLISH_LOCK,
            shared: false,
        })))
    }

    fn shares_work(&self) -> bool {
        true
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
        let (ids, worker) = (owned(job_ids), worker.to_owned());
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let mut claimed: Vec<String> = self.call(move |pool| async move {
            let client = pool.get().await?;
            let rows = client
                .query(
                    "UPDATE jobs SET claimed_by = $2, lease_until = $4, claimed_at = $3
                     WHERE job_id IN (
                       SELECT job_id FROM jobs
                       WHERE job_id = ANY($1)
                         AND (claimed_by IS NULL OR lease_until < $3 OR claimed_by = $2)
                         AND (status IN ('planned', 'submitted') OR claimed_at IS NULL
                              OR claimed_at < $5)
                       ORDER BY job_id LIMIT $6
                       FOR UPDATE SKIP LOCKED)
                     RETURNING job_id",
                    &[&ids, &worker, &now, &lease_until, &since, &max],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?)
        })?;
        claimed.sort_unstable();
        Ok(claimed)
    }

    fn renew_claims(
        &mut self,
        worker: &str,
        job_ids: &[&str],
        lease_until: i64,
    ) -> Result<u64, StateError> {
        let (ids, worker) = (owned(job_ids), worker.to_owned());
        self.call(move |pool| async move {
            let client = pool.get().await?;
            Ok(client
                .execute(
                    "UPDATE jobs SET lease_until = $3 WHERE job_id = ANY($1) AND claimed_by = $2",
                    &[&ids, &worker, &lease_until],
                )
                .await?)
        })
    }

    fn release_claims(&mut self, worker: &str, job_ids: &[&str]) -> Result<(), StateError> {
        let (ids, worker) = (owned(job_ids), worker.to_owned());
        self.call(move |pool| async move {
            let client = pool.get().await?;
            client
                .execute(
                    "UPDATE jobs SET claimed_by = NULL, lease_until = NULL
                     WHERE job_id = ANY($1) AND claimed_by = $2",
                    &[&ids, &worker],
                )
                .await?;
            Ok(())
        })
    }

    fn take_tokens(
        &mut self,
        account: &str,
        rate: f64,
        burst: f64,
        want: u32,
        _now: i64,
    ) -> Result<u32, StateError> {
        let account = account.to_owned();
        self.call(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            // The server's clock, read after the row lock is held: one clock for every worker.
            const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";
            tx.execute(
                &format!(
                    "INSERT INTO rate_budget (account, tokens, updated_at)
                     VALUES ($1, $2, {NOW_MS}) ON CONFLICT DO NOTHING"
                ),
                &[&account, &burst],
            )
            .await?;
            let row = tx
                .query_one(
                    "SELECT tokens, updated_at FROM rate_budget WHERE account = $1 FOR UPDATE",
                    &[&account],
                )
                .await?;
            let (tokens, updated_at): (f64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let now: i64 = tx
                .query_one(&format!("SELECT {NOW_MS}"), &[])
                .await?
                .try_get(0)?;
            let (granted, left) =
                super::refill_and_take(tokens, now - updated_at, rate, burst, want);
            tx.execute(
                "UPDATE rate_budget SET tokens = $2, updated_at = $3 WHERE account = $1",
                &[&account, &left, &now.max(updated_at)],
            )
            .await?;
            tx.commit().await?;
            Ok(granted)
        })
    }

    fn callbacks_since(&self, id: i64, limit: usize) -> Result<Vec<JournalEntry>, StateError> {
        let limit = limit as i64;
        let rows: Vec<(i64, String, String, Vec<u8>, String)> =
            self.call(move |pool| async move {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT id, request_id, kind, body, body_encoding FROM callbacks
                     WHERE id > $1 ORDER BY id LIMIT $2",
                    )
                    .await?;
                Ok(client
                    .query(&stmt, &[&id, &limit])
                    .await?
                    .iter()
                    .map(tuple)
                    .collect::<Result<_, _>>()?)
            })?;
        rows.into_iter()
            .map(|(id, request_id, kind, body, encoding)| {
                let body = decode_body(&body, &encoding).map_err(|e| self.fail(e))?;
                Ok(JournalEntry {
                    id,
                    request_id,
                    kind,
                    body,
                })
            })
            .collect()
    }

    fn last_run(&self) -> Result<Option<FinishedRun>, StateError> {
        let last: Option<(String, String, String, i64)> = self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query_opt(
                    "SELECT run_id, command, finished_at, exit_code FROM runs
                     WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
                    &[],
                )
                .await?
                .as_ref()
                .map(tuple)
                .transpose()?)
        })?;
        Ok(
            last.map(|(run_id, command, finished_at, exit_code)| FinishedRun {
                run_id,
                command,
                finished_at,
                exit_code,
            }),
        )
    }

    fn outstanding_jobs(&self) -> Result<Vec<OutstandingJob>, StateError> {
        let rows: Vec<(String, String, String)> = self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query(
                    "SELECT j.job_id, j.window_start, MAX(r.submitted_at) FROM jobs j
                     JOIN requests r ON r.job_id = j.job_id
                     WHERE j.status = 'submitted' GROUP BY j.job_id ORDER BY j.window_start",
                    &[],
                )
                .await?
                .iter()
                .map(tuple)
                .collect::<Result<_, _>>()?)
        })?;
        Ok(rows
            .into_iter()
            .map(|(job_id, window_start, last_submitted_at)| OutstandingJob {
                job_id,
                window_start,
                last_submitted_at,
            })
            .collect())
    }

    fn window_status_counts(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<WindowStatusCount>, StateError> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.call(move |pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query(
                    "SELECT window_start, window_end, status, COUNT(*) FROM jobs
                     WHERE window_start >= $1 AND window_start < $2
                     GROUP BY window_start, window_end, status
                     ORDER BY window_start, window_end, status",
                    &[&from, &to],
                )
                .await?
                .iter()
                .map(|r| -> Result<_, tokio_postgres::Error> {
                    Ok(WindowStatusCount {
                        window_start: r.try_get(0)?,
                        window_end: r.try_get(1)?,
                        status: r.try_get(2)?,
                        jobs: r.try_get::<_, i64>(3)? as u64,
                    })
                })
                .collect::<Result<_, _>>()?)
        })
    }

    fn job_status_counts(&self) -> Result<BTreeMap<String, u64>, StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[])
                .await?
                .iter()
                .map(|r| -> Result<_, tokio_postgres::Error> {
                    Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64))
                })
                .collect::<Result<_, _>>()?)
        })
    }

    fn record_jobs(&mut self, jobs: &[Job]) -> Result<u64, StateError> {
        let mut ids = Vec::with_capacity(jobs.len());
        let mut accounts = Vec::with_capacity(jobs.len());
        let mut starts = Vec::with_capacity(jobs.len());
        let mut ends = Vec::with_capacity(jobs.len());
        let mut iccids = Vec::with_capacity(jobs.len());
        for job in jobs {
            ids.push(job.id.as_str().to_owned());
            accounts.push(job.account_name.to_string());
            starts.push(job.window.start_time());
            ends.push(job.window.end_time());
            let list: Vec<&str> = job.iccids.iter().map(|i| i.as_str()).collect();
            iccids.push(list.join(","));
        }
        let now = now_text();
        self.call(move |pool| async move {
            let client = pool.get().await?;
            // One statement for the batch; planned jobs keep their order (ids are not generated).
            let new = client
                .execute(
                    "INSERT INTO jobs
                       (job_id, account_name, window_start, window_end, iccids, status, created_at, updated_at)
                     SELECT j.id, j.account, j.ws, j.we, j.iccids, $6, $7, $7
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                          AS j(id, account, ws, we, iccids)
                     ON CONFLICT DO NOTHING",
                    &[
                        &ids,
                        &accounts,
                        &starts,
                        &ends,
                        &iccids,
                        &JobStatus::Planned.as_str(),
                        &now,
                    ],
                )
                .await?;
            Ok(new)
        })
    }

    fn job_statuses(&self, job_ids: &[&str]) -> Result<HashMap<String, JobStatus>, StateError> {
        let ids = owned(job_ids);
        let rows: Vec<(String, String)> = self.call(move |pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query(
                    "SELECT job_id, status FROM jobs WHERE job_id = ANY($1)",
                    &[&ids],
                )
                .await?
                .iter()
                .map(tuple)
                .collect::<Result<_, _>>()?)
        })?;
        rows.into_iter()
            .map(|(id, text)| {
                let status = JobStatus::parse(&text).ok_or_else(|| StateError::Invalid {
                    path: self.name.clone(),
                    message: format!("job {id} has an unknown status {text:?}"),
                })?;
                Ok((id, status))
            })
            .collect()
    }

    fn apply_job_updates(&mut self, updates: &[JobUpdate]) -> Result<(), StateError> {
        let updates = updates.to_vec();
        let now = now_text();
        self.call(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let insert_request = tx
                .prepare_cached(
                    "INSERT INTO requests (request_id, job_id, submitted_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            let submitted = tx
                .prepare_cached(
                    "UPDATE jobs SET status = $2, attempts = attempts + $3, last_error = NULL,
                       updated_at = $4 WHERE job_id = $1",
                )
                .await?;
            let failed = tx
                .prepare_cached(
                    "UPDATE jobs SET status = $2, attempts = attempts + $3, last_error = $4,
                       updated_at = $5, claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                )
                .await?;
            let gave_up = tx
                .prepare_cached(
                    "UPDATE jobs SET attempts = attempts + $2, last_error = $3, updated_at = $4
                     WHERE job_id = $1",
                )
                .await?;
            let completed = tx
                .prepare_cached(
                    "UPDATE jobs SET status = $2, last_error = NULL, updated_at = $3,
                       claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                )
                .await?;
            let missing = tx
                .prepare_cached(
                    "UPDATE jobs SET status = $2, last_error = $3, updated_at = $4,
                       claimed_by = NULL, lease_until = NULL WHERE job_id = $1",
                )
                .await?;
            // Pipelined: every statement is sent before the first answer is read, and runs in
            // order.
            type Param = Box<dyn ToSql + Sync + Send>;
            let text = |s: &str| -> Param { Box::new(s.to_owned()) };
            let mut statements: Vec<(&tokio_postgres::Statement, Vec<Param>)> =
                Vec::with_capacity(updates.len() * 2);
            for update in &updates {
                match update {
                    JobUpdate::Submitted {
                        job_id,
                        request_id,
                        attempts,
                    } => {
                        statements.push((
                            &insert_request,
                            vec![text(request_id), text(job_id), text(&now)],
                        ));
                        statements.push((
                            &submitted,
                            vec![
                                text(job_id),
                                text(JobStatus::Submitted.as_str()),
                                Box::new(i64::from(*attempts)),
                                text(&now),
                            ],
                        ));
                    }
                    JobUpdate::Failed {
                        job_id,
                        attempts,
                        error,
                    } => statements.push((
                        &failed,
                        vec![
                            text(job_id),
                            text(JobStatus::Failed.as_str()),
                            Box::new(i64::from(*attempts)),
                            text(error),
                            text(&now),
                        ],
                    )),
                    JobUpdate::GaveUp {
                        job_id,
                        attempts,
                        error,
                    } => statements.push((
                        &gave_up,
                        vec![
                            text(job_id),
                            Box::new(i64::from(*attempts)),
                            text(error),
                            text(&now),
                        ],
                    )),
                    JobUpdate::Completed { job_id } => statements.push((
                        &completed,
                        vec![text(job_id), text(JobStatus::Complete.as_str()), text(&now)],
                    )),
                    JobUpdate::Missing { job_id, error } => statements.push((
                        &missing,
                        vec![
                            text(job_id),
                            text(JobStatus::Missing.as_str()),
                            text(error),
                            text(&now),
                        ],
                    )),
                }
            }
            let refs: Vec<Vec<&(dyn ToSql + Sync)>> = statements
                .iter()
                .map(|(_, params)| params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
                .collect();
            let pending = statements
                .iter()
                .zip(&refs)
                .map(|((statement, _), params)| tx.execute(*statement, params));
            futures_util::future::try_join_all(pending).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn begin_run(&mut self, run_id: &str, command: &str) -> Result<(), StateError> {
        let (run_id, command, now) = (run_id.to_owned(), command.to_owned(), now_text());
        self.call(move |pool| async move {
            let client = pool.get().await?;
            client
                .execute(
                    "INSERT INTO runs (run_id, command, started_at) VALUES ($1, $2, $3)",
                    &[&run_id, &command, &now],
                )
                .await?;
            Ok(())
        })
    }

    fn finish_run(
        &mut self,
        run_id: &str,
        exit_code: u8,
        report_json: &str,
    ) -> Result<(), StateError> {
        let (run_id, report, now) = (run_id.to_owned(), report_json.to_owned(), now_text());
        let exit_code = i64::from(exit_code);
        self.call(move |pool| async move {
            let client = pool.get().await?;
            client
                .execute(
                    "UPDATE runs SET finished_at = $2, exit_code = $3, report = $4 WHERE run_id = $1",
                    &[&run_id, &now, &exit_code, &report],
                )
                .await?;
            Ok(())
        })
    }

    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError> {
        let batch: Vec<OwnedCallback> = batch
            .iter()
            .map(|cb| {
                let (stored, body_encoding) = match cb.encoded {
                    Some((body, encoding)) => (body.to_vec(), encoding),
                    None => super::encode_body(cb.body),
                };
                OwnedCallback {
                    request_id: cb.request_id.to_owned(),
                    kind: cb.kind,
                    source: cb.source.to_owned(),
                    body: stored,
                    body_encoding,
                    digest: cb.digest.to_vec(),
                    partitions: cb.partitions.iter().cloned().collect(),
                    received_at: cb.received_at.unwrap_or(received_at),
                }
            })
            .collect();
        let name = self.name.clone();
        self.call(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            // Ids in commit order across processes (see the module doc).
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
                &[&JOURNAL_LOCK],
            )
            .await?;
            let insert = tx
                .prepare_cached(
                    "INSERT INTO callbacks
                       (request_id, kind, received_at, source, body_digest, body, body_encoding)
                     SELECT $1, $2, $3, $4, $5, $6, $7
                     WHERE NOT EXISTS (SELECT 1 FROM callbacks WHERE body_digest = $5)
                     ON CONFLICT (body_digest) DO NOTHING RETURNING id",
                )
                .await?;
            // Pipelined, in batch order: ids follow the order of arrival, and a body twice in one
            // batch is stored once (the second finds the first). The NOT EXISTS spares a duplicate
            // an id (ON CONFLICT alone draws one from the sequence first), so ids have no gaps, as
            // in SQLite; under the journal lock nothing else inserts meanwhile, and ON CONFLICT
            // stays as the unique index's guarantee.
            let params: Vec<[&(dyn ToSql + Sync); 7]> = batch
                .iter()
                .map(|cb| {
                    [
                        &cb.request_id as &(dyn ToSql + Sync),
                        &cb.kind,
                        &cb.received_at,
                        &cb.source,
                        &cb.digest,
                        &cb.body,
                        &cb.body_encoding,
                    ]
                })
                .collect();
            let inserted =
                futures_util::future::try_join_all(params.iter().map(|p| tx.query_opt(&insert, p)))
                    .await?;
            let mut outcomes = Vec::with_capacity(batch.len());
            let (mut parts, mut ids) = (Vec::new(), Vec::new());
            for (cb, row) in batch.iter().zip(inserted) {
                match row {
                    Some(row) => {
                        let id: i64 = row.try_get(0)?;
                        for p in &cb.partitions {
                            parts.push(p.as_str());
                            ids.push(id);
                        }
                        outcomes.push(Journaled::New(id));
                    }
                    None => outcomes.push(Journaled::AlreadyJournaled),
                }
            }
            if !parts.is_empty() {
                tx.execute(
                    "INSERT INTO callback_partitions (partition, callback_id)
                     SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT DO NOTHING",
                    &[&parts, &ids],
                )
                .await?;
            }
            crate::failpoint::pause(crate::failpoint::JOURNAL_COMMIT);
            crate::failpoint::fail(crate::failpoint::JOURNAL_COMMIT)
                .map_err(|e| PgFailure(format!("{name}: {e}")))?;
            tx.commit().await?;
            Ok(outcomes)
        })
    }

    fn pending_partitions(&self) -> Result<Vec<PendingPartition>, StateError> {
        // As in SQLite: the distinct partitions by jumps through the (partition, callback_id) key
        // and each one's newest callback by a seek, not a GROUP BY over the whole journal.
        self.call(|pool| async move {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "WITH RECURSIVE parts(partition) AS (
                       SELECT MIN(partition) FROM callback_partitions
                       UNION ALL
                       SELECT (SELECT MIN(cp.partition) FROM callback_partitions cp
                               WHERE cp.partition > parts.partition)
                       FROM parts WHERE parts.partition IS NOT NULL
                     )
                     SELECT parts.partition, t.through
                     FROM parts
                     CROSS JOIN LATERAL (SELECT MAX(cp.callback_id) AS through
                                         FROM callback_partitions cp
                                         WHERE cp.partition = parts.partition) t
                     LEFT JOIN partitions p ON p.partition = parts.partition
                     WHERE parts.partition IS NOT NULL
                       AND t.through > COALESCE(p.written_through, 0)
                     ORDER BY parts.partition",
                )
                .await?;
            Ok(client
                .query(&stmt, &[])
                .await?
                .iter()
                .map(|r| -> Result<_, tokio_postgres::Error> {
                    Ok(PendingPartition {
                        partition: r.try_get(0)?,
                        through_id: r.try_get(1)?,
                    })
                })
                .collect::<Result<_, _>>()?)
        })
    }

    fn callbacks_for_partition(
        &self,
        partition: &str,
        through_id: i64,
        each: &mut dyn FnMut(StoredCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let partition = partition.to_owned();
            let page: Vec<PartitionRow> = self.call(move |pool| async move {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT c.id, c.request_id, c.received_at, c.body, j.account_name,
                                c.body_encoding
                         FROM callback_partitions cp
                         JOIN callbacks c ON c.id = cp.callback_id
                         LEFT JOIN requests r ON r.request_id = c.request_id
                         LEFT JOIN jobs j ON j.job_id = r.job_id
                         WHERE cp.partition = $1 AND cp.callback_id <= $2
                           AND (c.received_at, c.id) > ($3, $4)
                         ORDER BY c.received_at, c.id LIMIT $5",
                    )
                    .await?;
                Ok(client
                    .query(&stmt, &[&partition, &through_id, &after.0, &after.1, &PAGE])
                    .await?
                    .iter()
                    .map(tuple)
                    .collect::<Result<_, _>>()?)
            })?;
            let full = page.len() as i64 == PAGE;
            for (id, request_id, received_at, body, account_name, encoding) in page {
                after = (received_at, id);
                let body = decode_body(&body, &encoding).map_err(|e| self.fail(e))?;
                let flow = each(StoredCallback {
                    id,
                    request_id,
                    received_at,
                    body,
                    account_name,
                });
                if flow.is_break() {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn mark_written(
        &mut self,
        partition: &str,
        through_id: i64,
        rows: u64,
        files: u64,
        run_id: &str,
    ) -> Result<(), StateError> {
        let (partition, run_id, now) = (partition.to_owned(), run_id.to_owned(), now_text());
        let (rows, files) = (rows as i64, files as i64);
        self.call(move |pool| async move {
            let client = pool.get().await?;
            client
                .execute(
                    "INSERT INTO partitions (partition, written_through, rows, files, written_at, run_id)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (partition) DO UPDATE SET
                       written_through = GREATEST(partitions.written_through, excluded.written_through),
                       rows = excluded.rows, files = excluded.files,
                       written_at = excluded.written_at, run_id = excluded.run_id",
                    &[&partition, &through_id, &rows, &files, &now, &run_id],
                )
                .await?;
            Ok(())
        })
    }

    fn request_accounts(
        &self,
        request_ids: &[&str],
    ) -> Result<HashMap<String, String>, StateError> {
        let ids = owned(request_ids);
        self.call(move |pool| async move {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT r.request_id, j.account_name FROM requests r
                     JOIN jobs j ON j.job_id = r.job_id WHERE r.request_id = ANY($1)",
                )
                .await?;
            Ok(client
                .query(&stmt, &[&ids])
                .await?
                .iter()
                .map(tuple)
                .collect::<Result<_, _>>()?)
        })
    }

    fn partition_callbacks(&self, partition: &str, through_id: i64) -> Result<u64, StateError> {
        let partition = partition.to_owned();
        self.call(move |pool| async move {
            let client = pool.get().await?;
            let n: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM callback_partitions WHERE partition = $1 AND callback_id <= $2",
                    &[&partition, &through_id],
                )
                .await?
                .try_get(0)?;
            Ok(n as u64)
        })
    }

    fn journal_len(&self) -> Result<u64, StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            let n: i64 = client
                .query_one("SELECT COUNT(*) FROM callbacks", &[])
                .await?
                .try_get(0)?;
            Ok(n as u64)
        })
    }

    fn ping(&self) -> Result<(), StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            client.query_one("SELECT 1", &[]).await?;
            Ok(())
        })
    }

    fn journal_high_water(&self) -> Result<i64, StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query_one("SELECT COALESCE(MAX(id), 0) FROM callbacks", &[])
                .await?
                .try_get(0)?)
        })
    }

    fn requests_of_jobs(&self, job_ids: &[&str]) -> Result<Vec<RecordedRequest>, StateError> {
        let ids = owned(job_ids);
        let rows: Vec<(String, String)> = self.call(move |pool| async move {
            let client = pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT request_id, job_id FROM requests WHERE job_id = ANY($1) ORDER BY seq",
                )
                .await?;
            Ok(client
                .query(&stmt, &[&ids])
                .await?
                .iter()
                .map(tuple)
                .collect::<Result<_, _>>()?)
        })?;
        Ok(rows
            .into_iter()
            .map(|(request_id, job_id)| RecordedRequest { request_id, job_id })
            .collect())
    }

    fn archivable(
        &self,
        before: i64,
        each: &mut dyn FnMut(ArchivedCallback) -> ControlFlow<()>,
    ) -> Result<(), StateError> {
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let page: Vec<ArchiveRow> = self.call(move |pool| async move {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT c.id, c.request_id, c.kind, c.received_at, c.source, c.body,
                                c.body_encoding, j.account_name,
                                ARRAY(SELECT partition FROM callback_partitions
                                      WHERE callback_id = c.id ORDER BY partition)
                         FROM callbacks c
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
                           AND (c.received_at, c.id) > ($4, $5)
                         ORDER BY c.received_at, c.id LIMIT $6",
                    )
                    .await?;
                Ok(client
                    .query(
                        &stmt,
                        &[
                            &before,
                            &JobStatus::Planned.as_str(),
                            &JobStatus::Submitted.as_str(),
                            &after.0,
                            &after.1,
                            &PAGE,
                        ],
                    )
                    .await?
                    .iter()
                    .map(tuple)
                    .collect::<Result<_, _>>()?)
            })?;
            let full = page.len() as i64 == PAGE;
            for (id, request_id, kind, received_at, source, body, encoding, account, parts) in page
            {
                after = (received_at, id);
                let body = decode_body(&body, &encoding).map_err(|e| self.fail(e))?;
                let flow = each(ArchivedCallback {
                    id,
                    request_id,
                    kind,
                    received_at,
                    source,
                    account_name: account,
                    partitions: parts,
                    body,
                });
                if flow.is_break() {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn archive_files(&self) -> Result<BTreeSet<String>, StateError> {
        self.call(|pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query("SELECT file FROM archive_files", &[])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?)
        })
    }

    fn partition_archives(&self, partition: &str) -> Result<Vec<String>, StateError> {
        let partition = partition.to_owned();
        self.call(move |pool| async move {
            let client = pool.get().await?;
            Ok(client
                .query(
                    "SELECT ap.file FROM archived_partitions ap JOIN archive_files f ON f.file = ap.file
                     WHERE ap.partition = $1 ORDER BY f.archived_at, f.first_id",
                    &[&partition],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?)
        })
    }

    fn commit_archive(
        &mut self,
        files: &[ArchiveFile],
        ids: &[i64],
        before: i64,
        run_id: &str,
    ) -> Result<PruneCounts, StateError> {
        let files = files.to_vec();
        let ids = ids.to_vec();
        let run_id = run_id.to_owned();
        let now = now_text();
        let before_text = chrono::DateTime::from_timestamp_micros(before)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        self.call(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let mut counts = PruneCounts::default();
            for f in &files {
                tx.execute(
                    "INSERT INTO archive_files
                       (file, callbacks, first_id, last_id, bytes, archived_at, run_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &f.file,
                        &(f.callbacks as i64),
                        &f.first_id,
                        &f.last_id,
                        &(f.bytes as i64),
                        &now,
                        &run_id,
                    ],
                )
                .await?;
                for (partition, n) in &f.partitions {
                    tx.execute(
                        "INSERT INTO archived_partitions (partition, file, callbacks)
                         VALUES ($1, $2, $3)",
                        &[partition, &f.file, &(*n as i64)],
                    )
                    .await?;
                }
            }
            for chunk in ids.chunks(10_000) {
                tx.execute(
                    "DELETE FROM callback_partitions WHERE callback_id = ANY($1)",
                    &[&chunk],
                )
                .await?;
                counts.callbacks_archived += tx
                    .execute("DELETE FROM callbacks WHERE id = ANY($1)", &[&chunk])
                    .await?;
            }
            // Windows end at midnight, `YYYY-MM-DDT00:00:00Z`: compared as text with the horizon.
            let day = before_text[..10.min(before_text.len())].to_owned();
            counts.jobs_compacted = tx
                .execute(
                    "UPDATE jobs SET iccids = '' WHERE iccids <> '' AND window_end < $1
                       AND status IN ($2, $3, $4)",
                    &[
                        &day,
                        &JobStatus::Complete.as_str(),
                        &JobStatus::Failed.as_str(),
                        &JobStatus::Missing.as_str(),
                    ],
                )
                .await?;
            counts.run_reports_dropped = tx
                .execute(
                    "UPDATE runs SET report = NULL WHERE report IS NOT NULL AND finished_at < $1",
                    &[&before_text],
                )
                .await?;
            crate::failpoint::pause(crate::failpoint::PRUNE_COMMIT);
            tx.commit().await?;
            Ok(counts)
        })
    }

    fn reclaim_space(&mut self) -> Result<(), StateError> {
        // The freed rows become reusable (a plain VACUUM; the files do not shrink, which would
        // take VACUUM FULL's exclusive lock on a journal the listeners are writing).
        self.call(|pool| async move {
            let client = pool.get().await?;
            client
                .batch_execute("VACUUM callbacks, callback_partitions")
                .await?;
            Ok(())
        })
    }

    fn callbacks_of_requests(
        &self,
        request_ids: &[&str],
        through_id: i64,
        each: &mut dyn FnMut(i64, String, String),
    ) -> Result<(), StateError> {
        let ids = Arc::new(owned(request_ids));
        let mut after = 0i64;
        loop {
            let ids = ids.clone();
            let page: Vec<(i64, String, Vec<u8>, String)> = self.call(move |pool| async move {
                let client = pool.get().await?;
                let stmt = client
                    .prepare_cached(
                        "SELECT id, request_id, body, body_encoding FROM callbacks
                         WHERE request_id = ANY($1) AND id <= $2 AND id > $3 ORDER BY id LIMIT $4",
                    )
                    .await?;
                Ok(client
                    .query(&stmt, &[&*ids, &through_id, &after, &PAGE])
                    .await?
                    .iter()
                    .map(tuple)
                    .collect::<Result<_, _>>()?)
            })?;
            let full = page.len() as i64 == PAGE;
            for (id, request_id, body, encoding) in page {
                after = id;
                let body = decode_body(&body, &encoding).map_err(|e| self.fail(e))?;
                each(id, request_id, body);
            }
            if !full {
                return Ok(());
            }
        }
    }
}
