//! `tsusage run`: ingest → plan → submit → collect → normalize → write → report, in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Outcome, conclude, fresh_rows, read_iccids, rejects_dir, simulate, write_pending};
use crate::collect::drop_dir::{self, DropDirOptions};
use crate::collect::http_listener::{self, ListenerHandle, ListenerState};
use crate::collect::tracker::{CompletenessRow, JobState, Tracker};
use crate::collect::{CallbackStats, Intake};
use crate::config::{CallbackSource, Config};
use crate::normalize::RecordStats;
use crate::plan::{self, DateRange, Job};
use crate::report::{CollectReport, RunReport, new_run_id};
use crate::state::{JobUpdate, RunLock, SqliteStore, StateError, StateWriter, Store};
use crate::submit::{self, ApiClient, SubmitError, SubmitOptions, SubmitReport};
use crate::write::rejects::RecordRejects;
use crate::write::write_atomic_with;
use crate::{Error, Result};

/// How often the run looks at the journal and the clock.
const TICK: Duration = Duration::from_millis(200);
/// How long in-flight callbacks get to finish when the listener stops.
const LISTENER_GRACE: Duration = Duration::from_secs(10);
/// Journal rows read per look.
const JOURNAL_PAGE: usize = 10_000;

/// What `tsusage run` is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub range: DateRange,
    /// Against the built-in simulator, in-process.
    pub simulate: bool,
    /// Ask again for windows already complete.
    pub force: bool,
}

impl RunOptions {
    pub fn new(range: DateRange) -> Self {
        RunOptions {
            range,
            simulate: false,
            force: false,
        }
    }

    pub fn simulated(range: DateRange) -> Self {
        RunOptions {
            simulate: true,
            ..RunOptions::new(range)
        }
    }
}

/// `tsusage run`: the whole pipeline for a date range, resumable (see [`RunOptions`]).
pub async fn run(config: &Config, options: RunOptions) -> Result<Outcome> {
    let mut config = config.clone();
    let sim = if options.simulate {
        Some(simulate::start(&mut config).await?)
    } else {
        None
    };
    let result = run_inner(&mut config, options).await;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    result
}

