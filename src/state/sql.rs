//! What a backend gives the store's rules ([`super::rules`]): statements run with values, typed
//! rows back, transactions, and the few words of SQL that differ ([`Dialect`]).
//!
//! Statements are written once, with `$1, $2, …` placeholders (SQLite's executor binds them by
//! name), and a list parameter ([`Value::Texts`], [`Value::Ints`]) is tested
//! with [`Dialect::any`].

use std::ops::ControlFlow;

use super::{Journaled, NewCallback, RunGuard, StateError};

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
    /// A list, for [`Dialect::any`].
    Texts(Vec<String>),
    /// A list, for [`Dialect::any`].
    Ints(Vec<i64>),
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<u8> for Value {
    fn from(v: u8) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Blob(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

impl From<&[&str]> for Value {
    fn from(v: &[&str]) -> Value {
        Value::Texts(v.iter().map(|s| (*s).to_owned()).collect())
    }
}

impl From<&[i64]> for Value {
    fn from(v: &[i64]) -> Value {
        Value::Ints(v.to_vec())
    }
}

/// The parameters of a statement: `params![a, b]` for `$1, $2`.
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        ::std::vec::Vec::<$crate::state::sql::Value>::from([$($crate::state::sql::Value::from($v)),*])
    };
}
pub(crate) use params;

/// A row of a query's answer, its columns read by position.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

/// A column that is not what the rules expect (a schema this build does not know).
#[derive(Debug, thiserror::Error)]
#[error("column {index}: expected {expected}, found {found:?}")]
pub struct BadColumn {
    index: usize,
    expected: &'static str,
    found: Option<Value>,
}

impl Row {
    fn at(&self, index: usize) -> &Value {
        self.0.get(index).unwrap_or(&Value::Null)
    }

    fn bad(&self, index: usize, expected: &'static str) -> BadColumn {
        BadColumn {
            index,
            expected,
            found: self.0.get(index).cloned(),
        }
    }

    pub fn int(&self, index: usize) -> Result<i64, BadColumn> {
        self.opt_int(index)?
            .ok_or_else(|| self.bad(index, "an integer"))
    }

    pub fn opt_int(&self, index: usize) -> Result<Option<i64>, BadColumn> {
        match self.at(index) {
            Value::Int(v) => Ok(Some(*v)),
            Value::Null => Ok(None),
            _ => Err(self.bad(index, "an integer")),
        }
    }

    pub fn real(&self, index: usize) -> Result<f64, BadColumn> {
        match self.at(index) {
            Value::Real(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            _ => Err(self.bad(index, "a number")),
        }
    }

    pub fn text(&self, index: usize) -> Result<String, BadColumn> {
        self.opt_text(index)?.ok_or_else(|| self.bad(index, "text"))
    }

    pub fn opt_text(&self, index: usize) -> Result<Option<String>, BadColumn> {
        match self.at(index) {
            Value::Text(v) => Ok(Some(v.clone())),
            Value::Null => Ok(None),
            _ => Err(self.bad(index, "text")),
        }
    }

    /// Bytes, from a blob or a text column (a body journaled as text).
    pub fn bytes(&self, index: usize) -> Result<&[u8], BadColumn> {
        match self.at(index) {
            Value::Blob(v) => Ok(v),
            Value::Text(v) => Ok(v.as_bytes()),
            _ => Err(self.bad(index, "bytes")),
        }
    }
}

/// `rows` as the parameter of [`Dialect::rows_of`].
pub fn json_rows<T: serde::Serialize>(rows: &[T]) -> Value {
    Value::Text(serde_json::to_string(rows).unwrap_or_else(|_| "[]".into()))
}

/// One statement and its parameters, for [`Exec::execute_all`].
pub type Statement<'a> = (&'a str, Vec<Value>);

