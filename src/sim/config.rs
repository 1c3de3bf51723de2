//! The simulator's configuration: the `[sim]` section itself ([`SimSection`], plain data in the
//! configuration, which declares, documents and defaults each key once), checked when the simulator
//! starts ([`SimSection::validate`]).

use crate::config::SimSection;
pub use crate::config::sim::CallbackMode;

use super::SimError;

/// What the simulator runs with: the `[sim]` section itself (a key is declared, documented and
/// defaulted once, in the configuration).
pub type SimConfig = SimSection;

impl SimSection {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_sections_and_a_section_reads_key_by_key() {
        let default = SimConfig::default();
        assert_eq!(default.listen_addr.to_string(), "127.0.0.1:9010");
        assert_eq!(default.seed, 20_210_815);
        assert_eq!(default.callback_mode, CallbackMode::PerDevice);
        let c: SimConfig = toml::from_str(
            "listen_addr = \"127.0.0.1:0\"\ncallback_mode = \"batched\"\ndrop_fraction = 0.5\n\
             password = \"pw\"\naccounts = [\"a\"]\nreorder = true\n",
        )
        .expect("valid");
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
}
