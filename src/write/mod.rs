//! Stage 6, write: usage rows → Parquet partitions published atomically; rejects files; run reports.
//!
//! - [`parquet`]: schema v1, the writer, and the atomic partition publish.
//! - [`publish`]: every pending partition written (from a command's rows, or rebuilt) and recorded.
//! - [`rejects`]: the rejects files (CSV for ICCID lists, JSON lines for callbacks).

pub mod completeness;
pub mod parquet;
pub mod publish;

pub use crate::output::{WriteError, rejects};
pub(crate) use crate::output::{sync_dir, write_atomic, write_atomic_with};
