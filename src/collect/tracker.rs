//! Completion tracking: which jobs have all their callbacks, which are overdue, which are missing.
//!
//! The tracker is handed what concerns this run only (docs/architecture.md, invariant 7): the
//! requests of its jobs (those earlier runs recorded, read by job id, and those this run's
//! submission reports as it records them) and their callbacks (those journaled before the run, read
//! by requestId, then what the run's callback source journals: the in-process listener and the drop
//! directory say it from the parse they did to journal it, a separate `tsusage listen`'s are read
//! back from the journal). It keeps per job: the ICCIDs asked for, those with usage, those whose
//! record was rejected, and whether the "Request Completed Processing" message has come.
//! Callbacks arrive in any order and twice; a callback may even arrive before its requestId is
//! recorded (it is parked under its requestId until then, for [`PARK_FOR`] plus `plan.lease_secs`:
//! a callback for a request this run never records, such as another worker's or an earlier
//! night's, is then let go, so that what the tracker holds does not grow with the callbacks it is
//! handed; a worker that takes over a dead worker's jobs after its lease finds their callbacks
//! still parked).
//!
//! A job is complete when its completion message has come and either every ICCID has its record, or
//! `callbacks.settle_secs` have passed since the job's last callback (ICCIDs without a record then
//! report no usage; the settle time covers the vendor redelivering a message that did not get through).
//! A job without its completion message `callbacks.deadline_secs` after its last request is overdue:
//! re-requested (a new requestId) up to `callbacks.max_resubmits` times, then missing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::ingest::Iccid;
use crate::normalize::payload::{CallbackKind, parse_callback};
use crate::plan::Job;

/// What the tracker learns from one callback. The intake derives it from the parse it does anyway
/// ([`super::Prepared::heard`]), so a callback this process journals is parsed once; one that
/// another process journaled is read back and parsed ([`Heard::from_body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub request_id: String,
    pub news: News,
}

/// What a callback says about its job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum News {
    /// "Request Completed Processing".
    Completion,
    /// The vendor reports the request failed, with why.
    Fault(String),
    /// Usage: the ICCIDs with an accepted record, and those whose record was rejected (with the
    /// field and reason), in record order.
    Usage {
        accepted: Vec<Iccid>,
        rejected: Vec<(Iccid, String)>,
    },
    /// Journaled, but not readable as a callback.
    #[default]
    Unreadable,
}

impl News {
    /// The fault text the tracker reports.
    pub fn fault(code: Option<&str>, message: Option<&str>) -> News {
        News::Fault(format!(
            "fault callback: {}: {}",
            code.unwrap_or("(no faultcode)"),
            message.unwrap_or("(no faultstring)")
        ))
    }
}

impl Heard {
    /// Parses a journaled body (the same policy as the intake, `strict_luhn` for ICCIDs).
    pub fn from_body(request_id: String, body: &str, strict_luhn: bool) -> Heard {
        let Ok(cb) = parse_callback(body) else {
            return Heard {
                request_id,
                news: News::Unreadable,
            };
        };
        let news = match &cb.kind {
            CallbackKind::Completion => News::Completion,
            CallbackKind::Fault { code, message } => {
                News::fault(code.as_deref(), message.as_deref())
            }
            CallbackKind::Usage(records) => {
                let (mut accepted, mut rejected) = (Vec::new(), Vec::new());
                for parsed in records.parsed(strict_luhn) {
                    match parsed {
                        Ok(r) => accepted.push(r.iccid),
                        Err(e) => {
                            if let Some(iccid) =
                                e.iccid.as_deref().and_then(|t| Iccid::parse(t).ok())
                            {
                                rejected.push((iccid, format!("{}: {}", e.field, e.reason)));
                            }
                        }
                    }
                }
                News::Usage { accepted, rejected }
            }
        };
        Heard { request_id, news }
    }
}

