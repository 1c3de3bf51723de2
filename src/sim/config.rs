//! The simulator's configuration: what it runs with, made from the `[sim]` section (plain data in
//! the configuration, [`SimSection`], which documents each key and its default) and checked when it
//! starts ([`SimConfig::validate`]).

use std::fmt;
use std::net::SocketAddr;

use crate::config::SimSection;
pub use crate::config::sim::CallbackMode;

use super::SimError;

/// What the simulator runs with: the `[sim]` keys, one field each ([`SimSection`] says what each
/// means and its default, which [`SimConfig::default`] takes).
///
/// `Debug` never shows `app_secret` or `password`.
#[derive(Clone)]
pub struct SimConfig {
    /// Where it serves the fake vendor API; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// The only OAuth app key accepted; `None`: any non-empty key.
    pub app_key: Option<String>,
    /// The only OAuth app secret accepted; `None`: any non-empty secret.
    pub app_secret: Option<String>,
    /// The only M2M username accepted; `None`: any non-empty username.
    pub username: Option<String>,
    /// The only M2M password accepted; `None`: any non-empty password.
    pub password: Option<String>,
    /// Account names the API knows; empty: any non-empty account name.
    pub accounts: Vec<String>,
    /// Seconds an OAuth token is valid, from its first issue.
    pub token_ttl_secs: u64,
    /// Seconds an M2M session lives without use.
    pub session_idle_ttl_secs: u64,
    /// Most devices one promo request may list.
    pub max_devices: u32,
    /// Longest promo request window, in days.
    pub max_window_days: u32,
    /// Promo requests admitted per second; 0: no throttling.
    pub rate_limit_per_sec: u32,
    /// Seconds sent in the `Retry-After` header of a 429.
    pub retry_after_secs: u64,
    /// Fraction of authenticated, admitted promo requests answered 503.
    pub error_5xx_fraction: f64,
    /// Milliseconds every promo request waits before it is answered.
    pub latency_ms: u64,
    /// Seed of the generator that decides injected faults.
    pub seed: u64,
    /// Service name whose registered URL receives usage callbacks.
    pub callback_service: String,
    /// How a request's usage records are split into callback messages.
    pub callback_mode: CallbackMode,
    /// Records per data message in `batched` mode (0 is taken as 1).
    pub callback_batch_size: u32,
    /// Milliseconds between accepting a request and the first delivery of its messages.
    pub callback_delay_ms: u64,
    /// Milliseconds between delivery attempts of a message not acknowledged with 2xx.
    pub redelivery_interval_ms: u64,
    /// Callback POSTs in flight at once, across all requests (0 is taken as 1).
    pub callback_max_in_flight: u32,
    /// Milliseconds one delivery attempt may take before it counts as failed.
    pub callback_timeout_ms: u64,
    /// Fraction of messages delivered twice.
    pub duplicate_fraction: f64,
    /// Fraction of delivery attempts lost on the way (and redelivered later).
    pub drop_fraction: f64,
    /// Fraction of usage records whose `dataUsage` is malformed.
    pub dirty_fraction: f64,
    /// Shuffle the order of a request's messages, the completion message included.
    pub reorder: bool,
}

impl From<SimSection> for SimConfig {
    fn from(section: SimSection) -> Self {
        // Destructured without `..`: a new key does not compile until the simulator takes it.
        let SimSection {
            listen_addr,
            app_key,
            app_secret,
            username,
            password,
            accounts,
            token_ttl_secs,
            session_idle_ttl_secs,
            max_devices,
            max_window_days,
            rate_limit_per_sec,
            retry_after_secs,
            error_5xx_fraction,
            latency_ms,
            seed,
            callback_service,
            callback_mode,
            callback_batch_size,
            callback_delay_ms,
            redelivery_interval_ms,
            callback_max_in_flight,
            callback_timeout_ms,
            duplicate_fraction,
            drop_fraction,
            dirty_fraction,
            reorder,
        } = section;
        SimConfig {
            listen_addr,
            app_key,
            app_secret,
            username,
            password,
            accounts,
            token_ttl_secs,
            session_idle_ttl_secs,
            max_devices,
            max_window_days,
            rate_limit_per_sec,
            retry_after_secs,
            error_5xx_fraction,
            latency_ms,
            seed,
            callback_service,
            callback_mode,
            callback_batch_size,
            callback_delay_ms,
            redelivery_interval_ms,
            callback_max_in_flight,
            callback_timeout_ms,
            duplicate_fraction,
            drop_fraction,
            dirty_fraction,
            reorder,
        }
    }
}

impl Default for SimConfig {
    /// The `[sim]` section's defaults.
    fn default() -> Self {
        SimConfig::from(SimSection::default())
    }
}

impl SimConfig {
    /// Checks what the types alone cannot: fractions within 0.0–1.0, a service name.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |key: &str, message: String| SimError::Config {
            key: format!("sim.{key}"),
            message,
        };
        for (key, value) in [
            ("error_5xx_fraction", self.error_5xx_fraction),
            ("duplicate_fraction", self.duplicate_fraction),
            ("drop_fraction", self.drop_fraction),
            ("dirty_fraction", self.dirty_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(bad(key, format!("{value} is out of range 0.0..=1.0")));
            }
        }
        if self.callback_service.trim().is_empty() {
            return Err(bad("callback_service", "must not be empty".into()));
        }
        if self.token_ttl_secs == 0 {
            return Err(bad("token_ttl_secs", "must be at least 1".into()));
        }
        if self.session_idle_ttl_secs == 0 {
            return Err(bad("session_idle_ttl_secs", "must be at least 1".into()));
        }
        Ok(())
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "[redacted]");
        f.debug_struct("SimConfig")
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
    fn the_defaults_are_the_sections_and_a_section_converts_key_by_key() {
        let default = SimConfig::default();
        assert_eq!(default.listen_addr.to_string(), "127.0.0.1:9010");
        assert_eq!(default.seed, 20_210_815);
        assert_eq!(default.callback_mode, CallbackMode::PerDevice);
        let section: SimSection = toml::from_str(
            "listen_addr = \"127.0.0.1:0\"\ncallback_mode = \"batched\"\ndrop_fraction = 0.5\n\
             password = \"pw\"\naccounts = [\"a\"]\nreorder = true\n",
        )
        .expect("valid");
        let c = SimConfig::from(section);
        assert_eq!(c.listen_addr.port(), 0);
        assert_eq!(c.callback_mode, CallbackMode::Batched);
        assert_eq!((c.drop_fraction, c.reorder), (0.5, true));
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.accounts, ["a"]);
    }

    #[test]
    fn rejects_fraction_out_of_range() {
        let c = SimConfig {
            drop_fraction: 1.5,
            ..SimConfig::default()
        };
        let err = c.validate().expect_err("out of range").to_string();
        assert!(err.contains("sim.drop_fraction"), "{err}");
    }

    #[test]
    fn debug_hides_secret_and_password() {
        let c = SimConfig {
            app_secret: Some("s3cret-app".into()),
            password: Some("s3cret-pw".into()),
            ..SimConfig::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
