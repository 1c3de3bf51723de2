//! The wiring: each command strings the stages together here, in the order of the flow in
//! docs/architecture.md.
//!
//! `validate`: ingest (CSV) → report.
//! `ingest DIR`: collect (drop dir) → journal → normalize → write (every pending partition) → report.
//! `submit`: ingest (CSV) → plan → record intent → authenticate → submit (requestIds recorded) → report.
//! `run`: the whole pipeline, in [`run`]; its submit-while-collecting loop, which drives
//! submission and collection together, is [`session`], and its live display [`progress`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::collect::Intake;
use crate::collect::Writer;
use crate::collect::archive;
use crate::collect::drop_dir::{self, DropDirOptions};
use crate::config::{Config, OutputConfig};
use crate::ingest::{self, Iccid, IngestOptions};
use crate::output::bucket::Bucket;
use crate::output::rejects::{IccidRejects, RecordRejects};
use crate::plan::{self, DateRange};
use crate::report::{RunReport, new_run_id};
use crate::state::Store;
use crate::submit::{self, ApiClient, SubmitOptions};
use crate::write::publish;
use crate::{Error, Result};

mod listen;
pub mod progress;
mod prune;
mod run;
pub mod session;
mod simulate;

pub use listen::listen;
pub use prune::prune;
pub use run::{RunOptions, run};

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
    read_iccids(config, files, &run_id, &mut report)?;
    report.finish();
    let report_path = report.save(&config.output.dir)?;
    Ok(Outcome {
        report,
        report_path,
    })
}

/// Ends a command: sets the exit code from the counts, saves the report (its path is printed last)
/// and records it in the store's `runs` table.
///
/// With `output.url`, the files of the report (rejects, completeness, the report's page, then the
/// report itself) are uploaded beside the Parquet; the local copies stay in `output.dir`.
pub(crate) fn conclude<S: Store + ?Sized>(
    mut report: RunReport,
    store: &mut S,
    output: &OutputConfig,
) -> Result<Outcome> {
    report.finish();
    let report_path = report.save(&output.dir)?;
    if let Some(bucket) = Bucket::open(output)? {
        let mut files: Vec<PathBuf> = report.rejects_files.clone();
        files.extend(report.collect.as_ref().map(|c| c.completeness_file.clone()));
        files.push(crate::report::summary::html_path(&report_path));
        files.push(report_path.clone());
        for file in files.iter().filter(|f| f.is_file()) {
            let url = bucket.upload_beside(&output.dir, file)?;
            tracing::debug!(url, "uploaded");
        }
        tracing::info!(
            files = files.len(),
            url = %bucket.url(),
            "run report, rejects and completeness uploaded"
        );
    }
    let json = serde_json::to_string(&report).unwrap_or_default();
    store.finish_run(&report.run_id, report.exit_code, &json)?;
    Ok(Outcome {
        report,
        report_path,
    })
}

/// Rejected ICCID list rows: `(raw value, reason)`.
pub(crate) type RejectedRows = Vec<(String, String)>;

/// Stage 1 for a run: the ICCID lists, with their rejects file and counts in `report`; also the
/// rejected rows, `(raw value, reason)`.
pub(crate) fn read_iccids(
    config: &Config,
    files: &[PathBuf],
    run_id: &str,
    report: &mut RunReport,
) -> Result<(Vec<Iccid>, RejectedRows)> {
    let mut rejects =
        IccidRejects::new(rejects_dir(&config.output.dir).join(format!("{run_id}-iccids.csv")));
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
    let rejected = rejects.rows().to_vec();
    report.rejects_files.extend(rejects.finish()?);
    Ok((list.iccids, rejected))
}

/// `tsusage submit`: asks ThingSpace for the usage of every ICCID over `range`, recording each
/// requestId; the callbacks are collected by `listen` or `ingest`.
pub async fn submit(config: &Config, range: DateRange) -> Result<Outcome> {
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "submit");
    let mut store = crate::state::open(&config.state)?;
    let _lock = store.lock(&run_id, "submit")?;
    store.begin_run(&run_id, "submit")?;
    let (iccids, _) = read_iccids(config, &config.input.paths, &run_id, &mut report)?;

    // The same days and the same job selection as `run`.
    let plan::Selection {
        to_send: todo,
        report: plan_report,
        ..
    } = plan_jobs(config, &mut *store, &iccids, range, false)?;
    report.plan = Some(plan_report);
    tracing::info!(jobs = todo.len(), "submitting");

    let client = Arc::new(ApiClient::new(&config.api)?);
    let options = SubmitOptions::new(&config.api, todo.len());
    if !todo.is_empty() {
        client.authenticate().await?;
    }
    let path = config.state.name();
    let writer = Arc::new(Writer::spawn(store, path));
    let submitted = submit::submit(client.clone(), writer.clone(), todo, &options).await;
    client.logout().await;
    let mut store = Writer::finish_shared(writer)?;
    report.submit = Some(submitted?);
    conclude(report, &mut *store, &config.output)
}

