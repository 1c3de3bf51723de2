//! A run's collection: submits the jobs to send and collects their callbacks from the source until
//! every tracked job has ended (complete, failed, missing) or cannot be sent, re-requesting overdue
//! ones (stages 3 and 4 of the flow in docs/architecture.md). Wiring, not a stage: it drives
//! [`crate::submit`] and [`crate::collect`] together, each of which knows nothing of the other.
//!
//! Each look, in this order: the source is polled for what the callbacks it journaled since the
//! last look say; ended submissions are taken; the requestIds recorded so far are handed to the
//! tracker; then what the source heard. Collection stops only on durable facts: nothing is being
//! sent, every requestId sent is tracked, and no job still waits for a callback.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::progress::RunProgress;
use crate::Result;
use crate::collect::Writer;
use crate::collect::claims::{CLAIM_RETRY, Claims, Next};
use crate::collect::http_listener;
use crate::collect::source::{self, CallbackSource, SourceReport};
use crate::collect::tracker::Tracker;
use crate::config::{CallbackSource as SourceKind, Config};
use crate::plan::Job;
use crate::state::{AsyncStore, StateError};
use crate::submit::{self, ApiClient, SubmitError, SubmitOptions, SubmitReport};

/// How often the run looks at the journal and the clock.
const TICK: Duration = Duration::from_millis(200);

/// How a run shares its work with other processes on the same store.
#[derive(Debug)]
pub struct Sharing {
    /// The worker's claims on the range's jobs; the tracker starts empty and takes each batch.
    pub claims: Claims,
    /// The account's request budget in the store.
    pub budget: Arc<submit::budget::SharedBudget>,
}

/// Opens the callback source `callbacks.source` names, submits `to_send` and collects until every
/// tracked job has ended or cannot be sent, then stops the source and records how each job ended.
/// Returns what the submissions and the source report.
///
/// With `sharing` (a store several workers share), the jobs come from claims instead: batch after
/// batch, each sent or tracked, its outcomes recorded and its claims released, until no job of
/// the range is left to anyone.
pub async fn collect(
    config: &Config,
    run_id: &str,
    writer: &Arc<Writer>,
    tracker: &mut Tracker,
    to_send: Vec<Job>,
    mut sharing: Option<&mut Sharing>,
) -> Result<(SubmitReport, SourceReport)> {
    // What concerns this run, and nothing older (docs/architecture.md, invariant 7): the journal's
    // high-water mark is taken before anything is sent, so no callback of this run's requests is
    // below it.
    let name = config.state.name();
    let reader = AsyncStore::new(crate::state::open(&config.state)?, name);
    let cursor = reader.call(|s| s.journal_high_water()).await?;
    let job_ids: Vec<String> = tracker.job_ids().map(str::to_owned).collect();
    read_earlier(&reader, tracker, cursor, job_ids).await?;
    // The source is up before the first request goes out.
    let mut source = source::open(config, run_id, writer, &reader, cursor).await?;
    let mut config = Cow::Borrowed(config);
    if let Some(addr) = source.bound_addr()
        && config.callbacks.listen_addr.port() == 0
    {
        // --simulate: tell the vendor the port we got.
        let path = http_listener::listen_path(&config.callbacks.public_url)?;
        config.to_mut().callbacks.public_url = format!("http://{addr}{path}");
    }
    let outcome = submit_and_collect(
        &config,
        writer,
        tracker,
        to_send,
        &mut *source,
        (&reader, cursor),
        sharing.as_deref_mut(),
    )
    .await;
    let outcome = match outcome {
        Ok(submitted) => count_unmatched(&reader, tracker).await.map(|()| submitted),
        Err(e) => Err(e),
    };
    tracing::info!(
        complete = tracker.stats.complete,
        "collection over; writing the partitions"
    );
    let collected = source.finish().await;
    let (submitted, collected) = (outcome?, collected?);
    tracker.finish();
    writer.apply_all(tracker.job_updates()).await?;
    if let Some(sharing) = sharing {
        sharing.claims.release().await?;
    }
    Ok((submitted, collected))
}

