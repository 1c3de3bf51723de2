//! The built-in ThingSpace simulator: the vendor's API over real HTTP on loopback, with fault injection.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{DEFAULT_SIM_LISTEN_ADDR, parse_default_addr};

/// `[sim]`: the built-in simulator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Where `tsusage sim` serves the fake vendor API (base URL `http://ADDR/api`).
    pub listen_addr: SocketAddr,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen_addr: parse_default_addr(DEFAULT_SIM_LISTEN_ADDR),
        }
    }
}
