//! The live display of a run on a terminal: requests sent / accepted / in flight, callbacks, jobs
//! complete with an ETA, on three lines of one `indicatif` display, cleared when the run ends.
//!
//! Off a terminal (cron, systemd, a pipe) the display is hidden and draws nothing; the run logs its
//! progress instead (see [`super::session`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::collect::tracker::TrackerStats;
use crate::submit::SubmitGauge;

/// How often the spinners move while nothing else changes.
const TICK: Duration = Duration::from_millis(120);

/// The run's display: one line for requests, one for callbacks, one bar for jobs.
#[derive(Debug)]
pub struct RunProgress {
    multi: MultiProgress,
    requests: ProgressBar,
    callbacks: ProgressBar,
    jobs: ProgressBar,
    gauge: Arc<SubmitGauge>,
    started: Instant,
}

impl RunProgress {
    /// A display for a run of `jobs` jobs, drawn on stderr when it is a terminal.
    pub fn new(jobs: u64) -> Self {
        RunProgress::with_target(jobs, ProgressDrawTarget::stderr())
    }

    /// A display that draws nothing (tests, and commands that log instead).
    pub fn hidden(jobs: u64) -> Self {
        RunProgress::with_target(jobs, ProgressDrawTarget::hidden())
    }

    fn with_target(jobs: u64, target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let line = |template: &str| {
            let bar = multi.add(ProgressBar::new_spinner());
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar
        };
        let requests = line("{spinner} requests  {msg}");
        let callbacks = line("  callbacks {msg}");
        let jobs_bar = multi.add(ProgressBar::new(jobs));
        if let Ok(style) = ProgressStyle::with_template(
            "  jobs      {bar:30} {pos}/{len} complete  [{elapsed}, ETA {eta}]",
        ) {
            jobs_bar.set_style(style.progress_chars("=> "));
        }
        if !multi.is_hidden() {
            requests.enable_steady_tick(TICK);
        }
        RunProgress {
            multi,
            requests,
            callbacks,
            jobs: jobs_bar,
            gauge: Arc::new(SubmitGauge::default()),
            started: Instant::now(),
        }
    }

    /// What the submission updates (give it to `SubmitOptions::progress`).
    pub fn gauge(&self) -> Arc<SubmitGauge> {
        self.gauge.clone()
    }

    /// True when nothing is drawn (stderr is not a terminal).
    pub fn is_hidden(&self) -> bool {
        self.multi.is_hidden()
    }

    /// Redraws from the tracker's counts and the gauge.
    pub fn update(&self, stats: &TrackerStats) {
        let g = &self.gauge;
        let sent = g.sent.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        };
        self.requests.set_message(format!(
            "{sent} sent  {} accepted  {} in flight  {rate:.1}/s",
            g.accepted.load(Ordering::Relaxed),
            g.in_flight.load(Ordering::Relaxed).max(0),
        ));
        self.callbacks.set_message(format!(
            "{} read  {} re-requested",
            stats.callbacks, stats.resubmitted
        ));
        self.jobs.set_length(stats.jobs);
        self.jobs
            .set_position(stats.complete + stats.failed + stats.missing + stats.not_submitted);
    }

    /// Removes the display from the terminal, leaving no trace (the summary follows).
    pub fn finish_and_clear(&self) {
        self.requests.finish_and_clear();
        self.callbacks.finish_and_clear();
        self.jobs.finish_and_clear();
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_display_counts_without_drawing() {
        let progress = RunProgress::hidden(15);
        assert!(progress.is_hidden());
        let gauge = progress.gauge();
        gauge.sent.fetch_add(3, Ordering::Relaxed);
        gauge.accepted.fetch_add(2, Ordering::Relaxed);
        let stats = TrackerStats {
            jobs: 15,
            complete: 4,
            failed: 1,
            callbacks: 40,
            ..TrackerStats::default()
        };
        progress.update(&stats);
        assert_eq!(progress.jobs.position(), 5);
        assert_eq!(progress.jobs.length(), Some(15));
        assert!(
            progress
                .requests
                .message()
                .starts_with("3 sent  2 accepted  0 in flight"),
            "{}",
            progress.requests.message()
        );
        assert_eq!(progress.callbacks.message(), "40 read  0 re-requested");
        progress.finish_and_clear();
    }
}