/// Submits `to_send` and collects from `source` until every tracked job has ended or cannot be
/// sent; re-requests overdue jobs. Returns the merged submission report.
async fn submit_and_collect(
    config: &Config,
    writer: &Arc<Writer>,
    tracker: &mut Tracker,
    to_send: Vec<Job>,
    source: &mut dyn CallbackSource,
    (reader, cursor): (&AsyncStore, i64),
    mut sharing: Option<&mut Sharing>,
) -> Result<SubmitReport> {
    let client = Arc::new(ApiClient::new(&config.api)?);
    let needs_api = !to_send.is_empty()
        || tracker.waiting() > 0
        || sharing.as_ref().is_some_and(|s| s.claims.has_work());
    if needs_api {
        client.authenticate().await?;
        if config.callbacks.source != SourceKind::DropDir {
            submit::registration::ensure_registered(&client, config).await?;
        }
    }
    let name = config.state.name();

    // The submission tells the collector each requestId once it is durable, and every one before
    // it returns: when a submission has ended, what it recorded is in `recorded`.
    let (recorded_tx, mut recorded) = tokio::sync::mpsc::unbounded_channel();
    let progress = RunProgress::new(tracker.stats.jobs);
    let budget = sharing.as_ref().map(|s| s.budget.clone());
    let mut next_claim = Instant::now();
    let mut submissions: JoinSet<std::result::Result<SubmitReport, SubmitError>> = JoinSet::new();
    let spawn = |submissions: &mut JoinSet<_>, jobs: Vec<Job>| {
        if jobs.is_empty() {
            return;
        }
        let mut options = SubmitOptions::new(&config.api, jobs.len());
        options.recorded = Some(recorded_tx.clone());
        options.progress = Some(progress.gauge());
        options.budget = budget.clone();
        let (client, writer) = (client.clone(), writer.clone());
        submissions.spawn(async move { submit::submit(client, writer, jobs, &options).await });
    };
    spawn(&mut submissions, to_send);

    let mut merged = SubmitReport::default();
    let mut last_log = Instant::now();
    loop {
        let now = Instant::now();
        let heard = source.poll().await?;
        // Ended submissions first, then the requestIds: every id an ended submission recorded is
        // then known to the tracker (docs/architecture.md, invariant 8), whatever the timing.
        let mut ended = Vec::new();
        while let Some(joined) = submissions.try_join_next() {
            ended.push(joined.map_err(|e| StateError::Invalid {
                path: name.clone(),
                message: format!("the submission task failed: {e}"),
            })??);
        }
        while let Ok((job_id, request_id)) = recorded.try_recv() {
            tracker.request_recorded(request_id, &job_id, now);
        }
        for heard in heard {
            tracker.heard(heard, now);
        }
        let stale = tracker.unpark_stale(now);
        if !stale.is_empty() {
            tracker.stats.unmatched_callbacks += unmatched(reader, stale).await?;
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
        if let Some(sharing) = sharing.as_deref_mut() {
            sharing.claims.renew_if_due().await?;
        }
        if submissions.is_empty() && tracker.waiting() == tracker.unsent() {
            let Some(sharing) = sharing.as_deref_mut() else {
                break;
            };
            // The batch has ended: its outcomes are durable before its claims are given back.
            let claims = &mut sharing.claims;
            if !claims.held().is_empty() {
                let held: std::collections::HashSet<&str> =
                    claims.held().iter().map(String::as_str).collect();
                let updates: Vec<_> = tracker
                    .job_updates()
                    .into_iter()
                    .filter(|u| held.contains(update_job(u)))
                    .collect();
                writer.apply_all(updates).await?;
                claims.release().await?;
            }
            if Instant::now() >= next_claim {
                match claims.next().await? {
                    Next::Done => break,
                    Next::Wait => next_claim = Instant::now() + CLAIM_RETRY,
                    Next::Batch { send, track } => {
                        let ids: Vec<String> = send
                            .iter()
                            .chain(&track)
                            .map(|j| j.id.to_string())
                            .collect();
                        tracing::info!(send = send.len(), track = track.len(), "claimed a batch");
                        tracker.add_jobs(send.iter().chain(&track).cloned().collect());
                        read_earlier(reader, tracker, cursor, ids).await?;
                        spawn(&mut submissions, send);
                        continue;
                    }
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
    progress.finish_and_clear();
    if needs_api {
        client.logout().await;
    }
    if let Some(budget) = budget {
        merged.budget = Some(budget.report().await);
    }
    Ok(merged)
}

/// The requests earlier runs recorded for the tracker's jobs, and their callbacks journaled up to
/// `cursor`.
async fn read_earlier(
    reader: &AsyncStore,
    tracker: &mut Tracker,
    cursor: i64,
    job_ids: Vec<String>,
) -> Result<()> {
    let (earlier, callbacks) = reader
        .call(move |s| {
            let ids: Vec<&str> = job_ids.iter().map(String::as_str).collect();
            let earlier = s.requests_of_jobs(&ids)?;
            let request_ids: Vec<&str> = earlier.iter().map(|r| r.request_id.as_str()).collect();
            let mut callbacks = Vec::new();
            s.callbacks_of_requests(&request_ids, cursor, &mut |_, request_id, body| {
                callbacks.push((request_id, body));
            })?;
            Ok((earlier, callbacks))
        })
        .await?;
    let now = Instant::now();
    for request in earlier {
        tracker.request_recorded(request.request_id, &request.job_id, now);
    }
    for (request_id, body) in callbacks {
        tracker.callback(request_id, body, now);
    }
    Ok(())
}

/// Unmatched: journaled during this run, for no request the store knows (an earlier night's late
/// redelivery is not unmatched).
async fn count_unmatched(reader: &AsyncStore, tracker: &mut Tracker) -> Result<()> {
    let parked: Vec<(String, usize)> = tracker.parked().map(|(id, n)| (id.to_owned(), n)).collect();
    tracker.stats.unmatched_callbacks += unmatched(reader, parked).await?;
    Ok(())
}

/// How many of `parked` callbacks (requestId, callbacks) are for no request the store knows.
async fn unmatched(reader: &AsyncStore, parked: Vec<(String, usize)>) -> Result<u64> {
    let ids: Vec<String> = parked.iter().map(|(id, _)| id.clone()).collect();
    let known = reader
        .call(move |s| {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            s.request_accounts(&ids)
        })
        .await?;
    Ok(parked
        .iter()
        .filter(|(id, _)| !known.contains_key(id))
        .map(|(_, n)| *n as u64)
        .sum())
}

/// The job an update is about.
fn update_job(update: &crate::state::JobUpdate) -> &str {
    use crate::state::JobUpdate;
    match update {
        JobUpdate::Submitted { job_id, .. }
        | JobUpdate::Failed { job_id, .. }
        | JobUpdate::GaveUp { job_id, .. }
        | JobUpdate::Completed { job_id }
        | JobUpdate::Missing { job_id, .. } => job_id,
    }
}
