//! A worker's share of a range on a store that several processes share (PostgreSQL): jobs are
//! claimed in batches with leases (`Store::claim_jobs`, `FOR UPDATE SKIP LOCKED`), renewed while
//! they are tracked, released once their outcome is recorded; a killed worker's jobs return to
//! the others when its lease expires.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::Result;
use crate::plan::{Job, JobStatus};
use crate::state::AsyncStore;

/// How often a worker with nothing to claim looks again while others hold live leases.
pub const CLAIM_RETRY: Duration = Duration::from_secs(1);

/// What a worker claimed, for the run report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClaimReport {
    /// The worker's name in the store's `jobs.claimed_by` (`RUN_ID pid N`).
    pub worker: String,
    /// Batches claimed.
    pub batches: u64,
    /// Jobs claimed in all.
    pub jobs: u64,
    /// Of those, jobs to send (planned, or asked again).
    pub to_send: u64,
    /// Of those, jobs another process had submitted (tracked with their earlier requestIds).
    pub taken_over: u64,
    /// Jobs claimed that needed nothing any more (another worker ended them since this run
    /// planned).
    pub skipped: u64,
    /// Lease renewals that found a claim gone (its lease had expired and another worker took it).
    pub leases_lost: u64,
    /// Seconds spent waiting for jobs other workers held.
    pub waited_secs: f64,
}

/// The next step of a worker.
#[derive(Debug)]
pub enum Next {
    /// A batch claimed: jobs to send, and jobs to track only (submitted before).
    Batch { send: Vec<Job>, track: Vec<Job> },
    /// Nothing claimable now, but other workers hold live leases on jobs still to do.
    Wait,
    /// Nothing left for anyone.
    Done,
}

/// A worker's claims on its range's jobs.
#[derive(Debug)]
pub struct Claims {
    store: AsyncStore,
    worker: String,
    /// The range's jobs this run handles (`plan::select`'s tracked), by id.
    pool: HashMap<String, Job>,
    /// The jobs the run selected to send, with the status each had when it planned.
    to_send: HashMap<String, Option<JobStatus>>,
    /// When this run looked at the statuses, by the store's clock (ms): a job asked again is
    /// re-pulled once by the workers that started before anyone claimed it.
    since: i64,
    lease: Duration,
    batch: usize,
    /// The current batch.
    held: Vec<String>,
    /// Every job this worker has claimed (never claimed twice by it).
    seen: HashSet<String>,
    last_renewed: Instant,
    waiting_since: Option<Instant>,
    pub report: ClaimReport,
}

