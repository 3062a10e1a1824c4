//! Jittered exponential backoff for failed certificate requests, so a fleet of
//! agents does not retry an operator that just came back in lock step.

use std::time::Duration;

use rand::Rng;

/// Attempt `n` (from 0) waits a random time in `[d/2, d]`, `d = min(max, initial·2ⁿ)`
/// ("equal jitter"): never shorter than half the exponential step, so delays
/// still grow, and never longer than `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// Failures since the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The upper bound for the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        // 2^20 × any sane initial exceeds any sane max; stop doubling there.
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_nanos =
            rng.random_range(0..=(ceiling - half).as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_caps() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let mut last = Duration::ZERO;
        for step in 0..10u32 {
            let ceiling = ms(100).saturating_mul(1 << step).min(ms(1000));
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "step {step}: {d:?}");
            assert!(
                d >= last || ceiling == ms(1000),
                "step {step}: {d:?} < {last:?}"
            );
            last = d;
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "{seen:?}");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(300));
        }
    }
}
