//! `StateWriter`: one thread owns the store and commits what async tasks send it, many operations per
//! commit (group commit), answering each sender only once its operation is durable.
//!
//! This is how the listener keeps "acknowledged means durable" at speed: a hundred concurrent
//! callbacks share one fsync instead of paying one each.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::{JobUpdate, Journaled, NewCallback, StateError, Store};

/// Operations committed together at most.
const MAX_GROUP: usize = 1024;
/// Operations waiting for the writer at most: senders wait beyond it (back-pressure on the listener
/// and the submitters when the disk is slow, instead of memory growing).
const QUEUE: usize = 4 * MAX_GROUP;

/// What the writer journals: anything that gives the journal's view of a callback.
pub trait Journalable: Send + 'static {
    fn as_new(&self) -> NewCallback<'_>;
}

/// Called on the writer thread after each commit that journaled callbacks, with the group's
/// callbacks in journal order, what the journal did with each, and the commit's time (µs). The
/// store is there to read what the hook needs. A stage that keeps what it journals (collect keeps
/// the rows of a run) does it here, in the journal's order, without the writer knowing.
pub type AfterCommit<P> = Box<dyn FnMut(&dyn Store, &[(P, Journaled)], i64) + Send>;

enum Op<P> {
    Job(JobUpdate, oneshot::Sender<Result<(), String>>),
    /// A callback, its body compressed for a row (by the sender), and when it was received.
    Journal(
        P,
        (Vec<u8>, &'static str),
        i64,
        oneshot::Sender<Result<Journaled, String>>,
    ),
    /// Asks the store whether it answers ([`Store::ping`]), after the group's commits.
    Ping(oneshot::Sender<Result<(), String>>),
}

/// A handle for async tasks to the store's writer thread, journaling callbacks of type `P`.
#[derive(Debug)]
pub struct StateWriter<P> {
    tx: mpsc::Sender<Op<P>>,
    thread: JoinHandle<Box<dyn Store + Send>>,
    path: String,
}

impl<P> std::fmt::Debug for Op<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Job(u, _) => write!(f, "Job({u:?})"),
            Op::Journal(..) => write!(f, "Journal"),
            Op::Ping(_) => write!(f, "Ping"),
        }
    }
}

impl<P: Journalable> StateWriter<P> {
    /// Moves `store` to a writer thread. `path` names the store in errors.
    pub fn spawn(store: Box<dyn Store + Send>, path: String) -> Self {
        Self::spawn_with(store, path, None)
    }