/// What runs a statement: a backend outside a transaction, or a transaction.
pub trait Exec {
    /// The rows `sql` answers.
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StateError>;
    /// Each row `sql` answers, in turn, never all of them in memory, until `each` breaks.
    fn query_each(
        &self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(Row) -> Result<ControlFlow<()>, StateError>,
    ) -> Result<(), StateError>;
    /// Runs `sql`: the rows it changed.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StateError>;
    /// Runs the statements in order (PostgreSQL sends them all before reading an answer): the
    /// rows each changed.
    fn execute_all(&self, statements: Vec<Statement<'_>>) -> Result<Vec<u64>, StateError>;
    /// Runs the `INSERT` `sql` once for each row of parameters, in order (pipelined, as
    /// [`Exec::execute_all`]): the `id` of each new row, or `None` where it inserted nothing.
    fn insert_all(&self, sql: &str, rows: Vec<Vec<Value>>) -> Result<Vec<Option<i64>>, StateError>;
    /// Runs `sql`, several statements without parameters (a migration).
    fn batch(&self, sql: &str) -> Result<(), StateError>;

    /// The one row `sql` answers, if any.
    fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, StateError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// The few words of SQL that differ between backends.
#[derive(Debug)]
pub struct Dialect {
    pub family: Family,
    /// A 64-bit integer column, and the integer primary key that numbers inserts.
    pub int: &'static str,
    pub id: &'static str,
    pub real: &'static str,
    pub blob: &'static str,
    /// A text column compared and ordered byte by byte (keys, RFC 3339 times).
    pub key: &'static str,
    /// After a `CREATE TABLE`'s columns, for a table that is only its primary key.
    pub without_rowid: &'static str,
    /// The column that orders `requests` as they were recorded.
    pub request_order: &'static str,
    /// After a `SELECT` whose rows the statement changes: skips rows another transaction holds.
    pub skip_locked: &'static str,
    /// After a `SELECT` whose row the transaction changes next: holds it until the commit.
    pub for_update: &'static str,
    /// The store's clock, in ms since the epoch (one clock for every worker).
    pub now_ms: &'static str,
    /// The `WHERE` of the journal's `INSERT … SELECT $1, …` (`$5`: the body's digest) that spares
    /// a body already journaled an id, so that journal ids have no gaps.
    pub new_digest_only: &'static str,
    /// Taken first in a migration, where several processes may migrate at once.
    pub migrate_lock: Option<&'static str>,
    /// Taken first in a journal commit, where several processes write the journal at once, so
    /// that journal ids commit in increasing order (readers follow the journal by id).
    pub journal_lock: Option<&'static str>,
}

/// Which SQL a [`Dialect`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn is_sqlite(&self) -> bool {
        self.family == Family::Sqlite
    }

    /// `column` is one of the list parameter `$n`.
    pub fn any(&self, column: &str, n: usize) -> String {
        match self.family {
            Family::Sqlite => format!("{column} IN (SELECT value FROM json_each(${n}))"),
            Family::Postgres => format!("{column} = ANY(${n})"),
        }
    }

    /// The rows of the parameter `$n`, a JSON array of arrays ([`json_rows`]) whose columns have
    /// the PostgreSQL `types`, as a table with columns `c0`, `c1`, …: one statement inserts many rows.
    pub fn rows_of(&self, n: usize, types: &[&str]) -> String {
        let columns: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| match self.family {
                Family::Sqlite => format!("value ->> {i} AS c{i}"),
                Family::Postgres => format!("(e ->> {i})::{ty} AS c{i}"),
            })
            .collect();
        match self.family {
            Family::Sqlite => format!("(SELECT {} FROM json_each(${n}))", columns.join(", ")),
            Family::Postgres => format!(
                "(SELECT {} FROM jsonb_array_elements(${n}::text::jsonb) e)",
                columns.join(", ")
            ),
        }
    }

    /// The aggregate of `column`'s values (text) as a JSON array in their order, as text.
    pub fn json_array(&self, column: &str) -> String {
        match self.family {
            Family::Sqlite => format!("json_group_array({column})"),
            Family::Postgres => format!("json_agg({column} ORDER BY {column})::text"),
        }
    }
}

/// A backend: an [`Exec`] outside transactions, transactions, and what truly differs between
/// databases (the run lock, where journal bodies live, space reclaim).
pub trait Backend: Exec + Send {
    /// Names the store in errors and logs (a path, or a URL without its password).
    fn name(&self) -> &str;
    fn dialect(&self) -> &'static Dialect;
    /// Runs `f` in one transaction that takes the write lock at once (SQLite's `BEGIN IMMEDIATE`),
    /// committed if `f` returns `Ok` and rolled back otherwise.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&dyn Exec) -> Result<T, StateError>,
    ) -> Result<T, StateError>;

    /// The run lock, exclusive or shared ([`super::Store::lock`]).
    fn lock(&self, run_id: &str, command: &str, shared: bool) -> Result<RunGuard, StateError>;
    /// [`super::Store::lock_publish`].
    fn lock_publish(&self) -> Result<Option<RunGuard>, StateError>;
    /// [`super::Store::shares_work`].
    fn shares_work(&self) -> bool;
    /// Journals `batch` ([`super::Store::journal`]): where the bodies go is the backend's, the
    /// rows are [`super::rules::commit_journal`]'s.
    fn journal(
        &mut self,
        batch: &[NewCallback<'_>],
        received_at: i64,
    ) -> Result<Vec<Journaled>, StateError>;
    /// The body of a row read with [`super::rules::BODY_COLUMNS`] from column `first` on.
    fn body(&self, row: &Row, first: usize) -> Result<String, StateError>;
    /// After a prune's commit: the journal's bodies that no row refers to any more may go.
    fn pruned(&mut self) -> Result<(), StateError>;
    /// [`super::Store::reclaim_space`].
    fn reclaim_space(&mut self) -> Result<(), StateError>;

    /// A column that is not what the rules expect, as this store's error.
    fn bad(&self, e: BadColumn) -> StateError {
        StateError::Invalid {
            path: self.name().to_owned(),
            message: e.to_string(),
        }
    }
}
