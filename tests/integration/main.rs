//! tsusage's one integration-test binary: the real `tsusage` binary on temp directories, Parquet read
//! back with the parquet crate, the real SQLite file.

mod architecture;
mod cli;
mod corpus;
mod crash;
mod deploy;
mod faults;
mod fuzz_corpus;
mod ingest_dir;
mod listener;
mod nightly;
mod operations;
mod postgres;
mod properties;
mod prune;
mod report_page;
mod run;
mod s3;
mod secrets;
mod servers;
mod sim;
mod store_conformance;
mod submit;
mod util;
mod validate;
mod vendor;
mod workers;
