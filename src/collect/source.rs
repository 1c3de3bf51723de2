//! Where a run's callbacks come from: the in-process HTTP listener, a drop directory, or a separate
//! `tsusage listen` (external). Every source journals what it receives and tells the collect loop
//! what each callback it journaled says ([`Heard`]): the in-process sources from the parse they did
//! to journal it (a callback is parsed once), the external one by reading the journal. The loop
//! uses a source through [`CallbackSource`] without knowing which one it is. A new source (say, an
//! object-store prefix) is one more implementation and one more arm in [`open`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::Result;
use super::drop_dir::{self, DropDirOptions, DropDirStats};
use super::http_listener::{self, ListenerCounts, ListenerHandle, ListenerState};
use super::tracker::Heard;
use super::{CallbackStats, Intake};
use crate::config::{CallbackSource as SourceKind, Config};
use crate::normalize::RecordStats;
use crate::output::rejects::RecordRejects;
use crate::state::{AsyncStore, Store};

/// How long in-flight callbacks get to finish when a listener stops.
pub const LISTENER_GRACE: Duration = Duration::from_secs(10);

/// What a source took in, for the run report.
#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    pub callbacks: CallbackStats,
    pub records: RecordStats,
    /// The HTTP listener's answers (listener sources).
    pub listener: Option<ListenerCounts>,
    /// Files read (drop directory sources).
    pub drop_dir: Option<DropDirStats>,
    /// The rejects file it wrote, if anything was rejected.
    pub rejects_file: Option<PathBuf>,
}

/// A future a source finishes with.
pub type Finishing = Pin<Box<dyn Future<Output = Result<SourceReport>> + Send>>;

/// A future a source's poll ends with: what the callbacks journaled since the last poll say.
pub type Polling<'a> = Pin<Box<dyn Future<Output = Result<Vec<Heard>>> + Send + 'a>>;

/// A source of callbacks for a run.
pub trait CallbackSource: Send {
    /// Where it accepts callbacks over HTTP, if it does (to tell the vendor a port picked at start).
    fn bound_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// Brings in what has arrived since the last call, and says what each callback journaled since
    /// then tells the tracker.
    fn poll(&mut self) -> Polling<'_>;

    /// Stops taking callbacks once those accepted are journaled, and reports.
    fn finish(self: Box<Self>) -> Finishing;
}

/// The source `callbacks.source` names, journaling through `writer` (or its own connection).
/// `journal` and `cursor` (the journal's high-water mark before anything was sent) are where the
/// external source reads what another process journals.
pub async fn open(
    config: &Config,
    run_id: &str,
    writer: &Arc<super::Writer>,
    journal: &AsyncStore,
    cursor: i64,
) -> Result<Box<dyn CallbackSource>> {
    let rejects_file = |kind: &str| {
        config
            .output
            .dir
            .join("rejects")
            .join(format!("{run_id}-{kind}.jsonl"))
    };
    Ok(match config.callbacks.source {
        SourceKind::Listener => Box::new(
            Listener::start(
                config,
                writer.clone(),
                rejects_file("callbacks"),
                Tracked::Yes,
            )
            .await?,
        ),
        SourceKind::DropDir => Box::new(DropDir {
            dir: config.callbacks.drop_dir.clone(),
            options: DropDirOptions::new(config),
            intake: Intake::new(config.input.strict_luhn, config.output.partition_by)
                .tell_tracker(),
            store: crate::state::open(&config.state)?,
            rejects: RecordRejects::new(rejects_file("dropdir")),
            stats: DropDirStats::default(),
        }),
        SourceKind::External => Box::new(External {
            journal: journal.clone(),
            cursor,
            strict_luhn: config.input.strict_luhn,
        }),
    })
}

/// Whether a run's tracker polls the listener for what its callbacks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// A run's in-process listener: each journaled callback's news is kept until the run's next
    /// poll (every few hundred milliseconds), and no longer.
    Yes,
    /// `tsusage listen`: nothing polls it, so nothing is kept per callback once it is journaled.
    No,
}

/// The HTTP listener, in this process.
pub struct Listener {
    state: Arc<ListenerState>,
    handle: ListenerHandle,
}

