//! `tsusage prune` (and the end of `run` with `state.retain_days`): journaled callbacks older than
//! the horizon, whose partitions are written, move to the archive; then the space is reclaimed.
//!
//! The order makes a crash anywhere harmless: archive files are written under temporary names,
//! fsynced and renamed; then one transaction records them and deletes their callbacks from the
//! journal. Killed before that commit, the callbacks are still journaled and the files are
//! unrecorded orphans, which the next prune removes before it starts; killed after it, the files
//! hold them. The store is the record of what is archived: a callback is never in neither, and
//! never in both as far as any reader of the store can tell.

use std::path::Path;

use chrono::NaiveDate;

use super::{Outcome, conclude};
use crate::collect::archive::{self, ArchiveWriter};
use crate::config::Config;
use crate::report::{PruneReport, RunReport, new_run_id};
use crate::state::Store;
use crate::{Error, Result};

/// µs in a day.
const DAY_US: i64 = 86_400_000_000;

/// `tsusage prune [--before DATE]`: archives what was received before `before` (midnight UTC), or
/// by default before `state.retain_days` ago.
pub fn prune(config: &Config, before: Option<NaiveDate>) -> Result<Outcome> {
    let horizon = match before {
        Some(day) => day
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
            .ok_or_else(|| Error::Usage(format!("--before {day}: not a day")))?,
        None if config.state.retain_days > 0 => retention_horizon(config.state.retain_days),
        None => {
            return Err(Error::Usage(
                "nothing to prune by: give --before YYYY-MM-DD or set state.retain_days".into(),
            ));
        }
    };
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "prune");
    let mut store = crate::state::open(&config.state)?;
    let _lock = store.lock(&run_id, "prune")?;
    store.begin_run(&run_id, "prune")?;
    report.prune = Some(prune_store(config, &mut *store, horizon, &run_id)?);
    conclude(report, &mut *store, &config.output)
}

/// The horizon `retain_days` before now, in µs.
pub(crate) fn retention_horizon(retain_days: u32) -> i64 {
    crate::collect::now_micros() - i64::from(retain_days) * DAY_US
}

/// Moves what was received before `horizon` (µs) to the archive, for a command that holds the run
/// lock.
pub(crate) fn prune_store<S: Store + ?Sized>(
    config: &Config,
    store: &mut S,
    horizon: i64,
    run_id: &str,
) -> Result<PruneReport> {
    let store_bytes_before = store_bytes(&config.state.path);
    let out = &config.output.dir;
    let orphans_removed = archive::clean_orphans(out, &store.archive_files()?)?;
    let mut writer = ArchiveWriter::new(out);
    let mut ids = Vec::new();
    crate::state::try_each(
        |each| store.archivable(horizon, each),
        |cb| {
            ids.push(cb.id);
            writer.add(&cb)
        },
    )?;
    let files = writer.finish()?;
    let counts = store.commit_archive(&files, &ids, horizon, run_id)?;
    store.reclaim_space()?;
    let root = archive::archive_dir(out);
    let report = PruneReport {
        horizon: chrono::DateTime::from_timestamp_micros(horizon)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        counts,
        archive_bytes: files.iter().map(|f| f.bytes).sum(),
        files: files.iter().map(|f| root.join(&f.file)).collect(),
        orphans_removed,
        store_bytes_before,
        store_bytes_after: store_bytes(&config.state.path),
    };
    tracing::info!(
        callbacks = report.counts.callbacks_archived,
        files = report.files.len(),
        horizon = report.horizon,
        store_bytes = report.store_bytes_after,
        "pruned the journal"
    );
    Ok(report)
}

/// The store's size on disk: the database and its write-ahead log.
fn store_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path) + size(Path::new(&wal))
}