/// Where one planned (ICCID, window) pair ended (docs/architecture.md, invariant 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairState {
    Usage,
    NoUsage,
    /// Its record came, but with a value the policy rejects (see the rejects file).
    Rejected,
    /// The vendor refused the request or reported it failed, or it could not be sent.
    FailedRequest,
    /// No callbacks by the deadline after every re-request.
    Missing,
}

impl PairState {
    pub fn name(self) -> &'static str {
        match self {
            PairState::Usage => "usage",
            PairState::NoUsage => "no_usage",
            PairState::Rejected => "rejected",
            PairState::FailedRequest => "failed_request",
            PairState::Missing => "missing",
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not sent yet, or sent and waiting for callbacks.
    Waiting,
    Complete,
    /// Refused by the vendor (or a fault callback), with the reason.
    Failed(String),
    /// Could not be sent in this run (transient errors, retry budget).
    NotSubmitted(String),
    Missing,
}

#[derive(Debug)]
struct Track {
    job: Job,
    state: JobState,
    /// The job's ICCIDs (by position in its sorted list) with a usage record.
    with_data: Positions,
    /// Job ICCIDs whose record was rejected (and none accepted), with the reason.
    rejected: HashMap<Iccid, String>,
    request_ids: Vec<String>,
    /// When the latest request for it was recorded (the deadline counts from here).
    requested_at: Option<Instant>,
    completion_seen: bool,
    last_callback_at: Option<Instant>,
    resubmits: u32,
}

/// A set of positions in a job's ICCID list: one bit each, so that a run over millions of
/// ICCID-days keeps a few bytes per job instead of a hash set entry per pair.
#[derive(Debug)]
struct Positions {
    bits: Vec<u64>,
    count: usize,
}

impl Positions {
    fn new(len: usize) -> Self {
        Positions {
            bits: vec![0; len.div_ceil(64)],
            count: 0,
        }
    }

    fn insert(&mut self, pos: usize) {
        if let Some(word) = self.bits.get_mut(pos / 64) {
            let bit = 1u64 << (pos % 64);
            if *word & bit == 0 {
                *word |= bit;
                self.count += 1;
            }
        }
    }

    fn contains(&self, pos: usize) -> bool {
        self.bits
            .get(pos / 64)
            .is_some_and(|word| word & (1u64 << (pos % 64)) != 0)
    }
}

/// Counts for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrackerStats {
    pub jobs: u64,
    pub complete: u64,
    pub failed: u64,
    pub not_submitted: u64,
    pub missing: u64,
    /// Re-requests of overdue jobs (each a new requestId).
    pub resubmitted: u64,
    /// Callbacks read from the journal for this run's requests.
    pub callbacks: u64,
    /// Every callback the tracker was handed: this run's requests' earlier callbacks and whatever
    /// was journaled during the run. It grows with the night's work, never with the history.
    pub callbacks_read: u64,
    /// Callbacks journaled during this run whose requestId matches no request known to the store.
    pub unmatched_callbacks: u64,
    /// Every planned pair by window (its first day, `YYYY-MM-DD`) and final state (`usage`,
    /// `no_usage`, ...): the per-day completeness of the run report's page. Set by
    /// [`Tracker::finish`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_window: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// One row of the completeness file: a planned pair that did not end as usage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CompletenessRow {
    pub iccid: String,
    pub window_start: String,
    pub window_end: String,
    pub state: PairState,
    pub reason: String,
    pub job_id: String,
    pub request_ids: String,
}

/// How long the news of a callback whose requestId is not known stays parked, beyond the lease
/// (see [`Tracker::for_run`]). A run records each requestId as soon as its POST is answered, so its
/// own callbacks wait milliseconds; those still unknown after this long are for requests of other
/// processes or earlier nights.
pub const PARK_FOR: Duration = Duration::from_secs(120);

/// How often [`Tracker::unpark_stale`] looks through the parked callbacks, at most.
pub const UNPARK_EVERY: Duration = Duration::from_secs(10);

/// The news of callbacks whose requestId is not (yet) known, since the first of them came.
#[derive(Debug)]
struct Parked {
    since: Instant,
    news: Vec<News>,
}

