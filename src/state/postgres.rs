//! `PgStore`: the state store on PostgreSQL (`state.url`), for several listeners and workers sharing
//! one store. The store's rules are [`super::rules`]'; this is the backend: PostgreSQL's words, its
//! connections, the run lock (advisory locks) and space reclaim.
//!
//! # Calling a synchronous trait from anywhere
//!
//! [`Store`] is synchronous, and it is called from a plain thread (the [`super::StateWriter`]),
//! from tokio's blocking pool and straight from async tasks on multi-thread and current-thread
//! runtimes. `block_on` panics inside a runtime, so the store owns one thread of its own running a
//! current-thread runtime with the connection pool; each call is sent there as a future and its
//! answer awaited with a blocking `std` channel receive. That works the same in every context (the
//! caller's thread blocks, as a SQLite call blocks it, and never needs a runtime), and there is one
//! place where the store's async code runs. A transaction holds one connection, sent to that thread
//! with each statement and back. A long query ([`Exec::query_each`]) is read through a portal in
//! pages of [`PAGE`] rows, so that a partition of many callbacks is never held whole in memory and
//! the caller's closure runs on its own thread.
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

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};

use super::rules::{JournalRow, SqlStore, commit_journal, row_body};
use super::sql::{Backend, Dialect, Exec, Family, Row, Statement, Value};
use super::{Journaled, NewCallback, RunGuard, StateError};

