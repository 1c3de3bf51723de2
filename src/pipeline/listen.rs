//! `tsusage listen`: the callback listener as a long-running process, journaling into the shared
//! state store (for `callbacks.source = "external"`: a `tsusage run` elsewhere reads the journal).

use std::sync::Arc;
use std::time::Duration;

use super::{Outcome, conclude, rejects_dir};
use crate::Result;
use crate::collect::Intake;
use crate::collect::http_listener::{self, ListenerState};
use crate::config::Config;
use crate::report::{RunReport, new_run_id};
use crate::state::{StateWriter, Store};
use crate::write::rejects::RecordRejects;

/// How long in-flight requests get to finish after SIGTERM or Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves callbacks until SIGTERM or Ctrl-C, then finishes in-flight requests and reports.
pub async fn listen(config: &Config) -> Result<Outcome> {
    let run_id = new_run_id();
    let mut report = RunReport::new(&run_id, "listen");
    let mut store = crate::state::open(&config.state)?;
    store.begin_run(&run_id, "listen")?;
    let path = config.state.path.display().to_string();
    let writer = Arc::new(StateWriter::spawn(store, path));
    let intake = Intake::new(config.input.strict_luhn, config.output.partition_by);
    let rejects = RecordRejects::new(
        rejects_dir(&config.output.dir).join(format!("{run_id}-callbacks.jsonl")),
    );
    let state = Arc::new(ListenerState::new(
        &config.callbacks,
        writer.clone(),
        intake,
        rejects,
    )?);
    let handle = http_listener::start(&config.callbacks, state.clone()).await?;
    tracing::info!(addr = %handle.addr, "listening; SIGTERM or Ctrl-C stops after in-flight requests finish");
    shutdown_signal().await;
    tracing::info!("stopping");
    handle.shutdown(SHUTDOWN_GRACE).await;

    report.rejects_files.extend(state.finish_rejects()?);
    {
        let intake = state.intake.lock().unwrap_or_else(|e| e.into_inner());
        let counts = state
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut callbacks = intake.callbacks.clone();
        callbacks.journaled = counts.journaled;
        callbacks.already_journaled = counts.already_journaled;
        report.callbacks = Some(callbacks);
        report.records = Some(intake.records.clone());
        report.listener = Some(counts);
    }
    drop(state);
    let mut store = StateWriter::finish_shared(writer)?;
    conclude(report, &mut store, &config.output.dir)
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
