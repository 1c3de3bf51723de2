//! `[sim]`: the built-in simulator's section, as plain data: where it listens, what it accepts, and
//! which faults it injects, with each key's default. The simulator converts it into its own
//! configuration and checks the values the types alone cannot when it starts.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::parse_default_addr;

/// Default `sim.listen_addr`.
pub const DEFAULT_SIM_LISTEN_ADDR: &str = "127.0.0.1:9010";
/// Default `sim.token_ttl_secs`: the vendor's OAuth tokens live one hour from first issue.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// Default `sim.session_idle_ttl_secs`: the vendor's M2M sessions end after 20 minutes without use.
pub const DEFAULT_SESSION_IDLE_TTL_SECS: u64 = 1200;
/// Default `sim.max_devices`: the largest device list one promo request may carry.
pub const DEFAULT_MAX_DEVICES: u32 = 10_000;
/// Default `sim.max_window_days`: the sibling aggregate endpoint allows one month.
pub const DEFAULT_MAX_WINDOW_DAYS: u32 = 31;
/// Default `sim.rate_limit_per_sec`: 0, no throttling.
pub const DEFAULT_RATE_LIMIT_PER_SEC: u32 = 0;
/// Default `sim.retry_after_secs`: what a 429 tells the client to wait.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// Default `sim.error_5xx_fraction`: no injected 503s.
pub const DEFAULT_ERROR_5XX_FRACTION: f64 = 0.0;
/// Default `sim.latency_ms`: answer at once.
pub const DEFAULT_LATENCY_MS: u64 = 0;
/// Default `sim.seed`: fixed, so two runs with the same configuration inject the same faults.
pub const DEFAULT_SEED: u64 = 20_210_815;
/// Default `sim.callback_service`: the service name usage results are delivered for.
pub const DEFAULT_CALLBACK_SERVICE: &str = "DeviceUsage";
/// Default `sim.callback_batch_size`: records per data message in `batched` mode.
pub const DEFAULT_CALLBACK_BATCH_SIZE: u32 = 100;
/// Default `sim.callback_delay_ms`: deliver as soon as a request is accepted.
pub const DEFAULT_CALLBACK_DELAY_MS: u64 = 0;
/// Default `sim.redelivery_interval_ms`: the vendor re-sends about every 5 minutes.
pub const DEFAULT_REDELIVERY_INTERVAL_MS: u64 = 300_000;
/// Default `sim.callback_max_in_flight`: concurrent callback POSTs.
pub const DEFAULT_CALLBACK_MAX_IN_FLIGHT: u32 = 16;
/// Default `sim.callback_timeout_ms`: one delivery attempt that takes longer has failed.
pub const DEFAULT_CALLBACK_TIMEOUT_MS: u64 = 10_000;
/// Default `sim.duplicate_fraction`, `sim.drop_fraction`, `sim.dirty_fraction`: no such faults.
pub const DEFAULT_CALLBACK_FAULT_FRACTION: f64 = 0.0;

/// How a request's usage records are split into callback messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackMode {
    /// One data message per device: what the vendor does.
    PerDevice,
    /// Up to `callback_batch_size` records per data message.
    Batched,
}

