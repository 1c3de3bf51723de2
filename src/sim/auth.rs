//! The two tokens: OAuth bearer tokens (fixed lifetime from first issue) and M2M sessions (idle expiry,
//! lockout after five consecutive failed logins). Pure bookkeeping; the handlers turn it into HTTP.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::faults::Rng;

/// Consecutive failed logins that lock the account.
pub const LOCKOUT_AFTER_FAILURES: u32 = 5;

/// A bearer token issued to one app key.
#[derive(Debug, Clone)]
struct Issued {
    token: String,
    expires_at: Instant,
}

/// A token answer: the token and its remaining lifetime in whole seconds (rounded up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub access_token: String,
    pub expires_in: u64,
    /// False when an unexpired token was served again.
    pub new: bool,
}

/// What a login attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// A new session token.
    Ok(String),
    /// Wrong credentials; the account is not (yet) locked.
    Wrong,
    /// The account is locked, by this attempt or an earlier one.
    Locked,
}

/// Tokens, sessions and the lockout state.
#[derive(Debug)]
pub struct Auth {
    token_ttl: Duration,
    idle_ttl: Duration,
    /// Current token per app key.
    tokens: HashMap<String, Issued>,
    /// Session token → last use.
    sessions: HashMap<String, Instant>,
    consecutive_failures: u32,
    locked: bool,
}

impl Auth {
    pub fn new(token_ttl: Duration, idle_ttl: Duration) -> Auth {
        Auth {
            token_ttl,
            idle_ttl,
            tokens: HashMap::new(),
            sessions: HashMap::new(),
            consecutive_failures: 0,
            locked: false,
        }
    }

    /// The token for `app_key`: the unexpired one if there is one (early refresh does not extend it),
    /// else a new one valid `token_ttl` from now.
    pub fn grant(&mut self, app_key: &str, now: Instant, ids: &mut Rng) -> Grant {
        if let Some(issued) = self.tokens.get(app_key)
            && issued.expires_at > now
        {
            return Grant {
                access_token: issued.token.clone(),
                expires_in: secs_ceil(issued.expires_at - now),
                new: false,
            };
        }
        let token = format!("{:016x}{:016x}", ids.next_u64(), ids.next_u64());
        self.tokens.insert(
            app_key.to_owned(),
            Issued {
                token: token.clone(),
                expires_at: now + self.token_ttl,
            },
        );
        Grant {
            access_token: token,
            expires_in: self.token_ttl.as_secs(),
            new: true,
        }
    }

    /// Whether `token` is a bearer token issued here and not yet expired.
    pub fn bearer_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens
            .values()
            .any(|t| t.token == token && t.expires_at > now)
    }

    /// A login attempt whose credentials were `credentials_ok`.
    pub fn login(&mut self, credentials_ok: bool, now: Instant, ids: &mut Rng) -> Login {
        if self.locked {
            return Login::Locked;
        }
        if !credentials_ok {
            self.consecutive_failures += 1;
            if self.consecutive_failures >= LOCKOUT_AFTER_FAILURES {
                self.locked = true;
                return Login::Locked;
            }
            return Login::Wrong;
        }
        self.consecutive_failures = 0;
        let idle_ttl = self.idle_ttl;
        self.sessions
            .retain(|_, last| now.saturating_duration_since(*last) < idle_ttl);
        let session = uuid_v4(ids);
        self.sessions.insert(session.clone(), now);
        Login::Ok(session)
    }

    #[cfg(test)]
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Uses session `token` at `now`: true, and the idle timer restarts, if it is live; false if it is
    /// unknown, ended or idle past the TTL (then it is forgotten).
    pub fn use_session(&mut self, token: &str, now: Instant) -> bool {
        match self.sessions.get_mut(token) {
            Some(last) if now.saturating_duration_since(*last) < self.idle_ttl => {
                *last = now;
                true
            }
            Some(_) => {
                self.sessions.remove(token);
                false
            }
            None => false,
        }
    }

    /// Ends session `token`; false if it was not live.
    pub fn logout(&mut self, token: &str, now: Instant) -> bool {
        let live = self.use_session(token, now);
        self.sessions.remove(token);
        live
    }
}

/// A random UUID in version-4 text form (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
pub fn uuid_v4(ids: &mut Rng) -> String {
    let hi = (ids.next_u64() & !0xF000) | 0x4000;
    let lo = (ids.next_u64() & !(0xC << 60)) | (0x8 << 60);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(Duration::from_secs(3600), Duration::from_secs(1200))
    }

    #[test]
    fn token_is_served_again_until_it_expires() {
        let (mut a, mut ids, t0) = (auth(), Rng::new(1), Instant::now());
        let first = a.grant("k", t0, &mut ids);
        assert!(first.new);
        assert_eq!(first.expires_in, 3600);
        let again = a.grant("k", t0 + Duration::from_secs(600), &mut ids);
        assert_eq!(again.access_token, first.access_token);
        assert_eq!(again.expires_in, 3000);
        assert!(!again.new);
        let later = t0 + Duration::from_secs(3600);
        assert!(!a.bearer_valid(&first.access_token, later));
        assert_ne!(
            a.grant("k", later, &mut ids).access_token,
            first.access_token
        );
    }

    #[test]
    fn five_consecutive_failures_lock_and_success_resets_the_count() {
        let (mut a, mut ids, t0) = (auth(), Rng::new(1), Instant::now());
        for _ in 0..4 {
            assert_eq!(a.login(false, t0, &mut ids), Login::Wrong);
        }
        assert!(matches!(a.login(true, t0, &mut ids), Login::Ok(_)));
        for _ in 0..4 {
            assert_eq!(a.login(false, t0, &mut ids), Login::Wrong);
        }
        assert_eq!(a.login(false, t0, &mut ids), Login::Locked);
        assert_eq!(a.login(true, t0, &mut ids), Login::Locked);
        assert!(a.locked());
    }

    #[test]
    fn session_expires_after_idle_ttl_and_use_refreshes_it() {
        let (mut a, mut ids, t0) = (auth(), Rng::new(1), Instant::now());
        let Login::Ok(s) = a.login(true, t0, &mut ids) else {
            panic!("login failed");
        };
        let min = |m: u64| t0 + Duration::from_secs(60 * m);
        assert!(a.use_session(&s, min(19)));
        assert!(a.use_session(&s, min(38)));
        assert!(!a.use_session(&s, min(58)));
        assert!(!a.use_session("nope", min(58)));
    }

    #[test]
    fn uuid_has_version_4_form() {
        let id = uuid_v4(&mut Rng::new(9));
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
    }
}