async fn run_inner(config: &mut Config, options: RunOptions) -> Result<Outcome> {
    let range = options.range;
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "run");
    let state_path = config.state.path.clone();
    let _lock = RunLock::acquire(&state_path, &run_id, "run")?;
    let mut store = SqliteStore::open(&state_path)?;
    store.begin_run(&run_id, "run")?;

    // 1. ingest
    let iccids = read_iccids(config, &config.input.paths.clone(), &run_id, &mut report)?;

    // 2. plan: jobs recorded as intent. Windows already complete are not asked again, except with
    // --force and for the plan.lookback_days re-pulled before the range (late usage replaces
    // earlier numbers).
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
        to_send,
        tracked,
        report: mut plan_report,
    } = plan::select(jobs, &earlier, |job| {
        options.force || job.window.start < range.from
    });
    plan_report.from = from.to_string();
    plan_report.to = range.to.to_string();
    plan_report.windows = windows.len() as u64;
    plan_report.new_jobs = new_jobs;
    report.plan = Some(plan_report);
    let c = &config.callbacks;
    let mut tracker = Tracker::new(
        tracked,
        config.input.strict_luhn,
        Duration::from_secs(c.settle_secs),
        Duration::from_secs(c.deadline_secs),
        c.max_resubmits,
    );

    // 3. collect: the listener is up before the first request goes out.
    let path = state_path.display().to_string();
    // The writer keeps the rows of what it journals: partitions only this run fed are written from
    // them, without parsing the callbacks again.
    let writer = Arc::new(StateWriter::spawn_with_rows(
        store,
        path,
        Some(fresh_rows(config)?),
    ));
    let intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
    let listening = match config.callbacks.source {
        CallbackSource::Listener => {
            let rejects = RecordRejects::new(
                rejects_dir(&config.output.dir).join(format!("{run_id}-callbacks.jsonl")),
            );
            let state = Arc::new(ListenerState::new(
                &config.callbacks,
                writer.clone(),
                intake,
                rejects,
            )?);
            let handle = http_listener::start(&config.callbacks, state.clone()).await?;
            if config.callbacks.listen_addr.port() == 0 {
                // --simulate: tell the vendor the port we got.
                config.callbacks.public_url = format!(
                    "http://{}{}",
                    handle.addr,
                    http_listener::listen_path(&config.callbacks.public_url)?
                );
            }
            Some((state, handle))
        }
        CallbackSource::External | CallbackSource::DropDir => None,
    };

    // 4. submit, while collecting.
    let outcome = submit_and_collect(config, &run_id, &writer, &mut tracker, to_send).await;
    tracing::info!(
        complete = tracker.stats.complete,
        "collection over; writing the partitions"
    );
    let (listener_state, listener_counts) = match listening {
        Some((state, handle)) => {
            stop_listener(handle).await;
            let counts = state
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            (Some(state), Some(counts))
        }
        None => (None, None),
    };
    let (submitted, drop_stats, drop_rejects_file) = match outcome {
        Ok(done) => done,
        Err(e) => {
            drop(listener_state);
            let _ = StateWriter::finish_shared(writer);
            return Err(e);
        }
    };
    tracker.finish();
    let mut updates = Vec::new();
    for (job_id, state) in tracker.job_states() {
        let update = match state {
            JobState::Complete => JobUpdate::Completed {
                job_id: job_id.to_owned(),
            },
            JobState::Missing => JobUpdate::Missing {
                job_id: job_id.to_owned(),
                error: "no completion callback by the deadline after every re-request".into(),
            },
            JobState::Failed(why) => JobUpdate::Failed {
                job_id: job_id.to_owned(),
                attempts: 0,
                error: why.clone(),
            },
            JobState::NotSubmitted(_) | JobState::Waiting => continue,
        };
        updates.push(update);
    }
    writer.apply_all(updates).await?;
    let (callback_stats, record_stats, listener_rejects) = match listener_state {
        Some(state) => {
            let intake = state.intake.lock().unwrap_or_else(|e| e.into_inner());
            let rejects = state.finish_rejects()?;
            let mut callbacks = intake.callbacks.clone();
            if let Some(counts) = &listener_counts {
                callbacks.journaled = counts.journaled;
                callbacks.already_journaled = counts.already_journaled;
            }
            callbacks.unmatched = tracker.stats.unmatched_callbacks;
            (callbacks, intake.records.clone(), rejects)
        }
        None => (drop_stats.0, drop_stats.1, None),
    };
    let (mut store, rows) = StateWriter::finish_shared_with_rows(writer)?;

    // 5-6. normalize and write every partition the journal has news for.
    report.output = Some(write_pending(config, &mut store, &run_id, rows)?);
    // Retention: what this store no longer needs to hold moves to the archive.
    if config.state.retain_days > 0 {
        let horizon = super::prune::retention_horizon(config.state.retain_days);
        report.prune = Some(super::prune::prune_store(
            config, &mut store, horizon, &run_id,
        )?);
    }

    // The report: rejects, completeness, counts.
    report.rejects_files.extend(listener_rejects);
    report.rejects_files.extend(drop_rejects_file);
    let (counts, mut rows) = tracker.completeness();
    let mut completeness: BTreeMap<String, u64> =
        counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let input_rejects = iccid_rejects(&report.rejects_files)?;
    if !input_rejects.is_empty() {
        completeness.insert("rejected_input".into(), input_rejects.len() as u64);
        rows.extend(
            input_rejects
                .into_iter()
                .map(|(raw, reason)| CompletenessRow {
                    iccid: raw,
                    window_start: range.from.to_string(),
                    window_end: (range.to + chrono::Days::new(1)).to_string(),
                    state: crate::collect::tracker::PairState::Rejected,
                    reason: format!("rejected input: {reason}"),
                    job_id: String::new(),
                    request_ids: String::new(),
                }),
        );
    }
    let completeness_file = config
        .output
        .dir
        .join("runs")
        .join(format!("{run_id}-completeness.csv"));
    write_completeness(&completeness_file, &rows)?;
    report.collect = Some(CollectReport {
        tracking: tracker.stats.clone(),
        completeness,
        completeness_file,
    });
    report.listener = listener_counts;
    report.submit = Some(submitted);
    report.callbacks = Some(callback_stats);
    report.records = Some(record_stats);
    conclude(report, &mut store, &config.output.dir)
}