/// Tracks this run's jobs against the journal.
#[derive(Debug)]
pub struct Tracker {
    tracks: Vec<Track>,
    by_job: HashMap<String, usize>,
    by_request: HashMap<String, usize>,
    /// Callbacks whose requestId is not (yet) known, by requestId, each for `park_for`.
    parked: HashMap<String, Parked>,
    park_for: Duration,
    /// When the parked callbacks were last looked through (see [`Tracker::unpark_stale`]).
    unparked_at: Option<Instant>,
    strict_luhn: bool,
    settle: Duration,
    deadline: Duration,
    max_resubmits: u32,
    pub stats: TrackerStats,
}

impl Tracker {
    pub fn new(
        jobs: Vec<Job>,
        strict_luhn: bool,
        settle: Duration,
        deadline: Duration,
        max_resubmits: u32,
    ) -> Self {
        let mut by_job = HashMap::new();
        let tracks: Vec<Track> = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| {
                by_job.insert(job.id.to_string(), i);
                Track {
                    with_data: Positions::new(job.iccids.len()),
                    job,
                    state: JobState::Waiting,
                    rejected: HashMap::new(),
                    request_ids: Vec::new(),
                    requested_at: None,
                    completion_seen: false,
                    last_callback_at: None,
                    resubmits: 0,
                }
            })
            .collect();
        let stats = TrackerStats {
            jobs: tracks.len() as u64,
            ..TrackerStats::default()
        };
        Tracker {
            tracks,
            by_job,
            by_request: HashMap::new(),
            parked: HashMap::new(),
            park_for: PARK_FOR,
            unparked_at: None,
            strict_luhn,
            settle,
            deadline,
            max_resubmits,
            stats,
        }
    }

    /// A tracker for `jobs` with the settle time, deadline and re-requests of `[callbacks]`. It
    /// parks callbacks of unknown requestIds for [`PARK_FOR`] plus `plan.lease_secs`: a worker
    /// claims a dead worker's jobs once their lease has run out, and their callbacks journaled since
    /// this run started are then only in what it parked.
    pub fn for_run(jobs: Vec<Job>, config: &crate::config::Config) -> Self {
        let c = &config.callbacks;
        let mut tracker = Tracker::new(
            jobs,
            config.input.strict_luhn,
            Duration::from_secs(c.settle_secs),
            Duration::from_secs(c.deadline_secs),
            c.max_resubmits,
        );
        tracker.park_for = PARK_FOR + Duration::from_secs(config.plan.lease_secs);
        tracker
    }

    /// Starts tracking `jobs` too (a worker's newly claimed batch); jobs already tracked are kept.
    pub fn add_jobs(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            if self.by_job.contains_key(job.id.as_str()) {
                continue;
            }
            self.by_job.insert(job.id.to_string(), self.tracks.len());
            self.tracks.push(Track {
                with_data: Positions::new(job.iccids.len()),
                job,
                state: JobState::Waiting,
                rejected: HashMap::new(),
                request_ids: Vec::new(),
                requested_at: None,
                completion_seen: false,
                last_callback_at: None,
                resubmits: 0,
            });
        }
        self.stats.jobs = self.tracks.len() as u64;
    }

    /// A requestId recorded for a job (from the store's `requests` table).
    pub fn request_recorded(&mut self, request_id: String, job_id: &str, now: Instant) {
        let Some(&i) = self.by_job.get(job_id) else {
            return;
        };
        self.by_request.insert(request_id.clone(), i);
        let track = &mut self.tracks[i];
        if !track.request_ids.contains(&request_id) {
            track.request_ids.push(request_id.clone());
            track.requested_at = Some(now);
        }
        // Callbacks that came before their requestId was recorded.
        for news in self
            .parked
            .remove(&request_id)
            .map_or_else(Vec::new, |p| p.news)
        {
            self.apply(i, news, now);
        }
    }

    /// A journaled callback's body.
    pub fn callback(&mut self, request_id: String, body: String, now: Instant) {
        let heard = Heard::from_body(request_id, &body, self.strict_luhn);
        self.heard(heard, now);
    }

    /// What a journaled callback says.
    pub fn heard(&mut self, heard: Heard, now: Instant) {
        self.stats.callbacks_read += 1;
        match self.by_request.get(&heard.request_id) {
            Some(&i) => self.apply(i, heard.news, now),
            None => self
                .parked
                .entry(heard.request_id)
                .or_insert_with(|| Parked {
                    since: now,
                    news: Vec::new(),
                })
                .news
                .push(heard.news),
        }
    }

    /// The requestIds of callbacks that matched no request of this run, with how many callbacks
    /// each has.
    pub fn parked(&self) -> impl Iterator<Item = (&str, usize)> {
        self.parked
            .iter()
            .map(|(id, parked)| (id.as_str(), parked.news.len()))
    }

    /// Lets go of the callbacks parked for their time by `now`: their requestIds, with how many
    /// callbacks each had (to count those of no request at all as unmatched).
    /// The run calls it at every look; it looks through them at most every [`UNPARK_EVERY`] (a
    /// callback is let go that much later at worst), not the whole map five times a second.
    pub fn unpark_stale(&mut self, now: Instant) -> Vec<(String, usize)> {
        let mut stale = Vec::new();
        if self
            .unparked_at
            .is_some_and(|at| now.saturating_duration_since(at) < UNPARK_EVERY)
        {
            return stale;
        }
        self.unparked_at = Some(now);
        let park_for = self.park_for;
        self.parked.retain(|id, parked| {
            let keep = now.saturating_duration_since(parked.since) < park_for;
            if !keep {
                stale.push((id.clone(), parked.news.len()));
            }
            keep
        });
        stale
    }

    fn apply(&mut self, i: usize, news: News, now: Instant) {
        self.stats.callbacks += 1;
        let track = &mut self.tracks[i];
        track.last_callback_at = Some(now);
        match news {
            News::Unreadable => {}
            News::Completion => track.completion_seen = true,
            News::Fault(why) => {
                if track.state == JobState::Waiting {
                    track.state = JobState::Failed(why);
                }
            }
            News::Usage { accepted, rejected } => {
                // An accepted record wins over a rejected one for the same ICCID, in any order.
                for iccid in accepted {
                    if let Ok(pos) = track.job.iccids.binary_search(&iccid) {
                        track.rejected.remove(&iccid);
                        track.with_data.insert(pos);
                    }
                }
                for (iccid, why) in rejected {
                    let pending = track
                        .job
                        .iccids
                        .binary_search(&iccid)
                        .is_ok_and(|pos| !track.with_data.contains(pos));
                    if pending {
                        track.rejected.insert(iccid, why);
                    }
                }
            }
        }
    }

    /// The job could not be sent in this run.
    pub fn not_submitted(&mut self, job_id: &str, why: String) {
        if let Some(&i) = self.by_job.get(job_id)
            && self.tracks[i].request_ids.is_empty()
        {
            self.tracks[i].state = JobState::NotSubmitted(why);
        }
    }

    /// The vendor refused the job's request.
    pub fn refused(&mut self, job_id: &str, why: String) {
        if let Some(&i) = self.by_job.get(job_id) {
            self.tracks[i].state = JobState::Failed(why);
        }
    }

    /// Settles what can be settled at `now`; returns the jobs to re-request.
    pub fn tick(&mut self, now: Instant) -> Vec<Job> {
        let mut resubmit = Vec::new();
        for track in &mut self.tracks {
            if track.state != JobState::Waiting || track.request_ids.is_empty() {
                continue;
            }
            // Rejected ICCIDs are job members without data (an accepted record removes them).
            let all_in = track.with_data.count + track.rejected.len() >= track.job.iccids.len();
            let quiet = track
                .last_callback_at
                .is_some_and(|t| now.saturating_duration_since(t) >= self.settle);
            if track.completion_seen && (all_in || quiet) {
                track.state = JobState::Complete;
                continue;
            }
            let since_request = track
                .requested_at
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            if !track.completion_seen && since_request >= self.deadline {
                if track.resubmits < self.max_resubmits {
                    track.resubmits += 1;
                    // The deadline restarts when the new requestId is recorded.
                    track.requested_at = Some(now);
                    resubmit.push(track.job.clone());
                } else {
                    track.state = JobState::Missing;
                }
            }
        }
        self.stats.resubmitted += resubmit.len() as u64;
        self.refresh_stats();
        resubmit
    }

    fn refresh_stats(&mut self) {
        let count =
            |f: fn(&JobState) -> bool| self.tracks.iter().filter(|t| f(&t.state)).count() as u64;
        self.stats.complete = count(|s| *s == JobState::Complete);
        self.stats.failed = count(|s| matches!(s, JobState::Failed(_)));
        self.stats.not_submitted = count(|s| matches!(s, JobState::NotSubmitted(_)));
        self.stats.missing = count(|s| *s == JobState::Missing);
    }

    /// Jobs still waiting for something.
    pub fn waiting(&self) -> usize {
        self.tracks
            .iter()
            .filter(|t| t.state == JobState::Waiting)
            .count()
    }

    /// Jobs waiting that were never sent (their submission is still under way).
    pub fn unsent(&self) -> usize {
        self.tracks
            .iter()
            .filter(|t| t.state == JobState::Waiting && t.request_ids.is_empty())
            .count()
    }

    /// Ends tracking: jobs still waiting are missing.
    pub fn finish(&mut self) {
        for track in &mut self.tracks {
            if track.state == JobState::Waiting {
                track.state = if track.request_ids.is_empty() {
                    JobState::NotSubmitted("the run ended before it was sent".into())
                } else {
                    JobState::Missing
                };
            }
        }
        self.refresh_stats();
        let mut by_window: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for track in &self.tracks {
            let window = by_window
                .entry(track.job.window.start.to_string())
                .or_default();
            for (pos, iccid) in track.job.iccids.iter().enumerate() {
                *window
                    .entry(pair_state(track, pos, iccid).0.name())
                    .or_default() += 1;
            }
        }
        self.stats.by_window = by_window;
    }

    /// What the store must record of each ended job (after [`Tracker::finish`]).
    pub fn job_updates(&self) -> Vec<crate::state::JobUpdate> {
        use crate::state::JobUpdate;
        self.job_states()
            .filter_map(|(job_id, state)| {
                let job_id = job_id.to_owned();
                Some(match state {
                    JobState::Complete => JobUpdate::Completed { job_id },
                    JobState::Missing => JobUpdate::Missing {
                        job_id,
                        error: "no completion callback by the deadline after every re-request"
                            .into(),
                    },
                    JobState::Failed(why) => JobUpdate::Failed {
                        job_id,
                        attempts: 0,
                        error: why.clone(),
                    },
                    JobState::NotSubmitted(_) | JobState::Waiting => return None,
                })
            })
            .collect()
    }

    /// The ids of the tracked jobs.
    pub fn job_ids(&self) -> impl Iterator<Item = &str> {
        self.tracks.iter().map(|t| t.job.id.as_str())
    }

    /// Each job's final state (for the store).
    pub fn job_states(&self) -> impl Iterator<Item = (&str, &JobState)> {
        self.tracks.iter().map(|t| (t.job.id.as_str(), &t.state))
    }

    /// Every planned pair's state, counted, and the rows of those that are not usage, from the
    /// tracker's own state; `input_rejects` (`(raw value, reason)` of the ICCID list rows rejected
    /// for `range`) count as `rejected_input`.
    pub fn completeness(
        &self,
        input_rejects: &[(String, String)],
        range: crate::plan::DateRange,
    ) -> (BTreeMap<String, u64>, Vec<CompletenessRow>) {
        // Counted by the state's static name (millions of pairs, no allocation each), keyed by
        // String for the report at the end.
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut rows = Vec::new();
        for track in &self.tracks {
            for (pos, iccid) in track.job.iccids.iter().enumerate() {
                let (state, reason) = pair_state(track, pos, iccid);
                *by_state.entry(state.name()).or_default() += 1;
                if state != PairState::Usage {
                    rows.push(CompletenessRow {
                        iccid: iccid.to_string(),
                        window_start: track.job.window.start.to_string(),
                        window_end: track.job.window.end.to_string(),
                        state,
                        reason,
                        job_id: track.job.id.to_string(),
                        request_ids: track.request_ids.join(" "),
                    });
                }
            }
        }
        if !input_rejects.is_empty() {
            by_state.insert("rejected_input", input_rejects.len() as u64);
            rows.extend(input_rejects.iter().map(|(raw, reason)| CompletenessRow {
                iccid: raw.clone(),
                window_start: range.from.to_string(),
                window_end: (range.to + chrono::Days::new(1)).to_string(),
                state: PairState::Rejected,
                reason: format!("rejected input: {reason}"),
                job_id: String::new(),
                request_ids: String::new(),
            }));
        }
        rows.sort();
        let counts = by_state
            .into_iter()
            .map(|(state, n)| (state.to_owned(), n))
            .collect();
        (counts, rows)
    }
}

