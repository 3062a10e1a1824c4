//! Which allowed requests are recorded at `audit.samplePercent` below 100.
//!
//! Evenly, not by chance: of every 100 allowed requests the agent sees,
//! exactly `samplePercent` are recorded, spread across the hundred
//! (at 25 %: the 4th, 8th, 12th, …). A user who sets 10 % and sends 1 000
//! requests finds 100 in the collector, not "about 100"; that is what makes
//! the setting checkable, and a burst is sampled as evenly as a trickle.

use std::sync::atomic::{AtomicU64, Ordering};

/// The agent's count of allowed requests, shared by every connection.
#[derive(Debug, Default)]
pub struct AllowedSampler {
    seen: AtomicU64,
}

impl AllowedSampler {
    /// Whether the next allowed request is recorded at `percent`.
    pub fn sample(&self, percent: u32) -> bool {
        match percent {
            0 => false,
            p if p >= 100 => true,
            p => {
                let p = u64::from(p);
                let n = self.seen.fetch_add(1, Ordering::Relaxed) % 100;
                // The request that carries floor(k·p/100) past a whole number.
                (n + 1) * p / 100 > n * p / 100
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_percent_of_every_hundred_are_sampled() {
        for percent in [1, 10, 25, 33, 50, 99] {
            let sampler = AllowedSampler::default();
            for _ in 0..3 {
                let hundred = (0..100).filter(|_| sampler.sample(percent)).count();
                assert_eq!(hundred, percent as usize, "at {percent} %");
            }
        }
    }

    #[test]
    fn samples_are_spread_not_bunched() {
        let sampler = AllowedSampler::default();
        let picked: Vec<usize> = (0..100).filter(|_| sampler.sample(25)).collect();
        assert_eq!(picked.len(), 25);
        assert!(picked.windows(2).all(|w| w[1] - w[0] == 4), "{picked:?}");
    }

    #[test]
    fn none_and_all_do_not_count() {
        let sampler = AllowedSampler::default();
        assert!((0..1000).all(|_| sampler.sample(100)));
        assert!((0..1000).all(|_| !sampler.sample(0)));
        assert!((0..1000).all(|_| sampler.sample(250)));
        assert_eq!(sampler.seen.load(Ordering::Relaxed), 0);
    }
}
