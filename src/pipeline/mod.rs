//! The wiring: each command strings the stages together here, in the order of DESIGN §1.
//!
//! `validate`: ingest (CSV) → report.
//! `ingest DIR`: collect (drop dir) → journal → normalize → write (every pending partition) → report.
//! `submit`: ingest (CSV) → plan → record intent → authenticate → submit (requestIds recorded) → report.
//! `run`: the whole pipeline, in [`run`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::collect::Intake;
use crate::collect::archive;
use crate::collect::drop_dir::{self, DropDirOptions};
use crate::config::Config;
use crate::ingest::{self, Iccid, IngestOptions};
use crate::normalize::collapse::{Origin, PartitionRows, RowSet, usage_row};
use crate::normalize::payload::{CallbackKind, parse_callback};
use crate::normalize::{partition_key, partition_of};
use crate::plan::{self, DateRange};
use crate::report::{OutputReport, PartitionReport, RunReport, new_run_id};
use crate::state::{PendingPartition, Store, StoredCallback};
use crate::state::{StateWriter, job_status};
use crate::submit::{self, ApiClient, SubmitOptions};
use crate::write::parquet::{PartitionWriter, WriterOptions};
use crate::write::rejects::{IccidRejects, RecordRejects};
use crate::{Error, Result};

mod listen;
mod prune;
mod run;
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
pub(crate) fn conclude<S: Store + ?Sized>(
    mut report: RunReport,
    store: &mut S,
    out_dir: &Path,
) -> Result<Outcome> {
    report.finish();
    let report_path = report.save(out_dir)?;
    let json = serde_json::to_string(&report).unwrap_or_default();
    store.finish_run(&report.run_id, report.exit_code, &json)?;
    Ok(Outcome {
        report,
        report_path,
    })
}

/// Stage 1 for a run: the ICCID lists, with their rejects file and counts in `report`.
pub(crate) fn read_iccids(
    config: &Config,
    files: &[PathBuf],
    run_id: &str,
    report: &mut RunReport,
) -> Result<Vec<Iccid>> {
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
    report.rejects_files.extend(rejects.finish()?);
    Ok(list.iccids)
}

/// `tsusage submit`: asks ThingSpace for the usage of every ICCID over `range`, recording each
/// requestId; the callbacks are collected by `listen` or `ingest`.
pub async fn submit(config: &Config, range: DateRange) -> Result<Outcome> {
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "submit");
    let mut store = crate::state::open(&config.state)?;
    let _lock = store.lock(&run_id, "submit")?;
    store.begin_run(&run_id, "submit")?;
    let iccids = read_iccids(config, &config.input.paths, &run_id, &mut report)?;

    // The same days and the same job selection as `run` (plan::select): what is complete is not
    // asked again, `plan.lookback_days` are re-pulled before the range.
    let from = range.from - chrono::Days::new(u64::from(config.plan.lookback_days));
    let windows = plan::windows(from, range.to, config.plan.window_days)?;
    let jobs = plan::plan(
        &config.account_name,
        &iccids,
        &windows,
        config.plan.chunk_size,
    );
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let earlier = store.job_statuses(&ids)?;
    let new_jobs = store.record_jobs(&jobs)?;
    let plan::Selection {
        to_send: todo,
        report: mut plan_report,
        ..
    } = plan::select(jobs, &earlier, |job| job.window.start < range.from);
    plan_report.from = from.to_string();
    plan_report.to = range.to.to_string();
    plan_report.windows = windows.len() as u64;
    plan_report.new_jobs = new_jobs;
    report.plan = Some(plan_report);
    tracing::info!(jobs = todo.len(), "submitting");

    let client = Arc::new(ApiClient::new(&config.api)?);
    let options = SubmitOptions::new(&config.api, todo.len());
    if !todo.is_empty() {
        client.authenticate().await?;
    }
    let path = config.state.path.display().to_string();
    let writer = Arc::new(StateWriter::spawn(store, path));
    let submitted = submit::submit(client.clone(), writer.clone(), todo, &options).await;
    client.logout().await;
    let mut store = StateWriter::finish_shared(writer)?;
    report.submit = Some(submitted?);
    conclude(report, &mut store, &config.output.dir)
}

/// `tsusage callbacks register`: registers `callbacks.public_url` for `callbacks.service_name`.
pub async fn register_callback(config: &Config) -> Result<String> {
    let client = ApiClient::new(&config.api)?;
    register_ours(&client, config).await?;
    client.logout().await;
    let c = &config.callbacks;
    Ok(format!(
        "registered {} for {} on account {}",
        c.public_url, c.service_name, config.account_name
    ))
}