impl Claims {
    /// The claims of `worker` on `tracked` (of which `to_send` are to be sent, with the statuses
    /// seen when planning, at `since` by the store's clock).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: AsyncStore,
        worker: String,
        tracked: Vec<Job>,
        to_send: &[Job],
        planned: &HashMap<String, JobStatus>,
        since: i64,
        lease: Duration,
        batch: usize,
    ) -> Self {
        let to_send = to_send
            .iter()
            .map(|j| (j.id.to_string(), planned.get(j.id.as_str()).copied()))
            .collect();
        Claims {
            store,
            report: ClaimReport {
                worker: worker.clone(),
                ..ClaimReport::default()
            },
            worker,
            pool: tracked.into_iter().map(|j| (j.id.to_string(), j)).collect(),
            to_send,
            since,
            lease,
            batch: batch.max(1),
            held: Vec::new(),
            seen: HashSet::new(),
            last_renewed: Instant::now(),
            waiting_since: None,
        }
    }

    /// Whether any job of the range may need this worker.
    pub fn has_work(&self) -> bool {
        !self.pool.is_empty()
    }

    /// The jobs of the current batch.
    pub fn held(&self) -> &[String] {
        &self.held
    }

    /// Claims the next batch, or says to wait or that all is done.
    pub async fn next(&mut self) -> Result<Next> {
        let mut candidates: Vec<String> = self
            .pool
            .keys()
            .filter(|id| !self.seen.contains(*id))
            .cloned()
            .collect();
        if candidates.is_empty() {
            self.stop_waiting();
            return Ok(Next::Done);
        }
        candidates.sort_unstable();
        let lease_ms = self.lease_ms();
        let (worker, since, batch) = (self.worker.clone(), self.since, self.batch);
        let (claimed, statuses) = self
            .store
            .call(move |s| {
                let ids: Vec<&str> = candidates.iter().map(String::as_str).collect();
                let claimed = s.claim_jobs(&ids, &worker, lease_ms, since, batch)?;
                // Claimed: their statuses now; nothing claimed: whether others still work.
                let asked: Vec<&str> = if claimed.is_empty() {
                    ids
                } else {
                    claimed.iter().map(String::as_str).collect()
                };
                let statuses = s.job_statuses(&asked)?;
                Ok((claimed, statuses))
            })
            .await?;
        if claimed.is_empty() {
            let live = statuses
                .iter()
                .any(|(_, s)| matches!(s, JobStatus::Planned | JobStatus::Submitted));
            if live {
                self.waiting_since.get_or_insert_with(Instant::now);
                return Ok(Next::Wait);
            }
            self.stop_waiting();
            return Ok(Next::Done);
        }
        self.stop_waiting();
        self.last_renewed = Instant::now();
        self.report.batches += 1;
        self.report.jobs += claimed.len() as u64;
        let (mut send, mut track, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for id in claimed {
            self.seen.insert(id.clone());
            let Some(job) = self.pool.get(&id).cloned() else {
                continue;
            };
            let now_status = statuses.get(&id).copied();
            // Sent when still as planned (nobody has done it since this run looked) or never sent.
            let unchanged = self.to_send.get(&id).is_some_and(|at| *at == now_status);
            if now_status == Some(JobStatus::Planned) || unchanged {
                send.push(job);
            } else if now_status == Some(JobStatus::Submitted) {
                // Planned (or asked again) when this run looked, submitted by another worker since.
                self.report.taken_over += u64::from(self.to_send.contains_key(&id));
                track.push(job);
            } else {
                skipped.push(id.clone());
                continue;
            }
            self.held.push(id);
        }
        self.report.to_send += send.len() as u64;
        self.report.skipped += skipped.len() as u64;
        if !skipped.is_empty() {
            self.release_ids(skipped).await?;
        }
        if send.is_empty() && track.is_empty() {
            return Ok(Next::Wait);
        }
        Ok(Next::Batch { send, track })
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX / 2)
    }

    fn stop_waiting(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.report.waited_secs += since.elapsed().as_secs_f64();
        }
    }

    /// Renews the current batch's leases when a third of the lease has passed.
    pub async fn renew_if_due(&mut self) -> Result<()> {
        if self.held.is_empty() || self.last_renewed.elapsed() < self.lease / 3 {
            return Ok(());
        }
        self.last_renewed = Instant::now();
        let lease_ms = self.lease_ms();
        let (worker, ids) = (self.worker.clone(), self.held.clone());
        let held = self
            .store
            .call(move |s| {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                s.renew_claims(&worker, &ids, lease_ms)
            })
            .await?;
        let lost = (self.held.len() as u64).saturating_sub(held);
        if lost > 0 {
            self.report.leases_lost += lost;
            tracing::warn!(
                lost,
                "leases expired before renewal; another worker may send them"
            );
        }
        Ok(())
    }

    /// Gives the current batch back (its outcomes recorded first by the caller).
    pub async fn release(&mut self) -> Result<()> {
        let ids = std::mem::take(&mut self.held);
        self.release_ids(ids).await
    }

    async fn release_ids(&self, ids: Vec<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let worker = self.worker.clone();
        self.store
            .call(move |s| {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                s.release_claims(&worker, &ids)
            })
            .await?;
        Ok(())
    }
}