/// `[sim]`: the built-in simulator, as the file and the environment give it; the simulator makes
/// its own configuration from it.
///
/// Credentials (`app_key`, `app_secret`, `username`, `password`) are optional: when unset any non-empty
/// value is accepted, when set only that value. `Debug` never shows `app_secret` or `password`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSection {
    /// Where `tsusage sim` serves the fake vendor API (base URL `http://ADDR/api`); port 0 picks a free
    /// port. Default `127.0.0.1:9010`.
    pub listen_addr: SocketAddr,
    /// The OAuth app key the token endpoint accepts. Default: unset, any non-empty key.
    pub app_key: Option<String>,
    /// The OAuth app secret the token endpoint accepts. Default: unset, any non-empty secret.
    pub app_secret: Option<String>,
    /// The M2M username login accepts. Default: unset, any non-empty username.
    pub username: Option<String>,
    /// The M2M password login accepts. Default: unset, any non-empty password.
    pub password: Option<String>,
    /// Account names the API knows; others get `REQUEST_FAILED.AccountNotFound`. Default: empty, any
    /// non-empty account name is known.
    pub accounts: Vec<String>,
    /// Seconds an OAuth token is valid, counted from its first issue. Default 3600.
    pub token_ttl_secs: u64,
    /// Seconds an M2M session lives without use; each use restarts the count. Default 1200.
    pub session_idle_ttl_secs: u64,
    /// Most devices one promo request may list (`INPUT_INVALID.NumberofDevices` above). Default 10000.
    pub max_devices: u32,
    /// Longest promo request window, in days (`INPUT_INVALID.Date.RangeExceeded` above). Default 31.
    pub max_window_days: u32,
    /// Promo requests admitted per second, over a sliding one-second window; the rest get 429 with
    /// gateway fault 900800. 0 turns throttling off. Default 0.
    pub rate_limit_per_sec: u32,
    /// Seconds sent in the `Retry-After` header of a 429. Default 1.
    pub retry_after_secs: u64,
    /// Fraction (0.0–1.0) of authenticated, admitted promo requests answered 503. Default 0.0.
    pub error_5xx_fraction: f64,
    /// Milliseconds every promo request waits before it is answered. Default 0.
    pub latency_ms: u64,
    /// Seed of the generator that decides injected faults, so runs are reproducible. Default 20210815.
    pub seed: u64,
    /// Service name whose registered URL receives usage callbacks. Default `DeviceUsage`.
    pub callback_service: String,
    /// `per_device` (one data message per device, the vendor's way) or `batched`. Default `per_device`.
    pub callback_mode: CallbackMode,
    /// Records per data message in `batched` mode (0 is taken as 1). Default 100.
    pub callback_batch_size: u32,
    /// Milliseconds between accepting a request and the first delivery of its messages. Default 0.
    pub callback_delay_ms: u64,
    /// Milliseconds between delivery attempts of a message the receiver did not acknowledge with 2xx
    /// (the vendor: about 5 minutes). Default 300000.
    pub redelivery_interval_ms: u64,
    /// Callback POSTs in flight at once, across all requests (0 is taken as 1). Default 16.
    pub callback_max_in_flight: u32,
    /// Milliseconds one delivery attempt may take before it counts as failed. Default 10000.
    pub callback_timeout_ms: u64,
    /// Fraction (0.0–1.0) of messages delivered twice, the copy with the same `callbackCount`.
    /// Default 0.0.
    pub duplicate_fraction: f64,
    /// Fraction (0.0–1.0) of delivery attempts lost on the way. A lost attempt is not
    /// acknowledged, so it is redelivered after `redelivery_interval_ms` with a higher
    /// `callbackCount`; 1.0 loses all four attempts. Default 0.0.
    pub drop_fraction: f64,
    /// Fraction (0.0–1.0) of usage records whose `dataUsage` is replaced by a malformed value
    /// (`""`, `"-1"`, `"1.5E3"`, `"null"`, `"1,024"`). Default 0.0.
    pub dirty_fraction: f64,
    /// Shuffle the order of a request's messages, the completion message included. Default false:
    /// data messages first, the completion message after each of them had its first attempt.
    pub reorder: bool,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            listen_addr: parse_default_addr(DEFAULT_SIM_LISTEN_ADDR),
            app_key: None,
            app_secret: None,
            username: None,
            password: None,
            accounts: Vec::new(),
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            session_idle_ttl_secs: DEFAULT_SESSION_IDLE_TTL_SECS,
            max_devices: DEFAULT_MAX_DEVICES,
            max_window_days: DEFAULT_MAX_WINDOW_DAYS,
            rate_limit_per_sec: DEFAULT_RATE_LIMIT_PER_SEC,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            error_5xx_fraction: DEFAULT_ERROR_5XX_FRACTION,
            latency_ms: DEFAULT_LATENCY_MS,
            seed: DEFAULT_SEED,
            callback_service: DEFAULT_CALLBACK_SERVICE.to_owned(),
            callback_mode: CallbackMode::PerDevice,
            callback_batch_size: DEFAULT_CALLBACK_BATCH_SIZE,
            callback_delay_ms: DEFAULT_CALLBACK_DELAY_MS,
            redelivery_interval_ms: DEFAULT_REDELIVERY_INTERVAL_MS,
            callback_max_in_flight: DEFAULT_CALLBACK_MAX_IN_FLIGHT,
            callback_timeout_ms: DEFAULT_CALLBACK_TIMEOUT_MS,
            duplicate_fraction: DEFAULT_CALLBACK_FAULT_FRACTION,
            drop_fraction: DEFAULT_CALLBACK_FAULT_FRACTION,
            dirty_fraction: DEFAULT_CALLBACK_FAULT_FRACTION,
            reorder: false,
        }
    }
}

