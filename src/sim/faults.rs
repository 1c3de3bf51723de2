//! Fault injection: a tiny seeded generator for fault fractions, the promo throttle, malformed values.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The malformed `dataUsage` values `dirty_fraction` substitutes, each a way real feeds go wrong.
pub const DIRTY_DATA_VALUES: &[&str] = &["", "-1", "1.5E3", "null", "1,024"];

/// One step of splitmix64: a well-mixed 64-bit function of `x`, also used as a hash finaliser.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded splitmix64 generator: reproducible fault decisions, no `rand` needed.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.state.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `fraction`: never for 0.0, always for 1.0.
    pub fn chance(&mut self, fraction: f64) -> bool {
        self.next_f64() < fraction
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// One of [`DIRTY_DATA_VALUES`].
    pub fn dirty_value(&mut self) -> &'static str {
        DIRTY_DATA_VALUES[self.below(DIRTY_DATA_VALUES.len())]
    }
}

/// The promo throttle: a sliding one-second window. A request is admitted when fewer than `limit`
/// requests were admitted in the second before it; rejected requests do not count. So no one-second
/// interval ever holds more than `limit` admitted requests.
#[derive(Debug)]
pub struct RateLimiter {
    limit: usize,
    admitted: VecDeque<Instant>,
}

/// The throttle's window.
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl RateLimiter {
    /// `limit` requests per second; 0 admits everything.
    pub fn new(limit: u32) -> RateLimiter {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        RateLimiter {
            limit,
            admitted: VecDeque::with_capacity(limit.min(4096)),
        }
    }

    /// Whether a request arriving at `now` is admitted (and if so, counts it).
    pub fn admit(&mut self, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        while let Some(&oldest) = self.admitted.front() {
            if now.saturating_duration_since(oldest) >= RATE_WINDOW {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        if self.admitted.len() < self.limit {
            self.admitted.push_back(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_decisions() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
    }

    #[test]
    fn chance_zero_never_one_always() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| !r.chance(0.0)));
        assert!((0..10_000).all(|_| r.chance(1.0)));
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2200..=2800).contains(&hits), "{hits}");
    }

    #[test]
    fn shuffle_keeps_every_item() {
        let mut items: Vec<u32> = (0..50).collect();
        Rng::new(3).shuffle(&mut items);
        assert_ne!(items, (0..50).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn throttle_admits_limit_per_sliding_second() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(3);
        let ms = |m| t0 + Duration::from_millis(m);
        assert!(rl.admit(ms(0)) && rl.admit(ms(100)) && rl.admit(ms(900)));
        assert!(!rl.admit(ms(950)));
        assert!(rl.admit(ms(1000)));
        assert!(!rl.admit(ms(1099)));
        assert!(rl.admit(ms(1100)));
        assert!(RateLimiter::new(0).admit(ms(0)));
    }
}
