//! The crate error: one enum that every stage's error converts into, and the exit code it maps to.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::output::WriteError;
use crate::plan::PlanError;
use crate::state::StateError;
use crate::submit::{ApiError, SubmitError};

/// Everything that can stop a command. Per-record problems are not errors: they are rejects,
/// counted in the run report, and the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or an environment override is invalid (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The command line names something that cannot be used (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The date range asked for is invalid (exit code 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The vendor API cannot be used: credentials rejected or missing (exit code 1).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The simulator cannot start (exit code 1).
    #[error(transparent)]
    Sim(#[from] crate::sim::SimError),
    /// The callback listener cannot start (exit code 1).
    #[error(transparent)]
    Listener(#[from] crate::collect::http_listener::ListenerError),
    /// The state store failed: nothing after this point can be trusted (exit code 1).
    #[error(transparent)]
    State(#[from] StateError),
    /// Writing Parquet, rejects or the run report failed (exit code 1).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Any other I/O failure, with the path it concerns (exit code 1).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code for this error (README, "Exit codes"): 2 for usage or config errors,
    /// 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) | Error::Plan(_) => crate::report::EXIT_USAGE,
            _ => crate::report::EXIT_FAILED,
        }
    }
}

impl From<crate::collect::CollectError> for Error {
    fn from(e: crate::collect::CollectError) -> Self {
        use crate::collect::CollectError as C;
        match e {
            C::State(e) => Error::State(e),
            C::Output(e) => Error::Write(e),
            C::Listener(e) => Error::Listener(e),
            C::Io { path, source } => Error::Io { path, source },
        }
    }
}

impl From<crate::write::publish::PublishError> for Error {
    fn from(e: crate::write::publish::PublishError) -> Self {
        use crate::write::publish::PublishError as P;
        match e {
            P::State(e) => Error::State(e),
            P::Output(e) => Error::Write(e),
            P::Archive(e) => e.into(),
        }
    }
}

impl From<crate::report::stored::ReportError> for Error {
    fn from(e: crate::report::stored::ReportError) -> Self {
        use crate::report::stored::ReportError as R;
        match e {
            R::Usage(message) => Error::Usage(message),
            R::Io { path, source } => Error::Io { path, source },
        }
    }
}

impl From<SubmitError> for Error {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Api(e) => Error::Api(e),
            SubmitError::State(e) => Error::State(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
