//! What `tsusage ingest` would cost without parts of its work: the floor under it, measured with
//! its own stages. `benches/compare/run.sh` runs it beside the real command and DuckDB.
//!
//!   cargo run --release --example floor -- STAGE DIR
//!
//! STAGE is how far it goes, each including the ones before:
//! - `read`: read every `*.json` file of DIR (or the lines of its `*.ndjson` files), on every core;
//! - `parse`: and parse each body strictly (credentials stripped, value policy, digest), as the
//!   intake does, throwing the result away;
//! - `parquet`: and keep the records (newest wins, within the same memory budget) and write them as
//!   zstd Parquet, one partition per usage day, under `DIR.floor-out/`.
//!
//! What it leaves out is what `ingest` adds: the durable journal (segment append, fsync, SQLite
//! index), the rejects files, the file moves and the run report.

#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tsusage::collect::{Intake, Prepared};
use tsusage::config::PartitionBy;
use tsusage::normalize::collapse::RowSet;
use tsusage::write::parquet::{PartitionWriter, WriterOptions};

/// The row budget `ingest` uses.
const ROWS_BUDGET: usize = 64 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(stage), Some(dir)) = (args.next(), args.next()) else {
        return Err("usage: floor read|parse|parquet DIR".into());
    };
    let dir = PathBuf::from(dir);
    let started = Instant::now();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "ndjson"))
        .collect();
    files.sort();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parse = stage != "read";
    // NDJSON files are read whole, then their lines shared out; `.json` files are read by the
    // workers themselves. Worker `w` takes every `workers`-th run of 16 files or lines (usage and
    // completion callbacks alternate in the generated data: one each would not share the work).
    let ndjson: Vec<String> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
        .map(std::fs::read_to_string)
        .collect::<Result<_, _>>()?;
    let lines: Vec<&str> = ndjson
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let json: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    let results: Vec<(u64, Vec<Prepared>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (json, lines) = (&json, &lines);
                scope.spawn(move || {
                    let mut intake = Intake::new(false, PartitionBy::Day);
                    let (mut bytes, mut kept) = (0u64, Vec::new());
                    let mut take = |body: &str, i: usize| {
                        bytes += body.len() as u64;
                        let mut rejects = Vec::new();
                        if parse && let Ok(p) = intake.prepare(body, format!("{i}"), &mut rejects) {
                            kept.push(p);
                        }
                    };
                    let mine = |i: &usize| (i / 16) % workers == w;
                    for (i, path) in json.iter().enumerate().filter(|(i, _)| mine(i)) {
                        if let Ok(text) = std::fs::read_to_string(path) {
                            take(&text, i);
                        }
                    }
                    for (i, line) in lines.iter().enumerate().filter(|(i, _)| mine(i)) {
                        take(line, i);
                    }
                    (bytes, kept)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let bytes: u64 = results.iter().map(|r| r.0).sum();
    let callbacks: usize = results.iter().map(|r| r.1.len()).sum();
    let mut rows = 0u64;
    if stage == "parquet" {
        let out = dir.with_extension("floor-out");
        let _ = std::fs::remove_dir_all(&out);
        rows = write(results.into_iter().flat_map(|r| r.1), &out)?;
    }
    println!(
        "floor {stage}: {} files, {bytes} bytes, {callbacks} callbacks, {rows} rows in {:.2} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Collapses the records and writes each partition as `ingest` does; returns the rows written.
fn write(
    prepared: impl Iterator<Item = Prepared>,
    out: &Path,
) -> Result<u64, Box<dyn std::error::Error>> {
    let spill = out.join(".spill");
    std::fs::create_dir_all(&spill)?;
    let account: Arc<str> = Arc::from("0000123456-00001");
    let mut set = RowSet::new(PartitionBy::Day, account, ROWS_BUDGET, &spill);
    for p in prepared {
        if p.records.is_empty() {
            continue;
        }
        let origin = set.add_origin(&p.request_id, None, 1);
        for r in &p.records {
            set.push(origin, r)?;
        }
    }
    let writer = PartitionWriter::new(out, WriterOptions::new("floor"));
    let mut rows = 0;
    for name in set.partition_names() {
        let Some(part) = set.take(&name) else {
            continue;
        };
        let collapsed = part.collapsed()?;
        rows += writer
            .write_collapsed(&name, collapsed, set.origins())?
            .rows;
    }
    Ok(rows)
}