    /// Like [`StateWriter::spawn`], calling `after` after each commit that journaled callbacks.
    pub fn spawn_with(
        mut store: Box<dyn Store + Send>,
        path: String,
        mut after: Option<AfterCommit<P>>,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Op<P>>(QUEUE);
        let thread = std::thread::spawn(move || {
            let mut last_received_at = 0i64;
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                commit_group(&mut *store, group, after.as_mut(), &mut last_received_at);
            }
            store
        });
        StateWriter { tx, thread, path }
    }

    fn gone(&self) -> StateError {
        StateError::Invalid {
            path: self.path.clone(),
            message: "the state writer stopped".into(),
        }
    }

    fn failed(&self, message: String) -> StateError {
        StateError::Invalid {
            path: self.path.clone(),
            message,
        }
    }

    /// Sends the operation `op` makes with its reply channel; returns where its answer comes.
    async fn send<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Op<P>,
    ) -> Result<oneshot::Receiver<Result<T, String>>, StateError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(op(reply)).await.map_err(|_| self.gone())?;
        Ok(answer)
    }

    /// Waits for an operation's answer: once it is committed, or failed.
    async fn answer<T>(
        &self,
        answer: oneshot::Receiver<Result<T, String>>,
    ) -> Result<T, StateError> {
        answer
            .await
            .map_err(|_| self.gone())?
            .map_err(|m| self.failed(m))
    }

    /// Commits `update`; returns once it is durable.
    pub async fn apply(&self, update: JobUpdate) -> Result<(), StateError> {
        let answer = self.send(|reply| Op::Job(update, reply)).await?;
        self.answer(answer).await
    }

    /// Commits every update (in as few commits as the writer groups them); returns once all are
    /// durable.
    pub async fn apply_all(&self, updates: Vec<JobUpdate>) -> Result<(), StateError> {
        let mut answers = Vec::with_capacity(updates.len());
        for update in updates {
            answers.push(self.send(|reply| Op::Job(update, reply)).await?);
        }
        for answer in answers {
            self.answer(answer).await?;
        }
        Ok(())
    }

    /// Journals one callback received at `received_at` (µs); returns once it is durable.
    pub async fn journal(&self, callback: P, received_at: i64) -> Result<Journaled, StateError> {
        // Compressed here, in the caller's task: callers run in parallel, the writer is one thread.
        let encoded = super::encode_body(callback.as_new().body);
        let answer = self
            .send(|reply| Op::Journal(callback, encoded, received_at, reply))
            .await?;
        self.answer(answer).await
    }

    /// Whether the writer thread is alive and its store answers ([`Store::ping`]). It waits behind
    /// what is queued before it, as a callback would: a writer stuck on a slow disk is not ready.
    pub async fn ping(&self) -> Result<(), StateError> {
        let answer = self.send(Op::Ping).await?;
        self.answer(answer).await
    }

    /// [`StateWriter::finish`] for a writer shared with tasks that have all ended.
    pub fn finish_shared(
        writer: std::sync::Arc<Self>,
    ) -> Result<Box<dyn Store + Send>, StateError> {
        match std::sync::Arc::try_unwrap(writer) {
            Ok(writer) => writer.finish(),
            Err(shared) => Err(StateError::Invalid {
                path: shared.path.clone(),
                message: "the state writer is still in use".into(),
            }),
        }
    }

    /// Stops the writer once everything sent is committed, and gives the store back.
    pub fn finish(self) -> Result<Box<dyn Store + Send>, StateError> {
        drop(self.tx);
        self.thread.join().map_err(|_| StateError::Invalid {
            path: self.path,
            message: "the state writer panicked".into(),
        })
    }
}

/// One commit for the group's callbacks, one for its job updates; each sender gets its answer.
fn commit_group<P: Journalable>(
    store: &mut dyn Store,
    group: Vec<Op<P>>,
    after: Option<&mut AfterCommit<P>>,
    last_received_at: &mut i64,
) {
    let mut updates = Vec::new();
    let mut update_replies = Vec::new();
    let mut journal = Vec::new();
    let mut journal_replies = Vec::new();
    let mut pings = Vec::new();
    for op in group {
        match op {
            Op::Job(update, reply) => {
                updates.push(update);
                update_replies.push(reply);
            }
            Op::Journal(prepared, encoded, received_at, reply) => {
                journal.push((prepared, encoded, received_at));
                journal_replies.push(reply);
            }
            Op::Ping(reply) => pings.push(reply),
        }
    }
    if !journal.is_empty() {
        // One received_at per commit: the latest of the group, never before the previous commit's,
        // so that order of arrival is kept and agrees with the journal's order.
        let received_at = journal
            .iter()
            .map(|(_, _, t)| *t)
            .max()
            .unwrap_or_default()
            .max(*last_received_at);
        *last_received_at = received_at;
        let batch: Vec<NewCallback<'_>> = journal
            .iter()
            .map(|(p, (body, encoding), _)| NewCallback {
                encoded: Some((body, encoding)),
                ..p.as_new()
            })
            .collect();
        let journaled = store.journal(&batch, received_at);
        drop(batch);
        match journaled {
            Ok(outcomes) => {
                for (reply, outcome) in journal_replies.into_iter().zip(&outcomes) {
                    let _ = reply.send(Ok(*outcome));
                }
                if let Some(after) = after {
                    let done: Vec<(P, Journaled)> = journal
                        .into_iter()
                        .map(|(p, _, _)| p)
                        .zip(outcomes)
                        .collect();
                    after(store, &done, received_at);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in journal_replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
    if !updates.is_empty() {
        let result = store.apply_job_updates(&updates).map_err(|e| e.to_string());
        for reply in update_replies {
            let _ = reply.send(result.clone());
        }
    }
    if !pings.is_empty() {
        let result = store.ping().map_err(|e| e.to_string());
        for reply in pings {
            let _ = reply.send(result.clone());
        }
    }
}
