//! `run --simulate`: the built-in simulator in-process on a free loopback port, and the run pointed at
//! it. Nothing else changes: the run takes the production path (OAuth, session, registration,
//! rate-limited submission, the HTTP listener, the journal).

use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use crate::Result;
use crate::config::{CallbackSource, Config, Secret};
use crate::sim::{self, SimConfig, SimHandle};

/// Redelivery interval of the in-process simulator: the vendor's ~5 minutes would make a demo run wait.
pub const SIM_REDELIVERY_MS: u64 = 500;
/// `callbacks.settle_secs` in a simulated run: several redelivery intervals.
pub const SIM_SETTLE_SECS: u64 = 2;
/// `callbacks.deadline_secs` at most in a simulated run.
pub const SIM_DEADLINE_SECS: u64 = 30;

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A throwaway secret for this process.
fn fresh_secret(label: &str) -> Secret {
    let mut hash = Sha256::new();
    hash.update(label.as_bytes());
    hash.update(std::process::id().to_le_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hash.update(nanos.to_le_bytes());
    Secret::new(
        hash.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
}

/// Starts the simulator from `[sim]` and rewrites `config` to use it and, unless the callbacks source
/// is `external`, an in-process listener on a free port (`callbacks.public_url` is set once the
/// listener is bound).
pub async fn start(config: &mut Config) -> Result<SimHandle> {
    let mut sim_config: SimConfig = config.sim.clone();
    sim_config.listen_addr = loopback_any_port();
    sim_config.redelivery_interval_ms = sim_config.redelivery_interval_ms.min(SIM_REDELIVERY_MS);
    let credential = |fixed: &Option<String>, label: &str| match fixed {
        Some(value) => Secret::new(value.clone()),
        None => fresh_secret(label),
    };
    config.api.app_key = Some(credential(&sim_config.app_key, "app_key"));
    config.api.app_secret = Some(credential(&sim_config.app_secret, "app_secret"));
    config.api.username = Some(credential(&sim_config.username, "username"));
    config.api.password = Some(credential(&sim_config.password, "password"));
    let handle = sim::start(sim_config).await?;
    config.api.base_url = handle.base_url();
    let callbacks = &mut config.callbacks;
    if callbacks.source != CallbackSource::External {
        // An in-process listener on a free port; with "external", a separate `tsusage listen`
        // at callbacks.public_url receives them, with the credentials from the environment.
        callbacks.source = CallbackSource::Listener;
        callbacks.listen_addr = loopback_any_port();
    }
    if callbacks.username.is_none() || callbacks.password.is_none() {
        callbacks.username = Some(fresh_secret("callback user"));
        callbacks.password = Some(fresh_secret("callback password"));
    }
    callbacks.settle_secs = SIM_SETTLE_SECS;
    callbacks.deadline_secs = callbacks.deadline_secs.min(SIM_DEADLINE_SECS);
    tracing::info!(base_url = %handle.base_url(), "simulator started in-process");
    Ok(handle)
}