/// Rows per page when reading callbacks back (bodies of a few KB each).
pub const PAGE: i64 = 1000;
/// Connections the store's pool keeps (the store serves one call at a time; the run lock has its
/// own connection, taken out of the pool).
const POOL_SIZE: usize = 2;
/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping the run lock waits for the server to release it.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Advisory lock classes (the first key; the second is the schema's hash). The journal's
/// (0x7473_7502) and the migration's (0x7473_7503) are in [`POSTGRES`]'s statements.
const RUN_LOCK: i32 = 0x7473_7501;
/// One writer of partitions at a time among the workers of a range (session-level, exclusive).
const PUBLISH_LOCK: i32 = 0x7473_7504;

/// PostgreSQL's words.
static POSTGRES: Dialect = Dialect {
    family: Family::Postgres,
    int: "BIGINT",
    id: "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    real: "DOUBLE PRECISION",
    blob: "BYTEA",
    key: "TEXT COLLATE \"C\"",
    without_rowid: "",
    request_order: "seq",
    skip_locked: " FOR UPDATE SKIP LOCKED",
    for_update: " FOR UPDATE",
    now_ms: "(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
    // `ON CONFLICT` alone would draw an id from the sequence first (a gap at each redelivery).
    new_digest_only: "WHERE NOT EXISTS (SELECT 1 FROM callbacks WHERE body_digest = $5)",
    // Advisory lock classes 0x7473_7503 and 0x7473_7502, in decimal.
    migrate_lock: Some("SELECT pg_advisory_xact_lock(1953723651, hashtext(current_schema()))"),
    journal_lock: Some("SELECT pg_advisory_xact_lock(1953723650, hashtext(current_schema()))"),
};

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

/// The state store on PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

/// The PostgreSQL backend: the thread that holds the connections, and the URL it names.
#[derive(Debug)]
pub struct Postgres {
    tasks: mpsc::UnboundedSender<Task>,
    /// The URL with its password redacted.
    name: String,
}

impl PgStore {
    /// Connects to the store at `url` (`postgres://…`; TLS with `sslmode=require`) and migrates it to
    /// the current schema.
    pub fn open(url: &str) -> Result<PgStore, StateError> {
        SqlStore::migrated(Postgres::connect(url)?)
    }

    /// The store's name in logs and errors: its URL without the password.
    pub fn name(&self) -> &str {
        &self.db.name
    }
}

impl Postgres {
    fn connect(url: &str) -> Result<Postgres, StateError> {
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
        Ok(Postgres { tasks, name })
    }

    /// Runs `f` on the store's thread and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(Pool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, BoxError>> + Send + 'static,
    {
        call(&self.tasks, &self.name, f)
    }

    /// The run lock, exclusive or shared, on a connection of its own.
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

fn fail(name: &str, e: BoxError) -> StateError {
    StateError::Backend {
        path: name.to_owned(),
        source: Box::new(PgFailure(describe(&*e))),
    }
}

/// Runs `f` on the store's thread and waits for its answer.
fn call<T, F, Fut>(tasks: &mpsc::UnboundedSender<Task>, name: &str, f: F) -> Result<T, StateError>
where
    T: Send + 'static,
    F: FnOnce(Pool) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, BoxError>> + Send + 'static,
{
    call_on(tasks, f)
        .ok_or_else(|| StateError::Invalid {
            path: name.to_owned(),
            message: "the PostgreSQL connection thread stopped".into(),
        })?
        .map_err(|e| fail(name, e))
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

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) => v.to_sql(ty, out),
            Value::Texts(v) => v.to_sql(ty, out),
            Value::Ints(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // Each value checks its own type in `to_sql_checked`.
        let _ = ty;
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<IsNull, BoxError> {
        let fits = match self {
            Value::Null => true,
            Value::Int(_) => matches!(*ty, Type::INT2 | Type::INT4) || <i64 as ToSql>::accepts(ty),
            Value::Real(_) => <f64 as ToSql>::accepts(ty),
            Value::Text(_) => <String as ToSql>::accepts(ty),
            Value::Blob(_) => <Vec<u8> as ToSql>::accepts(ty),
            Value::Texts(_) => <Vec<String> as ToSql>::accepts(ty),
            Value::Ints(_) => <Vec<i64> as ToSql>::accepts(ty),
        };
        if !fits {
            return Err(format!("cannot send {self:?} as {ty}").into());
        }
        self.to_sql(ty, out)
    }
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Value, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(Vec::from_sql(ty, raw)?),
            Type::TEXT_ARRAY => Value::Texts(Vec::from_sql(ty, raw)?),
            Type::INT8_ARRAY => Value::Ints(Vec::from_sql(ty, raw)?),
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Value, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn read_row(row: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    (0..row.len())
        .map(|i| row.try_get::<_, Value>(i))
        .collect::<Result<_, _>>()
        .map(Row)
}

fn refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// What one call to the store's thread runs, owned (it crosses threads).
enum Op {
    Query(String, Vec<Value>),
    Execute(String, Vec<Value>),
    /// Pipelined: every statement is sent before the first answer is read, and runs in order.
    ExecuteAll(Vec<(String, Vec<Value>)>),
    /// Pipelined, as `ExecuteAll`: one statement with each row of parameters, its answers.
    QueryEach(String, Vec<Vec<Value>>),
    Batch(String),
}

enum Answer {
    Rows(Vec<Row>),
    Count(u64),
    Counts(Vec<u64>),
    RowSets(Vec<Vec<Row>>),
    Done,
}

fn owned(statements: Vec<Statement<'_>>) -> Vec<(String, Vec<Value>)> {
    statements
        .into_iter()
        .map(|(sql, params)| (sql.to_owned(), params))
        .collect()
}

/// Runs `op` on `client`, on the store's thread.
async fn run(client: &deadpool_postgres::ClientWrapper, op: Op) -> Result<Answer, BoxError> {
    Ok(match op {
        Op::Query(sql, params) => {
            let stmt = client.prepare_cached(&sql).await?;
            let rows = client.query(&stmt, &refs(&params)).await?;
            Answer::Rows(rows.iter().map(read_row).collect::<Result<_, _>>()?)
        }
        Op::Execute(sql, params) => {
            let stmt = client.prepare_cached(&sql).await?;
            Answer::Count(client.execute(&stmt, &refs(&params)).await?)
        }
        Op::ExecuteAll(statements) => {
            let prepared = prepare_all(client, &statements).await?;
            let params: Vec<_> = statements.iter().map(|(_, p)| refs(p)).collect();
            let pending = prepared
                .iter()
                .zip(&params)
                .map(|(stmt, params)| client.execute(stmt, params));
            Answer::Counts(futures_util::future::try_join_all(pending).await?)
        }
        Op::QueryEach(sql, rows) => {
            let stmt = client.prepare_cached(&sql).await?;
            let params: Vec<_> = rows.iter().map(|p| refs(p)).collect();
            let pending = params.iter().map(|params| client.query(&stmt, params));
            let answers = futures_util::future::try_join_all(pending).await?;
            Answer::RowSets(
                answers
                    .iter()
                    .map(|rows| rows.iter().map(read_row).collect::<Result<_, _>>())
                    .collect::<Result<_, _>>()?,
            )
        }
        Op::Batch(sql) => {
            client.batch_execute(&sql).await?;
            Answer::Done
        }
    })
}

async fn prepare_all(
    client: &deadpool_postgres::ClientWrapper,
    statements: &[(String, Vec<Value>)],
) -> Result<Vec<tokio_postgres::Statement>, tokio_postgres::Error> {
    let mut prepared = Vec::with_capacity(statements.len());
    for (sql, _) in statements {
        // Cached per connection: one round trip per distinct statement, the first time.
        prepared.push(client.prepare_cached(sql).await?);
    }
    Ok(prepared)
}

/// The answer an [`Op`] of each kind gives.
fn rows(a: Answer) -> Vec<Row> {
    match a {
        Answer::Rows(rows) => rows,
        _ => Vec::new(),
    }
}

fn count(a: Answer) -> u64 {
    match a {
        Answer::Count(n) => n,
        _ => 0,
    }
}

fn counts(a: Answer) -> Vec<u64> {
    match a {
        Answer::Counts(n) => n,
        _ => Vec::new(),
    }
}

/// An insert that answers the new row's id.
fn returning_id(sql: &str) -> String {
    format!("{sql} RETURNING id")
}

/// The ids an insert of each row answered ([`returning_id`]).
fn new_ids(db: &Postgres, answer: Answer) -> Result<Vec<Option<i64>>, StateError> {
    let Answer::RowSets(sets) = answer else {
        return Ok(Vec::new());
    };
    sets.iter()
        .map(|rows| rows.first().map(|r| r.int(0)).transpose())
        .collect::<Result<_, _>>()
        .map_err(|e| db.bad(e))
}

/// What runs an [`Op`]: a connection of the pool ([`Postgres`]) or a transaction's ([`PgTx`]).
trait Runner {
    fn db(&self) -> &Postgres;
    fn run(&self, op: Op) -> Result<Answer, StateError>;

    /// [`Exec::query_each`]: the whole answer, then each row (within a transaction the rules read
    /// only small answers; [`Postgres`] reads through a portal).
    fn stream(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError> {
        for row in rows(self.run(Op::Query(sql.to_owned(), params.to_vec()))?) {
            if each(row)?.is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl<R: Runner> Exec for R {
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StateError> {
        self.run(Op::Query(sql.to_owned(), params.to_vec()))
            .map(rows)
    }

    fn query_each(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError> {
        self.stream(sql, params, each)
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StateError> {
        self.run(Op::Execute(sql.to_owned(), params.to_vec()))
            .map(count)
    }

    fn execute_all(&self, statements: Vec<Statement<'_>>) -> Result<Vec<u64>, StateError> {
        self.run(Op::ExecuteAll(owned(statements))).map(counts)
    }

    fn insert_all(&self, sql: &str, rows: Vec<Vec<Value>>) -> Result<Vec<Option<i64>>, StateError> {
        let answer = self.run(Op::QueryEach(returning_id(sql), rows))?;
        new_ids(self.db(), answer)
    }

    fn batch(&self, sql: &str) -> Result<(), StateError> {
        self.run(Op::Batch(sql.to_owned())).map(drop)
    }
}

impl Runner for Postgres {
    fn db(&self) -> &Postgres {
        self
    }

    /// On a connection of the pool.
    fn run(&self, op: Op) -> Result<Answer, StateError> {
        call(&self.tasks, &self.name, move |pool| async move {
            let client = pool.get().await?;
            run(&client, op).await
        })
    }

    fn stream(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError> {
        // A portal (in a read-only transaction on a connection of its own) read page by page: the
        // reader asks for each page, so at most one is in memory, and the store's thread serves
        // other calls (from `each`, say) meanwhile.
        type Page = Result<Vec<Row>, BoxError>;
        let (pages, next_page) = std::sync::mpsc::sync_channel::<Page>(1);
        let (ask, mut asked) = mpsc::unbounded_channel::<()>();
        let (sql, params) = (sql.to_owned(), params.to_vec());
        let task: Task = Box::new(move |pool| {
            Box::pin(async move {
                tokio::spawn(async move {
                    let read = async {
                        let mut client = pool.get().await?;
                        let tx = client.transaction().await?;
                        let stmt = tx.prepare_cached(&sql).await?;
                        let portal = tx.bind(&stmt, &refs(&params)).await?;
                        while asked.recv().await.is_some() {
                            let page = tx.query_portal(&portal, PAGE as i32).await?;
                            let last = page.len() < PAGE as usize;
                            let page = page.iter().map(read_row).collect::<Result<_, _>>()?;
                            if pages.send(Ok(page)).is_err() || last {
                                break;
                            }
                        }
                        Ok::<_, BoxError>(())
                    };
                    if let Err(e) = read.await {
                        let _ = pages.send(Err(e));
                    }
                });
            })
        });
        let gone = || StateError::Invalid {
            path: self.name.clone(),
            message: "the PostgreSQL connection thread stopped".into(),
        };
        self.tasks.send(task).map_err(|_| gone())?;
        loop {
            if ask.send(()).is_err() {
                // The reader finished: its last page (or its error) is waiting.
            }
            let page = match next_page.recv() {
                Ok(page) => page.map_err(|e| fail(&self.name, e))?,
                Err(_) => return Ok(()),
            };
            let last = page.len() < PAGE as usize;
            for row in page {
                if each(row)?.is_break() {
                    return Ok(());
                }
            }
            if last {
                return Ok(());
            }
        }
    }
}

/// A transaction: one connection, sent to the store's thread with each statement and back. It
/// begins with its first statement, in the same trip.
struct PgTx<'a> {
    client: std::cell::RefCell<Option<Object>>,
    begun: std::cell::Cell<bool>,
    db: &'a Postgres,
}

impl Runner for PgTx<'_> {
    fn db(&self) -> &Postgres {
        self.db
    }

    fn run(&self, op: Op) -> Result<Answer, StateError> {
        let client = self.client.borrow_mut().take();
        if client.is_none() && self.begun.get() {
            return Err(StateError::Invalid {
                path: self.db.name.clone(),
                message: "a transaction's connection was lost after an error".into(),
            });
        }
        self.begun.set(true);
        let (client, answer) = call(&self.db.tasks, &self.db.name, move |pool| async move {
            let client = match client {
                Some(client) => client,
                None => {
                    let client = pool.get().await?;
                    client.batch_execute("BEGIN").await?;
                    client
                }
            };
            let answer = run(&client, op).await;
            Ok((client, answer))
        })?;
        *self.client.borrow_mut() = Some(client);
        answer.map_err(|e| fail(&self.db.name, e))
    }
}

impl Backend for Postgres {
    fn name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> &'static Dialect {
        &POSTGRES
    }

    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&dyn Exec) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let tx = PgTx {
            client: std::cell::RefCell::new(None),
            begun: std::cell::Cell::new(false),
            db: self,
        };
        let out = f(&tx);
        let Some(client) = tx.client.into_inner() else {
            return out;
        };
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = call(&self.tasks, &self.name, move |_pool| async move {
            match client.batch_execute(end).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // Never back to the pool inside a transaction.
                    drop(Object::take(client));
                    Err(e.into())
                }
            }
        });
        let out = out?;
        ended?;
        Ok(out)
    }

    fn lock(&self, run_id: &str, command: &str, shared: bool) -> Result<RunGuard, StateError> {
        self.run_lock(run_id, command, shared)
    }

    fn lock_publish(&self) -> Result<Option<RunGuard>, StateError> {
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

    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError> {
        // Every body in its row.
        let rows: Vec<JournalRow<'_>> = batch.iter().map(JournalRow::inline).collect();
        commit_journal(self, &rows, None, received_at)
    }

    fn body(&self, row: &Row, first: usize) -> Result<String, StateError> {
        row_body(self, row, first)
    }

    fn pruned(&mut self) -> Result<(), StateError> {
        Ok(())
    }

    fn reclaim_space(&mut self) -> Result<(), StateError> {
        // The freed rows become reusable (a plain VACUUM; the files do not shrink, which would
        // take VACUUM FULL's exclusive lock on a journal the listeners are writing).
        self.batch("VACUUM callbacks, callback_partitions")
    }
}