/// Submits `to_send` and collects until every tracked job has ended (complete, failed, missing) or
/// cannot be sent; re-requests overdue jobs. Returns the merged submission report, and, for
/// `source = "drop_dir"`, what the drop directory gave.
async fn submit_and_collect<S: Store + Send + 'static>(
    config: &Config,
    run_id: &str,
    writer: &Arc<StateWriter<S>>,
    tracker: &mut Tracker,
    to_send: Vec<Job>,
) -> Result<(SubmitReport, (CallbackStats, RecordStats), Option<PathBuf>)> {
    let client = Arc::new(ApiClient::new(&config.api)?);
    let needs_api = !to_send.is_empty() || tracker.waiting() > 0;
    if needs_api {
        client.authenticate().await?;
        if config.callbacks.source != CallbackSource::DropDir {
            ensure_callback_registered(&client, config).await?;
        }
    }
    // What concerns this run, and nothing older (invariant 7): the requests earlier runs recorded
    // for its jobs and their callbacks up to `callback_cursor`, then everything journaled after it.
    // The cursor is taken before anything is sent, so no callback of this run's requests is below it.
    let reader = SqliteStore::open(&config.state.path)?;
    let mut callback_cursor = reader.journal_high_water()?;
    let now = Instant::now();
    let job_ids: Vec<&str> = tracker.job_ids().collect();
    let earlier = reader.requests_of_jobs(&job_ids)?;
    drop(job_ids);
    for (request_id, job_id) in &earlier {
        tracker.request_recorded(request_id.clone(), job_id, now);
    }
    let request_ids: Vec<&str> = earlier.iter().map(|(r, _)| r.as_str()).collect();
    reader.callbacks_of_requests(&request_ids, callback_cursor, &mut |_, request_id, body| {
        tracker.callback(request_id, body, now)
    })?;
    drop(request_ids);

    // The submission tells the collector each requestId once it is durable, and every one before
    // it returns: when a submission has ended, what it recorded is in `recorded`.
    let (recorded_tx, mut recorded) = tokio::sync::mpsc::unbounded_channel();
    let progress = crate::progress::RunProgress::new(tracker.stats.jobs);
    let mut submissions: JoinSet<std::result::Result<SubmitReport, SubmitError>> = JoinSet::new();
    let spawn = |submissions: &mut JoinSet<_>, jobs: Vec<Job>| {
        if jobs.is_empty() {
            return;
        }
        let mut options = SubmitOptions::new(&config.api, jobs.len());
        options.recorded = Some(recorded_tx.clone());
        options.progress = Some(progress.gauge());
        let (client, writer) = (client.clone(), writer.clone());
        submissions.spawn(async move { submit::submit(client, writer, jobs, &options).await });
    };
    spawn(&mut submissions, to_send);

    let mut drop_store = match config.callbacks.source {
        CallbackSource::DropDir => Some(SqliteStore::open(&config.state.path)?),
        _ => None,
    };
    let mut drop_intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
    let mut drop_rejects =
        RecordRejects::new(rejects_dir(&config.output.dir).join(format!("{run_id}-dropdir.jsonl")));
    let mut merged = SubmitReport::default();
    let mut last_log = Instant::now();
    loop {
        let now = Instant::now();
        if let Some(store) = drop_store.as_mut() {
            let options = DropDirOptions {
                keep_files: false,
                max_file_bytes: config.callbacks.max_file_bytes,
            };
            let hidden = indicatif::ProgressBar::hidden();
            drop_dir::collect(
                &config.callbacks.drop_dir,
                options,
                &mut drop_intake,
                store,
                &mut drop_rejects,
                &hidden,
                None,
            )?;
        }
        // Ended submissions first, then the requestIds: every id an ended submission recorded is
        // then known to the tracker (invariant 8), whatever the timing of the tasks.
        let mut ended = Vec::new();
        while let Some(joined) = submissions.try_join_next() {
            ended.push(joined.map_err(|e| {
                Error::State(StateError::Invalid {
                    path: config.state.path.display().to_string(),
                    message: format!("the submission task failed: {e}"),
                })
            })??);
        }
        while let Ok((job_id, request_id)) = recorded.try_recv() {
            tracker.request_recorded(request_id, &job_id, now);
        }
        loop {
            let page = reader.callbacks_since(callback_cursor, JOURNAL_PAGE)?;
            let full = page.len() == JOURNAL_PAGE;
            for (id, request_id, _kind, body) in page {
                callback_cursor = id;
                tracker.callback(request_id, body, now);
            }
            if !full {
                break;
            }
        }
        crate::failpoint::pause_async(crate::failpoint::COLLECT_LOOK).await;
        for done in ended {
            for failure in &done.failures {
                tracker.refused(
                    &failure.job_id,
                    format!("{}: {}", failure.error_code, failure.error_message),
                );
            }
            for (job_id, why) in &done.unsent {
                tracker.not_submitted(job_id, why.clone());
            }
            merge(&mut merged, done);
        }
        let resubmit = tracker.tick(now);
        if !resubmit.is_empty() {
            tracing::info!(jobs = resubmit.len(), "re-requesting overdue jobs");
            spawn(&mut submissions, resubmit);
        }
        let s = &tracker.stats;
        progress.update(s);
        if progress.is_hidden() && last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(
                jobs = s.jobs,
                complete = s.complete,
                waiting = tracker.waiting(),
                callbacks = s.callbacks,
                resubmitted = s.resubmitted,
                "collecting"
            );
        }
        // Nothing is being sent, every requestId sent is tracked, and no job waits for a callback
        // (a job still waiting without a requestId was not sent: nothing will come for it).
        if submissions.is_empty() && tracker.waiting() == tracker.unsent() {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    // Unmatched: journaled during this run, for no request the store knows (an earlier night's
    // late redelivery is not unmatched).
    let parked: Vec<(&str, usize)> = tracker.parked().collect();
    let ids: Vec<&str> = parked.iter().map(|(id, _)| *id).collect();
    let known = reader.request_accounts(&ids)?;
    let unmatched = parked
        .iter()
        .filter(|(id, _)| !known.contains_key(*id))
        .map(|(_, n)| *n as u64)
        .sum();
    tracker.stats.unmatched_callbacks = unmatched;
    progress.finish_and_clear();
    if needs_api {
        client.logout().await;
    }
    let drop_rejects_file = drop_rejects.finish()?;
    Ok((
        merged,
        (drop_intake.callbacks, drop_intake.records),
        drop_rejects_file,
    ))
}

/// Lists the account's callbacks; registers ours if absent; warns when another URL is registered.
async fn ensure_callback_registered(client: &ApiClient, config: &Config) -> Result<()> {
    let c = &config.callbacks;
    let registered = client.list_callbacks(&config.account_name).await?;
    match registered.iter().find(|r| r.service_name == c.service_name) {
        Some(r) if r.url == c.public_url => Ok(()),
        Some(r) => {
            tracing::warn!(
                registered = r.url,
                configured = c.public_url,
                "the account's {} callback goes to another URL than callbacks.public_url; \
                 run `tsusage callbacks register` to change it",
                c.service_name
            );
            Ok(())
        }
        None => {
            tracing::info!(
                url = c.public_url,
                service = c.service_name,
                "registering the callback URL"
            );
            super::register_ours(client, config).await
        }
    }
}

async fn stop_listener(handle: ListenerHandle) {
    handle.shutdown(LISTENER_GRACE).await;
}

fn merge(into: &mut SubmitReport, from: SubmitReport) {
    into.jobs += from.jobs;
    into.submitted += from.submitted;
    into.failed += from.failed;
    into.not_submitted += from.not_submitted;
    into.attempts += from.attempts;
    into.retries += from.retries;
    into.throttled += from.throttled;
    into.server_errors += from.server_errors;
    into.transport_errors += from.transport_errors;
    into.reauthentications = into.reauthentications.max(from.reauthentications);
    into.logins = into.logins.max(from.logins);
    into.oauth_tokens = into.oauth_tokens.max(from.oauth_tokens);
    into.retry_budget += from.retry_budget;
    into.stopped = into.stopped.take().or(from.stopped);
    into.max_in_flight = into.max_in_flight.max(from.max_in_flight);
    into.elapsed_secs += from.elapsed_secs;
    into.achieved_rate_per_sec = if into.elapsed_secs > 0.0 {
        into.attempts as f64 / into.elapsed_secs
    } else {
        0.0
    };
    into.failures.extend(from.failures);
    into.sent_per_second.extend(from.sent_per_second);
    into.unsent.extend(from.unsent);
}

/// The rows of this run's ICCID rejects file: `(raw value, reason)`.
fn iccid_rejects(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for path in files
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("-iccids.csv"))
    {
        let mut reader =
            csv::Reader::from_path(path).map_err(|e| crate::write::WriteError::csv(path, e))?;
        for record in reader.records().flatten() {
            out.push((
                record.get(2).unwrap_or_default().to_owned(),
                record.get(3).unwrap_or_default().to_owned(),
            ));
        }
    }
    Ok(out)
}

fn write_completeness(path: &Path, rows: &[CompletenessRow]) -> Result<()> {
    // Streamed to the file: a run over millions of ICCID-days has hundreds of thousands of rows.
    write_atomic_with(path, |file| {
        let mut out = csv::Writer::from_writer(file);
        out.write_record([
            "iccid",
            "window_start",
            "window_end",
            "state",
            "reason",
            "job_id",
            "request_ids",
        ])?;
        for r in rows {
            out.write_record([
                r.iccid.as_str(),
                &r.window_start,
                &r.window_end,
                r.state.name(),
                &r.reason,
                &r.job_id,
                &r.request_ids,
            ])?;
        }
        out.flush()
    })?;
    Ok(())
}
