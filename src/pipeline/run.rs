//! `tsusage run`: ingest → plan → submit → collect → normalize → write → report, in one place.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Outcome, conclude, read_iccids, simulate};
use crate::collect::http_listener;
use crate::collect::source::CallbackSource;
use crate::collect::tracker::Tracker;
use crate::config::{CallbackSource as SourceKind, Config};
use crate::plan::{self, DateRange, Job};
use crate::report::{CollectReport, RunReport, new_run_id};
use crate::state::{StateError, StateWriter, Store};
use crate::submit::{self, ApiClient, SubmitError, SubmitOptions, SubmitReport};
use crate::{Error, Result};

/// How often the run looks at the journal and the clock.
const TICK: Duration = Duration::from_millis(200);
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
    let mut store = crate::state::open(&config.state)?;
    let _lock = store.lock(&run_id, "run")?;
    store.begin_run(&run_id, "run")?;

    // 1. ingest
    let (iccids, input_rejects) =
        read_iccids(config, &config.input.paths.clone(), &run_id, &mut report)?;

    // 2. plan: jobs recorded as intent; what is done is not asked again (plan::select).
    let force = options.force;
    let plan::Selection {
        to_send,
        tracked,
        report: plan_report,
    } = super::plan_jobs(config, &mut *store, &iccids, range, force)?;
    report.plan = Some(plan_report);
    let mut tracker = Tracker::for_run(tracked, config);

    // 3. collect: the listener is up before the first request goes out.
    let path = config.state.name();
    // The writer keeps the rows of what it journals: partitions only this run fed are written from
    // them, without parsing the callbacks again.
    let writer = Arc::new(StateWriter::spawn_with_rows(
        store,
        path,
        Some(crate::write::publish::fresh_rows(config)?),
    ));
    let mut source = crate::collect::source::open(config, &run_id, &writer).await?;
    if let Some(addr) = source.bound_addr()
        && config.callbacks.listen_addr.port() == 0
    {
        // --simulate: tell the vendor the port we got.
        config.callbacks.public_url = format!(
            "http://{addr}{}",
            http_listener::listen_path(&config.callbacks.public_url)?
        );
    }

    // 4. submit, while collecting.
    let outcome = submit_and_collect(config, &writer, &mut tracker, to_send, &mut *source).await;
    tracing::info!(
        complete = tracker.stats.complete,
        "collection over; writing the partitions"
    );
    let collected = source.finish().await;
    let submitted = match (outcome, collected) {
        (Ok(submitted), Ok(collected)) => {
            report.collected(collected, tracker.stats.unmatched_callbacks);
            submitted
        }
        (Err(e), _) | (_, Err(e)) => {
            let _ = StateWriter::finish_shared(writer);
            return Err(e);
        }
    };
    tracker.finish();
    writer.apply_all(tracker.job_updates()).await?;
    let (mut store, rows) = StateWriter::finish_shared_with_rows(writer)?;

    // 5-6. normalize and write every partition the journal has news for.
    report.output = Some(crate::write::publish::publish(
        config, &mut store, &run_id, rows,
    )?);
    // Retention: what this store no longer needs to hold moves to the archive.
    if config.state.retain_days > 0 {
        let horizon = super::prune::retention_horizon(config.state.retain_days);
        report.prune = Some(super::prune::prune_store(
            config, &mut store, horizon, &run_id,
        )?);
    }

    // The report: completeness, counts.
    let (completeness, rows) = tracker.completeness(&input_rejects, range);
    let completeness_file =
        crate::write::completeness::write_for_run(&config.output.dir, &run_id, &rows)?;
    report.collect = Some(CollectReport {
        tracking: tracker.stats.clone(),
        completeness,
        completeness_file,
    });
    report.submit = Some(submitted);
    conclude(report, &mut store, &config.output.dir)
}

/// Submits `to_send` and collects from `source` until every tracked job has ended (complete, failed,
/// missing) or cannot be sent; re-requests overdue jobs. Returns the merged submission report.
async fn submit_and_collect<S: Store + Send + 'static>(
    config: &Config,
    writer: &Arc<StateWriter<S>>,
    tracker: &mut Tracker,
    to_send: Vec<Job>,
    source: &mut dyn CallbackSource,
) -> Result<SubmitReport> {
    let client = Arc::new(ApiClient::new(&config.api)?);
    let needs_api = !to_send.is_empty() || tracker.waiting() > 0;
    if needs_api {
        client.authenticate().await?;
        if config.callbacks.source != SourceKind::DropDir {
            ensure_callback_registered(&client, config).await?;
        }
    }
    // What concerns this run, and nothing older (invariant 7): the requests earlier runs recorded
    // for its jobs and their callbacks up to `callback_cursor`, then everything journaled after it.
    // The cursor is taken before anything is sent, so no callback of this run's requests is below it.
    let reader = crate::state::open(&config.state)?;
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
        options.progress = Some(progress.gauge());
        let (client, writer) = (client.clone(), writer.clone());
        submissions.spawn(async move { submit::submit(client, writer, jobs, &options).await });
    };
    spawn(&mut submissions, to_send);

    let mut merged = SubmitReport::default();
    let mut last_log = Instant::now();
    loop {
        let now = Instant::now();
        source.poll()?;
        // Ended submissions first, then the requestIds: every id an ended submission recorded is
        // then known to the tracker (invariant 8), whatever the timing of the tasks.
        let mut ended = Vec::new();
        while let Some(joined) = submissions.try_join_next() {
            ended.push(joined.map_err(|e| {
                Error::State(StateError::Invalid {
                    path: config.state.name(),
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
            merged += done;
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
    Ok(merged)
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