/// Where one planned pair ended, and why when it is not usage.
fn pair_state(track: &Track, pos: usize, iccid: &Iccid) -> (PairState, String) {
    match &track.state {
        JobState::Complete | JobState::Waiting => {
            if track.with_data.contains(pos) {
                (PairState::Usage, String::new())
            } else if let Some(why) = track.rejected.get(iccid) {
                (PairState::Rejected, why.clone())
            } else if track.state == JobState::Complete {
                (
                    PairState::NoUsage,
                    "request complete; no usage record for this ICCID".into(),
                )
            } else {
                (
                    PairState::Missing,
                    "still waiting when the run ended".into(),
                )
            }
        }
        JobState::Failed(why) => (PairState::FailedRequest, why.clone()),
        JobState::NotSubmitted(why) => (PairState::FailedRequest, format!("not submitted: {why}")),
        JobState::Missing => {
            if track.with_data.contains(pos) {
                (PairState::Usage, String::new())
            } else {
                (
                    PairState::Missing,
                    format!(
                        "no completion callback after {} re-requests",
                        track.resubmits
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Window, plan};

    const SETTLE: Duration = Duration::from_secs(2);
    const DEADLINE: Duration = Duration::from_secs(30);

    fn iccids(n: u32) -> Vec<Iccid> {
        (0..n)
            .map(|i| {
                let body = format!("89148000000{i:08}");
                let check = crate::ingest::luhn_check_digit(body.as_bytes());
                Iccid::parse(&format!("{body}{check}")).expect("iccid")
            })
            .collect()
    }

    fn one_job(n: u32) -> Job {
        let day = chrono::NaiveDate::from_ymd_opt(2021, 8, 15).expect("day");
        let window = Window {
            start: day,
            end: day + chrono::Days::new(1),
        };
        plan("0000123456-00001", &iccids(n), &[window], n).remove(0)
    }

    fn usage(request_id: &str, ids: &[&Iccid]) -> String {
        let records: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"deviceIdentifierCollection":[{{"id":"{id}","kind":"ICCID"}}],"dataUsage":"10","smsUsage":"1","moSms":"1","mtSms":"0","startDate":"2021-08-15T00:00:00.0000000","endDate":"2021-08-16T00:00:00.0000000"}}"#
                )
            })
            .collect();
        format!(
            r#"{{"requestId":"{request_id}","deviceResponse":{{"devicePromoUsageResponse":[{}]}},"callbackCount":1,"maxCallbackThreshold":4}}"#,
            records.join(",")
        )
    }

    fn completion(request_id: &str) -> String {
        format!(
            r#"{{"requestId":"{request_id}","deviceResponse":{{}},"comment":"Request Completed Processing","callbackCount":1,"maxCallbackThreshold":4}}"#
        )
    }

    /// A callback journaled by this process tells the tracker, from the intake's one parse, exactly
    /// what reading it back from the journal would.
    #[test]
    fn the_intake_hears_what_the_journal_would_tell() {
        let ids = iccids(3);
        let good = usage("r-1", &[&ids[0], &ids[1]]);
        // The second record's count is not a number: rejected, for a known ICCID.
        let mixed = usage("r-2", &[&ids[1], &ids[2]]);
        let second = mixed.rfind(r#""dataUsage":"10""#).expect("a second record");
        let mixed = format!(
            "{}\"dataUsage\":\"ten\"{}",
            &mixed[..second],
            &mixed[second + 16..]
        );
        let fault = r#"{"requestId":"r-3","faultResponse":{"faultcode":"E1","faultstring":"no such device"}}"#;
        let bodies = [good, mixed, completion("r-4"), fault.to_owned()];
        let mut intake =
            super::super::Intake::new(false, crate::config::PartitionBy::Day).tell_tracker();
        let mut heard = Vec::new();
        for body in &bodies {
            let mut rejects = Vec::new();
            let mut prepared = intake
                .prepare(body, "test".into(), &mut rejects)
                .expect("a callback");
            let from_intake = prepared.take_heard();
            let from_journal = Heard::from_body(prepared.request_id.clone(), body, false);
            assert_eq!(from_intake, from_journal, "{body}");
            heard.push(from_intake.news);
        }
        let News::Usage { accepted, rejected } = &heard[1] else {
            panic!("usage: {:?}", heard[1]);
        };
        assert_eq!(accepted, &[ids[1]]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0, ids[2]);
        assert!(rejected[0].1.starts_with("dataUsage: "), "{rejected:?}");
        assert_eq!(heard[2], News::Completion);
        assert_eq!(
            heard[3],
            News::Fault("fault callback: E1: no such device".into())
        );
    }

    /// Callbacks for requests the run never records are let go after [`PARK_FOR`], counted; those
    /// whose requestId comes in time are applied.
    #[test]
    fn parked_callbacks_are_let_go_after_the_parking_time() {
        let job = one_job(2);
        let ids: Vec<&Iccid> = job.iccids.iter().collect();
        let mut t = Tracker::new(vec![job.clone()], false, SETTLE, DEADLINE, 1);
        let t0 = Instant::now();
        for n in 0..1000 {
            let foreign = format!("other-{n}");
            t.callback(foreign.clone(), completion(&foreign), t0);
        }
        t.callback("r1".into(), usage("r1", &ids), t0 + PARK_FOR / 2);
        assert_eq!(t.parked().count(), 1001);
        assert!(t.unpark_stale(t0 + PARK_FOR / 2).is_empty());
        let stale = t.unpark_stale(t0 + PARK_FOR);
        assert_eq!(stale.len(), 1000, "the foreign ones, each once");
        assert!(
            stale
                .iter()
                .all(|(id, n)| id.starts_with("other-") && *n == 1)
        );
        assert_eq!(t.parked().collect::<Vec<_>>(), vec![("r1", 1)]);
        t.request_recorded("r1".into(), job.id.as_str(), t0 + PARK_FOR);
        assert_eq!(t.parked().count(), 0);
        assert_eq!(t.stats.callbacks, 1, "the usage that waited was applied");
    }

    #[test]
    fn a_job_completes_when_its_completion_and_every_iccid_are_in_in_any_order() {
        let job = one_job(3);
        let ids: Vec<&Iccid> = job.iccids.iter().collect();
        let mut t = Tracker::new(vec![job.clone()], false, SETTLE, DEADLINE, 1);
        let t0 = Instant::now();
        // The completion and part of the usage arrive before the requestId is recorded: parked.
        t.callback("r1".into(), completion("r1"), t0);
        t.callback("r1".into(), usage("r1", &ids[..2]), t0);
        assert_eq!(t.parked().map(|(_, n)| n).sum::<usize>(), 2);
        assert_eq!((t.waiting(), t.unsent()), (1, 1));
        t.request_recorded("r1".into(), job.id.as_str(), t0);
        assert_eq!(t.parked().count(), 0, "applied once the requestId is known");
        assert!(t.tick(t0).is_empty());
        assert_eq!(
            t.stats.complete, 0,
            "one ICCID is still out, and the settle time runs"
        );
        t.callback(
            "r1".into(),
            usage("r1", &ids[2..]),
            t0 + Duration::from_millis(10),
        );
        t.tick(t0 + Duration::from_millis(10));
        assert_eq!(t.stats.complete, 1);
        assert_eq!((t.stats.callbacks, t.stats.callbacks_read), (3, 3));
        let (counts, rows) = t.completeness(
            &[],
            crate::plan::DateRange {
                from: job.window.start,
                to: job.window.start,
            },
        );
        assert_eq!(counts.get("usage"), Some(&3));
        assert!(rows.is_empty());
    }

    #[test]
    fn iccids_without_a_record_are_no_usage_once_the_settle_time_has_passed() {
        let job = one_job(3);
        let ids: Vec<&Iccid> = job.iccids.iter().collect();
        let mut t = Tracker::new(vec![job.clone()], false, SETTLE, DEADLINE, 1);
        let t0 = Instant::now();
        t.request_recorded("r1".into(), job.id.as_str(), t0);
        t.callback("r1".into(), usage("r1", &ids[..1]), t0);
        t.callback("r1".into(), completion("r1"), t0);
        t.tick(t0 + SETTLE - Duration::from_millis(1));
        assert_eq!(t.stats.complete, 0);
        t.tick(t0 + SETTLE);
        assert_eq!(t.stats.complete, 1);
        let range = crate::plan::DateRange {
            from: job.window.start,
            to: job.window.start,
        };
        let (counts, rows) = t.completeness(&[("8.9E+19".into(), "spreadsheet".into())], range);
        assert_eq!(
            (
                counts.get("usage"),
                counts.get("no_usage"),
                counts.get("rejected_input")
            ),
            (Some(&1), Some(&2), Some(&1))
        );
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn an_overdue_job_is_re_requested_then_missing_and_a_late_requestid_is_still_tracked() {
        let job = one_job(2);
        let mut t = Tracker::new(vec![job.clone()], false, SETTLE, DEADLINE, 1);
        let t0 = Instant::now();
        t.request_recorded("r1".into(), job.id.as_str(), t0);
        assert!(t.tick(t0 + DEADLINE - Duration::from_millis(1)).is_empty());
        let again = t.tick(t0 + DEADLINE);
        assert_eq!(again, vec![job.clone()], "re-requested once");
        assert_eq!(t.stats.resubmitted, 1);
        // The re-request's requestId; the deadline counts from it.
        let t1 = t0 + DEADLINE + Duration::from_secs(1);
        t.request_recorded("r2".into(), job.id.as_str(), t1);
        assert!(t.tick(t1 + DEADLINE - Duration::from_millis(1)).is_empty());
        assert!(t.tick(t1 + DEADLINE).is_empty(), "no more re-requests");
        assert_eq!(t.stats.missing, 1);
        let updates = t.job_updates();
        assert!(matches!(
            &updates[..],
            [crate::state::JobUpdate::Missing { .. }]
        ));
    }

    #[test]
    fn a_job_never_sent_ends_not_submitted_and_a_refused_one_failed() {
        let (a, b) = (one_job(2), one_job(3));
        let mut t = Tracker::new(vec![a.clone(), b.clone()], false, SETTLE, DEADLINE, 1);
        t.not_submitted(a.id.as_str(), "retry budget used up".into());
        t.refused(
            b.id.as_str(),
            "INPUT_INVALID.Account.NotDefined: no such account".into(),
        );
        t.tick(Instant::now());
        assert_eq!(
            (t.waiting(), t.stats.not_submitted, t.stats.failed),
            (0, 1, 1)
        );
        let range = crate::plan::DateRange {
            from: a.window.start,
            to: a.window.start,
        };
        let (counts, _) = t.completeness(&[], range);
        assert_eq!(counts.get("failed_request"), Some(&5));
    }
}
