//! The wiring: each command strings the stages together here, in the order of DESIGN §1.
//!
//! `validate`: ingest (CSV) → report.
//! `ingest DIR`: collect (drop dir) → journal → normalize → write (every pending partition) → report.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::collect::Intake;
use crate::collect::drop_dir::{self, DropDirOptions};
use crate::config::Config;
use crate::ingest::{self, IngestOptions};
use crate::normalize::Collapser;
use crate::report::{OutputReport, PartitionReport, RunReport, new_run_id};
use crate::state::{SqliteStore, Store};
use crate::write::parquet::{PartitionWriter, WriterOptions};
use crate::write::rejects::{IccidRejects, RecordRejects};
use crate::{Error, Result};

/// A finished command: its report and where the report was saved.
#[derive(Debug)]
pub struct Outcome {
    pub report: RunReport,
    pub report_path: PathBuf,
}

/// `tsusage validate FILE...`: reads ICCID lists, counts, writes the rejects, changes nothing else.
pub fn validate(config: &Config, files: &[PathBuf]) -> Result<Outcome> {
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "validate");
    let out = &config.output.dir;
    let mut rejects = IccidRejects::new(rejects_dir(out).join(format!("{run_id}-iccids.csv")));
    let options = IngestOptions {
        strict_luhn: config.input.strict_luhn,
    };
    let list = ingest::read_iccid_files(files, options, &mut rejects).map_err(|e| match e {
        ingest::IngestError::Read { path, source } => {
            Error::Usage(format!("{}: cannot read: {source}", path.display()))
        }
        ingest::IngestError::Rejects(w) => Error::Write(w),
    })?;
    report.iccids = Some(list.stats);
    report.rejects_files.extend(rejects.finish()?);
    report.finish();
    let report_path = report.save(out)?;
    Ok(Outcome {
        report,
        report_path,
    })
}

/// `tsusage ingest DIR`: journals every callback file in `dir`, then writes what the journal holds
/// that the output does not.
pub fn ingest_dir(config: &Config, dir: &Path, keep_files: bool) -> Result<Outcome> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", dir.display())));
    }
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "ingest");
    let mut store = SqliteStore::open(&config.state.path)?;
    store.begin_run(&run_id, "ingest")?;
    let out = &config.output.dir;

    let mut intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
    let mut rejects =
        RecordRejects::new(rejects_dir(out).join(format!("{run_id}-callbacks.jsonl")));
    let options = DropDirOptions {
        keep_files,
        max_file_bytes: config.callbacks.max_file_bytes,
    };
    let progress = progress_bar("files");
    let dropped = drop_dir::collect(
        dir,
        options,
        &mut intake,
        &mut store,
        &mut rejects,
        &progress,
    );
    progress.finish_and_clear();
    report.drop_dir = Some(dropped?);
    report.rejects_files.extend(rejects.finish()?);
    tracing::info!(
        callbacks = intake.callbacks.received,
        new = intake.callbacks.journaled,
        "journaled"
    );

    report.output = Some(write_pending(config, &mut store, &run_id)?);
    report.callbacks = Some(intake.callbacks);
    report.records = Some(intake.records);
    report.finish();
    let report_path = report.save(out)?;
    let json = serde_json::to_string(&report).unwrap_or_default();
    store.finish_run(&run_id, report.exit_code, &json)?;
    Ok(Outcome {
        report,
        report_path,
    })
}

/// Rewrites every partition whose journal has callbacks newer than its last write (invariant 3: the
/// output is a function of the journal, so this can run at any time).
pub fn write_pending<S: Store + ?Sized>(
    config: &Config,
    store: &mut S,
    run_id: &str,
) -> Result<OutputReport> {
    let writer = PartitionWriter::new(
        &config.output.dir,
        WriterOptions {
            run_id: run_id.to_owned(),
            zstd_level: config.output.zstd_level,
            max_rows_per_file: config.output.max_rows_per_file,
        },
    );
    writer.clean_staging()?;
    let account: Arc<str> = Arc::from(config.account_name.as_str());
    let mut output = OutputReport::default();
    for pending in store.pending_partitions()? {
        let mut collapser = Collapser::new(
            &pending.partition,
            config.output.partition_by,
            config.input.strict_luhn,
            account.clone(),
        );
        store.callbacks_for_partition(&pending.partition, pending.through_id, &mut |cb| {
            collapser.add(&cb.body, cb.received_at, cb.account_name.as_deref());
            Ok(())
        })?;
        let (records_in, collapsed) = (collapser.records_in, collapser.collapsed);
        let rows = collapser.into_rows();
        let written = writer.write(&pending.partition, &rows)?;
        store.mark_written(
            &pending.partition,
            pending.through_id,
            written.rows,
            written.files,
            run_id,
        )?;
        tracing::info!(
            partition = pending.partition,
            rows = written.rows,
            files = written.files,
            "partition written"
        );
        output.rows_written += written.rows;
        output.files_written += written.files;
        output.collapsed += collapsed;
        output.partitions.push(PartitionReport {
            partition: pending.partition,
            rows: written.rows,
            files: written.files,
            records_in,
            collapsed,
        });
    }
    Ok(output)
}

fn rejects_dir(out: &Path) -> PathBuf {
    out.join("rejects")
}

/// A progress bar on a terminal; hidden when stderr is not one (logs say what happens instead).
fn progress_bar(unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let template = format!("{{spinner}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}] {{wide_bar}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
