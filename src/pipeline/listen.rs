//! `tsusage listen`: the callback listener as a long-running process, journaling into the shared
//! state store (for `callbacks.source = "external"`: a `tsusage run` elsewhere reads the journal).

use std::sync::Arc;
use std::time::Duration;

use super::{Outcome, conclude, rejects_dir};
use crate::Result;
use crate::collect::Writer;
use crate::collect::source::{CallbackSource, Listener, Tracked};
use crate::config::Config;
use crate::report::{RunReport, new_run_id};

/// How long in-flight requests get to finish after SIGTERM or Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves callbacks until SIGTERM or Ctrl-C, then finishes in-flight requests and reports.
pub async fn listen(config: &Config) -> Result<Outcome> {
    super::check_output(config)?;
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "listen");
    let mut store = crate::state::open(&config.state)?;
    store.begin_run(&run_id, "listen")?;
    let path = config.state.name();
    let writer = Arc::new(Writer::spawn(store, path));
    let rejects = rejects_dir(&config.output.dir).join(format!("{run_id}-callbacks.jsonl"));
    // Nothing in this process tracks jobs: a run elsewhere reads what is journaled.
    let listener = Listener::start(config, writer.clone(), rejects, Tracked::No).await?;
    tracing::info!(
        addr = %listener.bound_addr().map_or_else(String::new, |a| a.to_string()),
        "listening; SIGTERM or Ctrl-C stops after in-flight requests finish"
    );
    shutdown_signal().await;
    tracing::info!("stopping");
    let served = listener.stop(SHUTDOWN_GRACE).await?;
    report.rejects_files.extend(served.rejects_file);
    report.callbacks = Some(served.callbacks);
    report.records = Some(served.records);
    report.listener = served.listener;
    let mut store = Writer::finish_shared(writer)?;
    conclude(report, &mut *store, &config.output)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