impl Listener {
    /// Binds `callbacks.listen_addr` and serves until [`CallbackSource::finish`].
    pub async fn start(
        config: &Config,
        writer: Arc<super::Writer>,
        rejects_file: PathBuf,
        tracked: Tracked,
    ) -> Result<Self> {
        let intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
        let intake = match tracked {
            Tracked::Yes => intake.tell_tracker(),
            Tracked::No => intake,
        };
        let state = Arc::new(ListenerState::new(
            &config.callbacks,
            writer,
            intake,
            RecordRejects::new(rejects_file),
        )?);
        let handle = http_listener::start(&config.callbacks, state.clone()).await?;
        Ok(Listener { state, handle })
    }

    /// Stops after in-flight requests finish (at most `grace`), and reports.
    pub async fn stop(self, grace: Duration) -> Result<SourceReport> {
        self.handle.shutdown(grace).await;
        let state = self.state;
        let rejects_file = state.finish_rejects()?;
        let counts = state
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let intake = state.intake.lock().unwrap_or_else(|e| e.into_inner());
        let mut callbacks = intake.callbacks.clone();
        callbacks.journaled = counts.journaled;
        callbacks.already_journaled = counts.already_journaled;
        Ok(SourceReport {
            callbacks,
            records: intake.records.clone(),
            listener: Some(counts),
            drop_dir: None,
            rejects_file,
        })
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.handle.addr)
            .finish()
    }
}

impl CallbackSource for Listener {
    fn bound_addr(&self) -> Option<SocketAddr> {
        Some(self.handle.addr)
    }

    fn poll(&mut self) -> Polling<'_> {
        let heard = {
            let mut intake = self.state.intake.lock().unwrap_or_else(|e| e.into_inner());
            let heard = intake.take_heard();
            self.state
                .metrics
                .tracker_news_pending(intake.pending_news());
            heard
        };
        Box::pin(std::future::ready(Ok(heard)))
    }

    fn finish(self: Box<Self>) -> Finishing {
        Box::pin(self.stop(LISTENER_GRACE))
    }
}

/// A drop directory read at every poll, journaled through its own store connection.
struct DropDir {
    dir: PathBuf,
    options: DropDirOptions,
    intake: Intake,
    store: Box<dyn Store + Send>,
    rejects: RecordRejects,
    stats: DropDirStats,
}

impl CallbackSource for DropDir {
    fn poll(&mut self) -> Polling<'_> {
        let hidden = indicatif::ProgressBar::hidden();
        let polled = drop_dir::collect(
            &self.dir,
            self.options,
            &mut self.intake,
            &mut *self.store,
            &mut self.rejects,
            &hidden,
            None,
        )
        .map(|stats| {
            self.stats += stats;
            self.intake.take_heard()
        });
        Box::pin(std::future::ready(polled))
    }

    fn finish(self: Box<Self>) -> Finishing {
        let DropDir {
            intake,
            rejects,
            stats,
            ..
        } = *self;
        Box::pin(async move {
            Ok(SourceReport {
                callbacks: intake.callbacks,
                records: intake.records,
                listener: None,
                drop_dir: Some(stats),
                rejects_file: rejects.finish()?,
            })
        })
    }
}

/// A separate `tsusage listen` journals into the same store: what it journaled is read back.
struct External {
    journal: AsyncStore,
    /// The last journal id read.
    cursor: i64,
    strict_luhn: bool,
}

/// Journal rows read per call.
const JOURNAL_PAGE: usize = 10_000;

impl CallbackSource for External {
    fn poll(&mut self) -> Polling<'_> {
        Box::pin(async move {
            let mut heard = Vec::new();
            loop {
                let after = self.cursor;
                let page = self
                    .journal
                    .call(move |s| s.callbacks_since(after, JOURNAL_PAGE))
                    .await?;
                let full = page.len() == JOURNAL_PAGE;
                for entry in page {
                    self.cursor = entry.id;
                    heard.push(Heard::from_body(
                        entry.request_id,
                        &entry.body,
                        self.strict_luhn,
                    ));
                }
                if !full {
                    return Ok(heard);
                }
            }
        })
    }

    fn finish(self: Box<Self>) -> Finishing {
        Box::pin(async { Ok(SourceReport::default()) })
    }
}
