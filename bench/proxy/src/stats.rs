//! Latency percentiles from every sample (no histogram buckets): a 10 s run
//! at tens of thousands of requests per second is a few MB of `u32`s, so the
//! figures are exact rather than bucket-rounded.

use std::time::Duration;

/// Latencies in microseconds, plus what could not be measured.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    micros: Vec<u32>,
    pub errors: u64,
}

impl Samples {
    pub fn record(&mut self, latency: Duration) {
        self.micros
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        self.errors += other.errors;
    }

    pub fn summary(mut self, window: Duration) -> Summary {
        self.micros.sort_unstable();
        let secs = window.as_secs_f64();
        Summary {
            requests: self.micros.len() as u64,
            errors: self.errors,
            rps: if secs > 0.0 {
                self.micros.len() as f64 / secs
            } else {
                0.0
            },
            p50: percentile(&self.micros, 50.0),
            p90: percentile(&self.micros, 90.0),
            p99: percentile(&self.micros, 99.0),
            max: self.micros.last().copied().unwrap_or(0),
        }
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample such that
/// at least `p` % of all samples are at or below it. 0 for no samples.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One setup's result; latencies in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

/// Microseconds as milliseconds with three decimals, for the tables.
pub fn ms(micros: u32) -> String {
    format!("{:.3}", f64::from(micros) / 1000.0)
}

/// `a / b` with two decimals, or "—" when `b` is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}", a / b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), 50);
        assert_eq!(percentile(&s, 90.0), 90);
        assert_eq!(percentile(&s, 99.0), 99);
        assert_eq!(percentile(&s, 100.0), 100);
        assert_eq!(percentile(&s, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        // Ten samples: p99 is the largest, p50 the fifth.
        let s: Vec<u32> = (1..=10).map(|v| v * 10).collect();
        assert_eq!(percentile(&s, 99.0), 100);
        assert_eq!(percentile(&s, 50.0), 50);
        assert_eq!(percentile(&s, 90.0), 90);
    }

    #[test]
    fn summary_sorts_merges_and_counts() {
        let mut a = Samples::default();
        for us in [300, 100, 200] {
            a.record(Duration::from_micros(us));
        }
        let mut b = Samples::default();
        b.record(Duration::from_micros(400));
        b.errors = 2;
        a.merge(b);
        let s = a.summary(Duration::from_secs(2));
        assert_eq!(s.requests, 4);
        assert_eq!(s.errors, 2);
        assert_eq!(s.rps, 2.0);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (200, 400, 400, 400));
    }

    #[test]
    fn huge_latencies_saturate_instead_of_wrapping() {
        let mut a = Samples::default();
        a.record(Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(a.summary(Duration::from_secs(1)).max, u32::MAX);
    }

    #[test]
    fn formatting() {
        assert_eq!(ms(1234), "1.234");
        assert_eq!(ratio(3.0, 2.0), "1.50");
        assert_eq!(ratio(1.0, 0.0), "—");
    }
}