/// Registers `callbacks.public_url` for `callbacks.service_name`, with the callback credentials.
pub(crate) async fn register_ours(client: &ApiClient, config: &Config) -> Result<()> {
    let c = &config.callbacks;
    client
        .register_callback(
            &config.account_name,
            &c.service_name,
            &c.public_url,
            c.username.as_ref(),
            c.password.as_ref(),
        )
        .await?;
    Ok(())
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
    let mut lines = Vec::new();
    if let Some(range) = range {
        let from = format!("{}T00:00:00Z", range.from);
        let to = format!("{}T00:00:00Z", range.to + chrono::Days::new(1));
        let mut windows: std::collections::BTreeMap<(String, String), Vec<(String, u64)>> =
            Default::default();
        for (start, end, status, n) in store.window_status_counts(&from, &to)? {
            windows.entry((start, end)).or_default().push((status, n));
        }
        let planned_days = (range.to - range.from).num_days() + 1;
        lines.push(format!(
            "windows of {}..{} ({planned_days} days):",
            range.from, range.to
        ));
        let covered = |day: &str| {
            windows
                .keys()
                .any(|(start, end)| start.as_str() <= day && day < end.as_str())
        };
        let mut day = range.from;
        while day <= range.to {
            let text = format!("{day}T00:00:00Z");
            if !covered(&text) {
                lines.push(format!("  {day}: never requested"));
            }
            day = day + chrono::Days::new(1);
        }
        for ((start, end), statuses) in &windows {
            let total: u64 = statuses.iter().map(|(_, n)| n).sum();
            let complete = statuses
                .iter()
                .find(|(s, _)| s == job_status::COMPLETE)
                .map_or(0, |(_, n)| *n);
            let state = if complete == total {
                "complete"
            } else {
                "incomplete"
            };
            let detail: Vec<String> = statuses.iter().map(|(s, n)| format!("{n} {s}")).collect();
            lines.push(format!(
                "  {}..{}: {state} ({complete}/{total} jobs complete: {})",
                &start[..10.min(start.len())],
                &end[..10.min(end.len())],
                detail.join(", ")
            ));
        }
    }
    let counts = store.job_status_counts()?;
    let total: u64 = counts.values().sum();
    let by_state: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    lines.push(format!(
        "jobs: {total}{}{}",
        if by_state.is_empty() { "" } else { ": " },
        by_state.join(", ")
    ));
    let outstanding = store.outstanding_jobs()?;
    let deadline = chrono::Duration::seconds(
        i64::try_from(config.callbacks.deadline_secs).unwrap_or(i64::MAX),
    );
    let now = chrono::Utc::now();
    let overdue: Vec<&(String, String, String)> = outstanding
        .iter()
        .filter(|(_, _, at)| {
            chrono::DateTime::parse_from_rfc3339(at)
                .is_ok_and(|t| now.signed_duration_since(t) > deadline)
        })
        .collect();
    lines.push(format!(
        "requests outstanding: {} ({} overdue, past callbacks.deadline_secs = {})",
        outstanding.len(),
        overdue.len(),
        config.callbacks.deadline_secs
    ));
    for (job, window, at) in overdue.iter().take(20) {
        lines.push(format!(
            "  overdue: job {job} window {window} requested {at}"
        ));
    }
    match store.last_run()? {
        Some((run_id, command, finished, code)) => lines.push(format!(
            "last run: {run_id} ({command}) finished {finished}, exit code {code}; report: {}",
            config
                .output
                .dir
                .join("runs")
                .join(format!("{run_id}.json"))
                .display()
        )),
        None => lines.push("last run: none".into()),
    }
    Ok(lines.join("\n"))
}

/// `tsusage ingest DIR`: journals every callback file in `dir`, then writes what the journal holds
/// that the output does not.
pub fn ingest_dir(config: &Config, dir: &Path, keep_files: bool) -> Result<Outcome> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", dir.display())));
    }
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
        max_file_bytes: config.callbacks.max_file_bytes,
    };
    let mut rows = fresh_rows(config)?;
    // Archive files (an `output.dir/archive/` copied here, or that directory itself) are journaled
    // back with their original receipt times, and stay where they are.
    let archives = archive::archive_files_under(dir)?;
    if !archives.is_empty() {
        report.restored = Some(archive::restore(
            &archives,
            &mut intake,
            &mut store,
            &mut rejects,
            Some(&mut rows),
        )?);
    }
    let progress = progress_bar("files");
    let dropped = drop_dir::collect(
        dir,
        options,
        &mut intake,
        &mut store,
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

    report.output = Some(write_pending(config, &mut store, &run_id, Some(rows))?);
    report.callbacks = Some(intake.callbacks);
    report.records = Some(intake.records);
    conclude(report, &mut store, out)
}

/// Memory for usage rows while partitions are built; past it, rows are sorted and spilled to disk.
pub const ROW_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Where rows spill: beside the output, never inside `usage/`.
fn spill_dir(config: &Config) -> PathBuf {
    config.output.dir.join(".spill")
}

