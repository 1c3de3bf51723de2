//! `StateWriter`: one thread owns the store and commits what async tasks send it, many updates per
//! commit (group commit), answering each sender only once its update is durable.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::{JobUpdate, StateError, Store};

/// Updates committed together at most.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<Result<(), String>>;

/// A handle for async tasks to the store's writer thread.
#[derive(Debug)]
pub struct StateWriter<S> {
    tx: mpsc::UnboundedSender<(JobUpdate, Reply)>,
    thread: JoinHandle<S>,
    path: String,
}

impl<S: Store + Send + 'static> StateWriter<S> {
    /// Moves `store` to a writer thread. `path` names the store in errors.
    pub fn spawn(mut store: S, path: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(JobUpdate, Reply)>();
        let thread = std::thread::spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                let updates: Vec<JobUpdate> = group.iter().map(|(u, _)| u.clone()).collect();
                let result = store.apply_job_updates(&updates).map_err(|e| e.to_string());
                for (_, reply) in group {
                    let _ = reply.send(result.clone());
                }
            }
            store
        });
        StateWriter { tx, thread, path }
    }

    /// Commits `update`; returns once it is durable.
    pub async fn apply(&self, update: JobUpdate) -> Result<(), StateError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StateError::Invalid {
            path: self.path.clone(),
            message: "the state writer stopped".into(),
        };
        self.tx.send((update, reply)).map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|message| StateError::Invalid {
                path: self.path.clone(),
                message,
            })
    }

    /// Stops the writer once everything sent is committed, and gives the store back.
    pub fn finish(self) -> Result<S, StateError> {
        drop(self.tx);
        self.thread.join().map_err(|_| StateError::Invalid {
            path: self.path,
            message: "the state writer panicked".into(),
        })
    }
}
