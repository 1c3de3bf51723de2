//! The store's schema, one entry per version, written once for every backend: `{int}`, `{id}`,
//! `{real}`, `{blob}`, `{key}` and `{without_rowid}` are the [`Dialect`]'s words. A store is
//! brought up to the last version when opened.

use super::StateError;
use super::sql::{Backend, Dialect, Exec};

/// One version: what every backend runs, then what only one of them does.
struct Migration {
    all: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// The journal's segment files (a body's place in one: its segment, its frame, its place in the
/// decoded frame). Only SQLite writes them; PostgreSQL has the same tables (v7) so that every
/// statement reading a body is one.
const SEGMENTS: &str = r#"
    CREATE TABLE segments (
        id         {id},
        file       TEXT NOT NULL UNIQUE,
        committed  {int} NOT NULL,
        sealed     {int} NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    ALTER TABLE callbacks ADD COLUMN segment {int};
    ALTER TABLE callbacks ADD COLUMN frame_offset {int};
    ALTER TABLE callbacks ADD COLUMN frame_len {int};
    ALTER TABLE callbacks ADD COLUMN body_offset {int};
    ALTER TABLE callbacks ADD COLUMN body_len {int};
    CREATE INDEX callbacks_by_segment ON callbacks(segment) WHERE segment IS NOT NULL;
"#;

const MIGRATIONS: &[Migration] = &[
    // v1. `requests.seq` keeps on PostgreSQL the order requests were recorded in, which SQLite
    // reads from the rowid.
    Migration {
        all: r#"
    CREATE TABLE runs (
        run_id      {key} PRIMARY KEY,
        command     TEXT NOT NULL,
        started_at  {key} NOT NULL,
        finished_at {key},
        exit_code   {int},
        report      TEXT
    );
    CREATE TABLE jobs (
        job_id       {key} PRIMARY KEY,
        account_name TEXT NOT NULL,
        window_start {key} NOT NULL,
        window_end   {key} NOT NULL,
        iccids       TEXT NOT NULL,
        status       {key} NOT NULL,
        attempts     {int} NOT NULL DEFAULT 0,
        last_error   TEXT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
    );
    CREATE TABLE requests (
        request_id   {key} PRIMARY KEY,
        job_id       {key} NOT NULL REFERENCES jobs(job_id),
        submitted_at {key} NOT NULL,
        completed_at TEXT
    );
    CREATE INDEX requests_by_job ON requests(job_id);
    CREATE TABLE callbacks (
        id          {id},
        request_id  {key} NOT NULL,
        kind        TEXT NOT NULL,
        received_at {int} NOT NULL,
        source      TEXT NOT NULL,
        body_sha256 {blob} NOT NULL UNIQUE,
        body        {blob} NOT NULL
    );
    CREATE INDEX callbacks_by_request ON callbacks(request_id);
    CREATE TABLE callback_partitions (
        partition   {key} NOT NULL,
        callback_id {int} NOT NULL REFERENCES callbacks(id),
        PRIMARY KEY (partition, callback_id)
    ){without_rowid};
    CREATE TABLE partitions (
        partition       {key} PRIMARY KEY,
        written_through {int} NOT NULL,
        rows            {int} NOT NULL,
        files           {int} NOT NULL,
        written_at      TEXT NOT NULL,
        run_id          TEXT NOT NULL
    );
    "#,
        sqlite: "",
        postgres: "ALTER TABLE requests ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY;",
    },
    // v2: bodies are stored zstd-compressed (`body_encoding = 'zstd'`); older rows stay JSON text.
    Migration {
        all: "ALTER TABLE callbacks ADD COLUMN body_encoding TEXT NOT NULL DEFAULT 'json';",
        sqlite: "",
        postgres: "",
    },
    // v3: retention. Old callbacks move to archive files (recorded here, with the partitions they
    // hold, so that a partition asked for again is rebuilt from its archive and its journal).
    Migration {
        all: r#"
    CREATE INDEX callbacks_by_received ON callbacks(received_at);
    CREATE INDEX callback_partitions_by_callback ON callback_partitions(callback_id);
    CREATE TABLE archive_files (
        file        {key} PRIMARY KEY,
        callbacks   {int} NOT NULL,
        first_id    {int} NOT NULL,
        last_id     {int} NOT NULL,
        bytes       {int} NOT NULL,
        archived_at {key} NOT NULL,
        run_id      TEXT NOT NULL
    );
    CREATE TABLE archived_partitions (
        partition {key} NOT NULL,
        file      {key} NOT NULL REFERENCES archive_files(file),
        callbacks {int} NOT NULL,
        PRIMARY KEY (partition, file)
    ){without_rowid};
    "#,
        sqlite: "",
        postgres: "",
    },
    // v4: several workers on one range (claims with leases, ms since the epoch) and one request
    // budget per account.
    Migration {
        all: r#"
    ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until {int};
    ALTER TABLE jobs ADD COLUMN claimed_at {int};
    CREATE TABLE rate_budget (
        account    {key} PRIMARY KEY,
        tokens     {real} NOT NULL,
        updated_at {int} NOT NULL
    );
    "#,
        sqlite: "",
        postgres: "",
    },
    // v5: the digest is XXH3-128 from now on; older rows keep their SHA-256 (another length: the
    // two never compare equal). SQLite's new bodies live in append-only segment files (see
    // `segments`); their rows are the index (`body` is empty, and `body_encoding` is `segment`,
    // `segment-zstd` or `segment-lz4`).
    Migration {
        all: "ALTER TABLE callbacks RENAME COLUMN body_sha256 TO body_digest;",
        sqlite: SEGMENTS,
        postgres: "",
    },
    // v6: PostgreSQL vacuums the journal's two insert-only tables after every 200,000 new rows
    // instead of after a fifth of the table (its default): each vacuum then has the same work at
    // 1 M rows as at 100 M, instead of ever longer ones that a listener's throughput dips through
    // (docs/performance.md, "A listener up for weeks: the soak").
    Migration {
        all: "",
        sqlite: "",
        postgres: r#"
    ALTER TABLE callbacks SET (autovacuum_vacuum_insert_scale_factor = 0,
                               autovacuum_vacuum_insert_threshold = 200000);
    ALTER TABLE callback_partitions SET (autovacuum_vacuum_insert_scale_factor = 0,
                                         autovacuum_vacuum_insert_threshold = 200000);
    "#,
    },
    // v7: PostgreSQL has the segment tables too (never written there), so that both backends
    // have one schema and every statement is written once.
    Migration {
        all: "",
        sqlite: "",
        postgres: SEGMENTS,
    },
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// `sql` in `dialect`'s words.
fn in_words(sql: &str, d: &Dialect) -> String {
    sql.replace("{int}", d.int)
        .replace("{id}", d.id)
        .replace("{real}", d.real)
        .replace("{blob}", d.blob)
        .replace("{key}", d.key)
        .replace("{without_rowid}", d.without_rowid)
}

/// Brings the store up to [`VERSION`], in one transaction (under the dialect's migration lock,
/// so that processes starting together migrate once).
pub fn migrate(db: &mut impl Backend) -> Result<(), StateError> {
    let d = db.dialect();
    let name = db.name().to_owned();
    let current = db.transaction(|tx| {
        if let Some(lock) = d.migrate_lock {
            tx.query(lock, &[])?;
        }
        tx.batch(&in_words(
            "CREATE TABLE IF NOT EXISTS schema_version (version {int} NOT NULL)",
            d,
        ))?;
        let current = version(tx, &name)?.unwrap_or(0);
        if current > VERSION {
            return Ok(current);
        }
        for m in &MIGRATIONS[usize::try_from(current).unwrap_or(0)..] {
            let own = if d.is_sqlite() { m.sqlite } else { m.postgres };
            tx.batch(&in_words(&format!("{}\n{own}", m.all), d))?;
        }
        if current == 0 {
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[VERSION.into()],
            )?;
        } else if current < VERSION {
            tx.execute("UPDATE schema_version SET version = $1", &[VERSION.into()])?;
        }
        Ok(current)
    })?;
    if current > VERSION {
        return Err(StateError::Invalid {
            path: name,
            message: format!(
                "schema version {current} was written by a newer tsusage (this one knows {VERSION})"
            ),
        });
    }
    Ok(())
}

/// The schema version the store is at (`None` before its first migration).
pub fn version(db: &dyn Exec, name: &str) -> Result<Option<i64>, StateError> {
    match db.query_opt("SELECT version FROM schema_version", &[])? {
        Some(row) => row.int(0).map(Some).map_err(|e| StateError::Invalid {
            path: name.to_owned(),
            message: e.to_string(),
        }),
        None => Ok(None),
    }
}
