//! tsusage: Verizon ThingSpace usage, reconciled to the byte.
//!
//! # Layout
//!
//! The pipeline, stage by stage, with the type that flows between each pair (as in
//! docs/architecture.md, "The flow"):
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
//! - [`collect`]: callback bodies from a source ([`collect::source`]: the listener, a drop directory,
//!   an external `tsusage listen`) → stripped of credentials → journaled durably; the tracker
//!   ([`collect::tracker`]) says which jobs are complete; the archive format
//!   ([`collect::archive`]); the rows of what a run journals are kept by [`collect::RowKeeper`].
//! - [`state`]: the state store, reached through its trait from [`state::open`]: callback journal,
//!   jobs, requests, runs, written partitions, archive files; SQLite is the embedded implementation.
//!   Async code reaches it through the writer thread ([`state::StateWriter`]) or
//!   [`state::AsyncStore`] (calls on the blocking pool).
//! - [`normalize`]: the one payload parser and the value policy → typed [`normalize::UsageRow`]s.
//! - [`write`]: Parquet partitions published atomically ([`write::publish`]); rejects and completeness
//!   files.
//! - [`output`]: what every stage writes besides Parquet (rejects, atomic files), and object storage
//!   when `output.url` is set ([`output::bucket`]: one object per partition, reports beside it).
//! - [`report`]: the run report, exit codes, the `status` text.
//! - [`logging`]: log lines on stderr, as text or JSON, each with the run id.
//! - [`pipeline`]: each command's wiring, in the order above; a run's collection while it submits
//!   ([`pipeline::session`]) and its live display ([`pipeline::progress`]).
//! - [`config`]: the TOML configuration with environment overrides, as plain data (the `[sim]`
//!   section too: [`config::SimSection`]).
//! - [`plan`]: date range and ICCIDs → jobs, and which to send ([`plan::select`]); [`submit`]: jobs →
//!   requestIds (client in `submit::client`, the vendor's field names in `submit::wire`).
//! - [`sim`]: the built-in ThingSpace simulator, run with the `[sim]` section ([`sim::SimConfig`]);
//!   [`failpoint`]: injected pauses for crash tests;
//!   [`tls`]: the rustls setup the API client and the listener share.
//!

//! # Layers
//!
//! Bottom to top; a module uses only modules below it (`tests/integration/architecture.rs` checks
//! every `crate::` path against this table, with the imports that still break it listed there as
//! debts, each with what fixing it takes):
//!
//! `failpoint`, `tls` (side by side) < `config` < `sim` (shares no code with the client; it converts
//! its `[sim]` section of the configuration into its own) < `output` < `ingest` < `plan` <
//! `normalize` < `state` < `submit`, `collect` (side by side: neither knows the other; the pipeline
//! drives them together) < `write` < `report` < `fuzzing` < `error` < `logging` < `pipeline`.

pub mod collect;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod fuzzing;
pub mod ingest;
pub mod logging;
pub mod normalize;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod sim;
pub mod state;
pub mod submit;
pub mod tls;
pub mod write;

pub use error::{Error, Result};
