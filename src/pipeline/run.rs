//! `tsusage run`: ingest → plan → submit → collect → normalize → write → report, in one place.

use std::sync::Arc;
use std::time::Duration;

use super::{Outcome, conclude, read_iccids, session, simulate};
use crate::Result;
use crate::collect::claims::Claims;
use crate::collect::tracker::Tracker;
use crate::collect::{RowKeeper, Writer};
use crate::config::Config;
use crate::plan::{self, DateRange};
use crate::report::{CollectReport, RunReport, new_run_id};
use crate::state::{AsyncStore, Store};
use crate::submit::budget::SharedBudget;

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
    super::check_output(config)?;
    let mut config = config.clone();
    let sim = if options.simulate {
        Some(simulate::start(&mut config).await?)
    } else {
        None
    };
    let result = run_inner(&config, options).await;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    result
}

async fn run_inner(config: &Config, options: RunOptions) -> Result<Outcome> {
    let range = options.range;
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "run");
    let mut store = crate::state::open(&config.state)?;
    // Several workers may share a range on a shared store: each holds the run lock shared (so
    // that `prune` waits for all of them) and claims its jobs; SQLite: one run at a time.
    let shares = store.shares_work();
    let _lock = if shares {
        store.lock_shared(&run_id, "run")?
    } else {
        store.lock(&run_id, "run")?
    };
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
    let (mut tracker, to_send, mut sharing) = if shares {
        let sharing = sharing(config, &run_id, &*store, tracked, &to_send)?;
        (
            Tracker::for_run(Vec::new(), config),
            Vec::new(),
            Some(sharing),
        )
    } else {
        (Tracker::for_run(tracked, config), to_send, None)
    };

    // 3-4. submit while collecting; the rows of what is journaled are kept for the write.
    let kept = RowKeeper::new(crate::write::publish::fresh_rows(config)?);
    let name = config.state.name();
    let writer = Arc::new(Writer::spawn_with(store, name, Some(kept.after_commit())));
    let collected = session::collect(
        config,
        &run_id,
        &writer,
        &mut tracker,
        to_send,
        sharing.as_mut(),
    )
    .await;
    let (submitted, source_report) = match collected {
        Ok(both) => both,
        Err(e) => {
            let _ = Writer::finish_shared(writer);
            return Err(e);
        }
    };
    report.collected(source_report, tracker.stats.unmatched_callbacks);
    let mut store = Writer::finish_shared(writer)?;
    report.claims = sharing.map(|s| s.claims.report);

    // 5-6. normalize and write every partition the journal has news for (one writer of
    // partitions at a time among the processes sharing the store).
    let _publishing = store.lock_publish(&run_id)?;
    report.output = Some(crate::write::publish::publish(
        config,
        &mut *store,
        &run_id,
        kept.take(),
    )?);
    // Retention: what this store no longer needs to hold moves to the archive.
    if config.state.retain_days > 0 {
        let horizon = super::prune::retention_horizon(config.state.retain_days);
        report.prune = Some(super::prune::prune_store(
            config,
            &mut *store,
            horizon,
            &run_id,
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
    conclude(report, &mut *store, &config.output)
}

/// A worker's claims and budget on a store several workers share: its name is the run id and
/// pid, its jobs the range's `tracked` (of which `to_send` are to be sent, judged against the
/// statuses now), the budget `api.requests_per_sec` for the whole account.
fn sharing(
    config: &Config,
    run_id: &str,
    store: &dyn Store,
    tracked: Vec<crate::plan::Job>,
    to_send: &[crate::plan::Job],
) -> Result<session::Sharing> {
    let name = config.state.name();
    let ids: Vec<&str> = tracked.iter().map(|j| j.id.as_str()).collect();
    let planned = store.job_statuses(&ids)?;
    let since = store.clock_ms()?;
    let worker = format!("{run_id} pid {}", std::process::id());
    tracing::info!(%worker, jobs = tracked.len(), "sharing the range with other workers");
    let claims = Claims::new(
        AsyncStore::new(crate::state::open(&config.state)?, name.clone()),
        worker,
        tracked,
        to_send,
        &planned,
        since,
        Duration::from_secs(config.plan.lease_secs),
        config.plan.claim_batch as usize,
    );
    let budget = SharedBudget::new(
        AsyncStore::new(crate::state::open(&config.state)?, name),
        &config.account_name,
        config.api.requests_per_sec,
        config.api.burst,
    );
    Ok(session::Sharing {
        claims,
        budget: Arc::new(budget),
    })
}