impl fmt::Debug for SimSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "[redacted]");
        f.debug_struct("SimSection")
            .field("listen_addr", &self.listen_addr)
            .field("app_key", &self.app_key)
            .field("app_secret", &redacted(&self.app_secret))
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("accounts", &self.accounts)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("session_idle_ttl_secs", &self.session_idle_ttl_secs)
            .field("max_devices", &self.max_devices)
            .field("max_window_days", &self.max_window_days)
            .field("rate_limit_per_sec", &self.rate_limit_per_sec)
            .field("retry_after_secs", &self.retry_after_secs)
            .field("error_5xx_fraction", &self.error_5xx_fraction)
            .field("latency_ms", &self.latency_ms)
            .field("seed", &self.seed)
            .field("callback_service", &self.callback_service)
            .field("callback_mode", &self.callback_mode)
            .field("callback_batch_size", &self.callback_batch_size)
            .field("callback_delay_ms", &self.callback_delay_ms)
            .field("redelivery_interval_ms", &self.redelivery_interval_ms)
            .field("callback_max_in_flight", &self.callback_max_in_flight)
            .field("callback_timeout_ms", &self.callback_timeout_ms)
            .field("duplicate_fraction", &self.duplicate_fraction)
            .field("drop_fraction", &self.drop_fraction)
            .field("dirty_fraction", &self.dirty_fraction)
            .field("reorder", &self.reorder)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serialize_to_toml_for_env_overrides() {
        let table = toml::Table::try_from(SimSection::default()).expect("serializable defaults");
        assert_eq!(
            table.get("seed").and_then(toml::Value::as_integer),
            Some(20_210_815)
        );
        assert_eq!(
            table.get("callback_mode").and_then(toml::Value::as_str),
            Some("per_device")
        );
        assert!(
            table
                .get("drop_fraction")
                .is_some_and(toml::Value::is_float)
        );
        assert!(!table.contains_key("password"));
    }

    #[test]
    fn parses_from_toml_and_rejects_unknown_keys() {
        let c: SimSection =
            toml::from_str("listen_addr = \"127.0.0.1:0\"\ncallback_mode = \"batched\"\n")
                .expect("valid");
        assert_eq!(c.callback_mode, CallbackMode::Batched);
        assert_eq!(c.max_devices, DEFAULT_MAX_DEVICES);
        assert!(toml::from_str::<SimSection>("latency = 5\n").is_err());
    }

    #[test]
    fn sim_keys_load_from_the_file_and_the_environment() {
        let text = "account_name = \"a\"\n[output]\ndir = \"out\"\n[state]\npath = \"s.db\"\n\
                    [sim]\nlisten_addr = \"127.0.0.1:0\"\ndrop_fraction = 0.5\n";
        let env = [
            ("TSUSAGE_SIM__LATENCY_MS", "25"),
            ("TSUSAGE_SIM__REORDER", "true"),
            ("TSUSAGE_SIM__DUPLICATE_FRACTION", "0.25"),
            ("TSUSAGE_SIM__PASSWORD", "pw"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = crate::config::Config::from_toml_str(text, std::path::Path::new("t.toml"), env)
            .expect("valid config");
        assert_eq!(c.sim.listen_addr.port(), 0);
        assert_eq!((c.sim.latency_ms, c.sim.reorder), (25, true));
        assert_eq!((c.sim.drop_fraction, c.sim.duplicate_fraction), (0.5, 0.25));
        assert_eq!(c.sim.password.as_deref(), Some("pw"));
    }

    #[test]
    fn debug_hides_secret_and_password() {
        let c = SimSection {
            app_secret: Some("s3cret-app".into()),
            password: Some("s3cret-pw".into()),
            ..SimSection::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
