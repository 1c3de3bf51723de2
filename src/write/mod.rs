//! Stage 6, write: usage rows → Parquet partitions published atomically; the completeness file.
//!
//! - [`parquet`]: schema v1, the writer, and the atomic partition publish.
//! - [`publish`]: every pending partition written (from a command's rows, or rebuilt) and recorded.
//! - [`completeness`]: a run's completeness file (each planned pair that did not end as usage).
//!
//! The rejects files are written by the `output` module (re-exported here as [`rejects`]), the run
//! reports by the `report` module.

pub mod completeness;
pub mod parquet;
pub mod publish;

pub use crate::output::{WriteError, rejects};
pub(crate) use crate::output::{sync_dir, write_atomic, write_atomic_with};