/// An empty set for the rows of the callbacks a command journals (left-overs of a crashed run are
/// removed: the command holds the run lock).
pub(crate) fn fresh_rows(config: &Config) -> Result<RowSet> {
    let dir = spill_dir(config);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&dir, e)),
    }
    Ok(RowSet::new(
        config.output.partition_by,
        Arc::from(config.account_name.as_str()),
        ROW_MEMORY_BYTES,
        &dir,
    ))
}

/// Rewrites every partition whose journal has callbacks newer than its last write (invariant 3: the
/// output is a function of the journal, so this can run at any time).
///
/// `fresh` holds the rows of the callbacks this command journaled. A partition whose every journaled
/// callback is among them is written from them directly; any other is rebuilt from the journal.
pub fn write_pending<S: Store + ?Sized>(
    config: &Config,
    store: &mut S,
    run_id: &str,
    mut fresh: Option<RowSet>,
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
    // Partitions whose every journaled callback this command holds the rows of are written from
    // them; the others are rebuilt from the journal (each writer thread with its own connection).
    let mut plan = std::collections::VecDeque::new();
    for pending in store.pending_partitions()? {
        // A partition whose older callbacks are archived is rebuilt from its archive and journal.
        let archives = store.partition_archives(&pending.partition)?;
        let mine = match fresh.as_mut().and_then(|f| f.take(&pending.partition)) {
            Some(part)
                if archives.is_empty()
                    && part.origins
                        == store.partition_callbacks(&pending.partition, pending.through_id)? =>
            {
                Some(part)
            }
            _ => None,
        };
        plan.push_back((pending, mine, archives));
    }
    let fresh_origins = fresh.as_ref().map_or(&[][..], RowSet::origins);
    let plan = std::sync::Mutex::new(plan);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut output = OutputReport::default();
    std::thread::scope(|scope| -> Result<()> {
        // Two partitions at a time: one's fsyncs and renames overlap the other's encoding.
        let (done_tx, done) = std::sync::mpsc::channel::<Result<PartitionDone>>();
        for _ in 0..PARTITION_WRITERS {
            let done_tx = done_tx.clone();
            let (plan, stop, writer) = (&plan, &stop, &writer);
            scope.spawn(move || {
                let mut reader = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let next = plan.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some((pending, mine, archives)) = next else {
                        break;
                    };
                    let result = write_partition(
                        config,
                        writer,
                        &mut reader,
                        (pending, mine, archives),
                        fresh_origins,
                    );
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let mut first_error = None;
        for result in done {
            match result {
                Ok(p) => {
                    store.mark_written(
                        &p.partition,
                        p.through_id,
                        p.written.rows,
                        p.written.files,
                        run_id,
                    )?;
                    tracing::info!(
                        partition = p.partition,
                        rows = p.written.rows,
                        files = p.written.files,
                        rebuilt = p.rebuilt,
                        "partition written"
                    );
                    output.rows_written += p.written.rows;
                    output.files_written += p.written.files;
                    output.collapsed += p.collapsed;
                    output.partitions.push(PartitionReport {
                        partition: p.partition,
                        rows: p.written.rows,
                        files: p.written.files,
                        records_in: p.records_in,
                        collapsed: p.collapsed,
                    });
                }
                Err(e) => {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    output
        .partitions
        .sort_by(|a, b| a.partition.cmp(&b.partition));
    let _ = std::fs::remove_dir_all(spill_dir(config));
    Ok(output)
}

/// Partitions written at the same time.
const PARTITION_WRITERS: usize = 2;

/// A partition written and published, to be recorded in the store.
struct PartitionDone {
    partition: String,
    through_id: i64,
    written: crate::write::parquet::Written,
    records_in: u64,
    collapsed: u64,
    rebuilt: bool,
}

/// A partition to write: what is pending, this command's rows of it if they are all of it, and the
/// archive files holding its older callbacks.
type PartitionPlan = (PendingPartition, Option<PartitionRows>, Vec<String>);

/// Writes one partition: from this command's rows (`mine`) or rebuilt from its archive files and the
/// journal through `reader` (opened on first use).
fn write_partition(
    config: &Config,
    writer: &PartitionWriter,
    reader: &mut Option<Box<dyn Store + Send>>,
    (pending, mine, archives): PartitionPlan,
    fresh_origins: &[Origin],
) -> Result<PartitionDone> {
    let (part, rebuilt) = match mine {
        Some(part) => (part, None),
        None => {
            let store = match reader {
                Some(store) => store,
                None => reader.insert(crate::state::open(&config.state)?),
            };
            let mut set = rebuild(
                config,
                &*store,
                &pending.partition,
                pending.through_id,
                &archives,
            )?;
            let part = set
                .take(&pending.partition)
                .unwrap_or_else(|| PartitionRows::empty(&pending.partition));
            (part, Some(set))
        }
    };
    let origins = rebuilt.as_ref().map_or(fresh_origins, RowSet::origins);
    let records_in = part.records_in;
    let mut merged = part.collapsed()?;
    let written = writer.write_rows(
        &pending.partition,
        merged.by_ref().map(|row| {
            row.and_then(|row| {
                usage_row(&row, origins).ok_or_else(|| crate::write::WriteError::Parquet {
                    path: config.output.dir.clone(),
                    message: "a row without its callback".into(),
                })
            })
        }),
    )?;
    Ok(PartitionDone {
        partition: pending.partition,
        through_id: pending.through_id,
        written,
        records_in,
        collapsed: merged.collapsed,
        rebuilt: rebuilt.is_some(),
    })
}

/// The rows of `partition` from its archived callbacks (in `archives`) and every journaled callback
/// with id ≤ `through_id`, all oldest received first (ties by journal id), so that the newest wins
/// when collapsed.
fn rebuild<S: Store + ?Sized>(
    config: &Config,
    store: &S,
    partition: &str,
    through_id: i64,
    archives: &[String],
) -> Result<RowSet> {
    let by = config.output.partition_by;
    let strict = config.input.strict_luhn;
    // Each writer thread rebuilds one partition at a time: the budget is shared between them.
    let mut set = RowSet::new(
        by,
        Arc::from(config.account_name.as_str()),
        ROW_MEMORY_BYTES / PARTITION_WRITERS,
        &spill_dir(config),
    );
    // Whether a partition key is this partition's, for the last key seen (records come in runs).
    let mut last: Option<(i64, bool)> = None;
    let mut add = |set: &mut RowSet, cb: StoredCallback| -> Result<()> {
        let Ok(parsed) = parse_callback(&cb.body) else {
            return Ok(());
        };
        let CallbackKind::Usage(records) = &parsed.kind else {
            return Ok(());
        };
        let origin = set.add_origin(
            &parsed.request_id,
            cb.account_name.as_deref(),
            cb.received_at,
        );
        for r in records.parsed(strict).flatten() {
            let key = partition_key(r.usage_start, by);
            let mine = match last {
                Some((k, mine)) if k == key => mine,
                _ => {
                    let mine = partition_of(r.usage_start, by) == partition;
                    last = Some((key, mine));
                    mine
                }
            };
            if mine {
                set.push(origin, &r)?;
            }
        }
        Ok(())
    };
    let mut archived = archived_callbacks(config, partition, archives)?
        .into_iter()
        .peekable();
    store.callbacks_for_partition(partition, through_id, &mut |cb| {
        while let Some(older) =
            archived.next_if(|a| (a.received_at, a.id) < (cb.received_at, cb.id))
        {
            add(&mut set, older.stored()?)?;
        }
        add(&mut set, cb)
    })?;
    for older in archived {
        add(&mut set, older.stored()?)?;
    }
    Ok(set)
}

/// An archived callback of a partition being rebuilt, its body compressed while it waits its turn.
struct Archived {
    id: i64,
    received_at: i64,
    request_id: String,
    account_name: Option<String>,
    body: Vec<u8>,
    encoding: &'static str,
}

impl Archived {
    fn stored(self) -> Result<StoredCallback> {
        let text = if self.encoding == "zstd" {
            zstd::stream::decode_all(self.body.as_slice())
                .map_err(|e| Error::io(ARCHIVE_MEMORY, e))?
        } else {
            self.body
        };
        Ok(StoredCallback {
            id: self.id,
            request_id: self.request_id,
            received_at: self.received_at,
            body: String::from_utf8(text)
                .map_err(|e| Error::io(ARCHIVE_MEMORY, std::io::Error::other(e)))?,
            account_name: self.account_name,
        })
    }
}

/// Names the in-memory copy of archived bodies in errors.
const ARCHIVE_MEMORY: &str = "(archived callbacks in memory)";

/// The archived callbacks of `partition` in `archives`, oldest received first.
fn archived_callbacks(
    config: &Config,
    partition: &str,
    archives: &[String],
) -> Result<Vec<Archived>> {
    let root = archive::archive_dir(&config.output.dir);
    let mut out = Vec::new();
    for file in archives {
        archive::read(&root.join(file), &mut |cb| {
            if cb.partitions.iter().any(|p| p == partition) {
                let (body, encoding) = crate::state::encode_body(&cb.body);
                out.push(Archived {
                    id: cb.id,
                    received_at: cb.received_at,
                    request_id: cb.request_id,
                    account_name: cb.account_name,
                    body,
                    encoding,
                });
            }
            Ok(())
        })?;
    }
    out.sort_by_key(|a| (a.received_at, a.id));
    Ok(out)
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
