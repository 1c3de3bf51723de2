//! [`AsyncStore`]: the store for async code. Each call runs on tokio's blocking pool, so a slow
//! store (a PostgreSQL round trip, an fsync) never stalls the tasks that serve callbacks or send
//! requests on the runtime's few worker threads.
//!
//! Commands use the store directly where nothing else runs (opening a run, planning, writing
//! partitions) and through this facade, or the [`super::StateWriter`] thread, while the listener
//! and the submissions are live.

use std::sync::{Arc, Mutex};

use super::{StateError, Store};

/// A store shared by async tasks; calls are serialized and run off the runtime's worker threads.
#[derive(Clone)]
pub struct AsyncStore {
    inner: Arc<Mutex<Box<dyn Store + Send>>>,
    /// Names the store in errors.
    name: String,
}

impl std::fmt::Debug for AsyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncStore")
            .field("name", &self.name)
            .finish()
    }
}

impl AsyncStore {
    pub fn new(store: Box<dyn Store + Send>, name: impl Into<String>) -> Self {
        AsyncStore {
            inner: Arc::new(Mutex::new(store)),
            name: name.into(),
        }
    }

    /// Runs `f` with the store on the blocking pool, and returns what it returns.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StateError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StateError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut **store)
        })
        .await
        .map_err(|e| StateError::Invalid {
            path: self.name.clone(),
            message: format!("a store call failed: {e}"),
        })?
    }
}