/// Stage 2 for `run` and `submit`: the jobs of `range` (with the `plan.lookback_days` before it)
/// recorded as intent, and which of them to send and to track (`plan::select`; `force` asks again
/// for what is done).
pub(crate) fn plan_jobs(
    config: &Config,
    store: &mut dyn Store,
    iccids: &[Iccid],
    range: DateRange,
    force: bool,
) -> Result<plan::Selection> {
    let from = range.from - chrono::Days::new(u64::from(config.plan.lookback_days));
    let windows = plan::windows(from, range.to, config.plan.window_days)?;
    let jobs = plan::plan(
        &config.account_name,
        iccids,
        &windows,
        config.plan.chunk_size,
    );
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let earlier = store.job_statuses(&ids)?;
    let new_jobs = store.record_jobs(&jobs)?;
    // Lookback days before the range are re-pulled whatever their state: late usage replaces
    // earlier numbers.
    let mut selection = plan::select(jobs, &earlier, |job| force || job.window.start < range.from);
    let report = &mut selection.report;
    report.from = from.to_string();
    report.to = range.to.to_string();
    report.windows = windows.len() as u64;
    report.new_jobs = new_jobs;
    Ok(selection)
}

/// `tsusage callbacks register`: registers `callbacks.public_url` for `callbacks.service_name`.
pub async fn register_callback(config: &Config) -> Result<String> {
    let client = ApiClient::new(&config.api)?;
    crate::submit::registration::register_ours(&client, config).await?;
    client.logout().await;
    let c = &config.callbacks;
    Ok(format!(
        "registered {} for {} on account {}",
        c.public_url, c.service_name, config.account_name
    ))
}

/// `tsusage callbacks list`: one line per registered callback, `service<TAB>url` (none: no line).
pub async fn list_callbacks(config: &Config) -> Result<String> {
    let client = ApiClient::new(&config.api)?;
    let list = client.list_callbacks(&config.account_name).await?;
    client.logout().await;
    Ok(list
        .iter()
        .map(|c| format!("{}\t{}", c.service_name, c.url))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `tsusage callbacks delete`: removes the callback of `callbacks.service_name`.
pub async fn delete_callback(config: &Config) -> Result<String> {
    let client = ApiClient::new(&config.api)?;
    client
        .delete_callback(&config.account_name, &config.callbacks.service_name)
        .await?;
    client.logout().await;
    Ok(format!(
        "deleted the {} callback of account {}",
        config.callbacks.service_name, config.account_name
    ))
}

/// `tsusage status`: jobs by state, requests outstanding and overdue, the last run's outcome, and
/// with a range, each window's completeness.
pub fn status(config: &Config, range: Option<DateRange>) -> Result<String> {
    let store = crate::state::open(&config.state)?;
    Ok(crate::report::status(&*store, config, range)?)
}

/// `tsusage ingest DIR`: journals every callback file in `dir`, then writes what the journal holds
/// that the output does not.
pub fn ingest_dir(config: &Config, dir: &Path, keep_files: bool) -> Result<Outcome> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", dir.display())));
    }
    check_output(config)?;
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "ingest");
    let mut store = crate::state::open(&config.state)?;
    let _lock = store.lock(&run_id, "ingest")?;
    store.begin_run(&run_id, "ingest")?;
    let out = &config.output.dir;

    let mut intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
    let mut rejects =
        RecordRejects::new(rejects_dir(out).join(format!("{run_id}-callbacks.jsonl")));
    let options = DropDirOptions {
        keep_files,
        ..DropDirOptions::new(config)
    };
    let mut rows = publish::fresh_rows(config)?;
    // Archive files (an `output.dir/archive/` copied here, or that directory itself) are journaled
    // back with their original receipt times, and stay where they are.
    let archives = archive::archive_files_under(dir)?;
    if !archives.is_empty() {
        report.restored = Some(archive::restore(
            &archives,
            &mut intake,
            &mut *store,
            &mut rejects,
            Some(&mut rows),
        )?);
    }
    let progress = progress_bar("files");
    let dropped = drop_dir::collect(
        dir,
        options,
        &mut intake,
        &mut *store,
        &mut rejects,
        &progress,
        Some(&mut rows),
    );
    progress.finish_and_clear();
    report.drop_dir = Some(dropped?);
    report.rejects_files.extend(rejects.finish()?);
    tracing::info!(
        callbacks = intake.callbacks.received,
        new = intake.callbacks.journaled,
        "journaled"
    );

    report.output = Some(publish::publish(config, &mut *store, &run_id, Some(rows))?);
    report.callbacks = Some(intake.callbacks);
    report.records = Some(intake.records);
    conclude(report, &mut *store, &config.output)
}

/// With `output.url`, checks that the bucket answers and takes the credentials before a command
/// does any work (so a bad endpoint or key fails in seconds, not after the vendor was asked).
pub(crate) fn check_output(config: &Config) -> Result<()> {
    if let Some(bucket) = Bucket::open(&config.output)? {
        bucket.check()?;
        tracing::info!(url = %bucket.url(), "output on object storage");
    }
    Ok(())
}

pub(crate) fn rejects_dir(out: &Path) -> PathBuf {
    out.join("rejects")
}

/// A progress bar on a terminal; hidden when stderr is not one (logs say what happens instead).
pub(crate) fn progress_bar(unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let template = format!("{{spinner}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}] {{wide_bar}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
