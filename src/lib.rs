//! tsusage: Verizon ThingSpace usage, reconciled to the byte.
//!
//! # Layout
//!
//! The pipeline, stage by stage, with the type that flows between each pair (DESIGN §1):
//!
//! ```text
//!  ICCID CSV ──▶ ingest ──Iccid──▶ plan ──Job──▶ submit ──requestId──▶ ThingSpace
//!                                                                        │ callbacks
//!  drop dir / listener ──body──▶ collect ──Prepared──▶ state (journal) ◀─┘
//!                                                        │ StoredCallback
//!                                           normalize ──UsageRow──▶ write (Parquet) ──▶ report
//! ```
//!
//! - [`ingest`]: ICCID lists from CSV → validated, deduplicated [`ingest::Iccid`]s; bad rows rejected.
//! - [`collect`]: callback bodies from a drop directory → stripped of credentials → journaled durably.
//! - [`state`]: the state store (SQLite): callback journal, jobs, requests, runs, written partitions.
//! - [`normalize`]: the one payload parser and the value policy → typed [`normalize::UsageRow`]s.
//! - [`write`]: Parquet partitions published atomically; rejects files.
//! - [`report`]: the run report and exit codes, its summary block and its HTML page.
//! - [`logging`]: log lines on stderr, as text or JSON, each with the run id.
//! - [`progress`]: the live display of a run on a terminal.
//! - [`pipeline`]: each command's wiring, in the order above.
//! - [`config`]: the TOML configuration with environment overrides.
//! - [`plan`]: date range and ICCIDs → jobs; [`submit`]: jobs → requestIds (client in `submit::client`).
//! - [`sim`]: the built-in ThingSpace simulator; [`failpoint`]: injected pauses for crash tests.
//!

pub mod collect;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod fuzzing;
pub mod ingest;
pub mod logging;
pub mod normalize;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod report;
pub mod sim;
pub mod state;
pub mod submit;
pub mod write;

pub use error::{Error, Result};
