//! Counters of the global rate limiter, in Prometheus text format.
//!
//! `palisade_ratelimit_store_errors_total{failure_mode="open"|"closed"}`
//! counts global checks the shared store did not answer (error, timeout,
//! unsupported limit), by the failure mode that was applied instead: `open`
//! errors admitted requests unchecked, `closed` errors refused them with 429.
//! [`RateLimitMetrics::render_prometheus`] appends the samples to a
//! `/metrics` body; the admin endpoint adds them once the proxy owns a
//! `GlobalRateLimiter` (it does not yet).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use palisade_policy::wire::rate_limit::FailureMode;

#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    store_errors_open: AtomicU64,
    store_errors_closed: AtomicU64,
}

impl RateLimitMetrics {
    /// Counts one check the store did not answer, under the mode applied.
    pub fn record_store_error(&self, mode: FailureMode) {
        self.counter(mode).fetch_add(1, Ordering::Relaxed);
    }

    /// `palisade_ratelimit_store_errors_total` for one failure mode.
    pub fn store_errors(&self, mode: FailureMode) -> u64 {
        self.counter(mode).load(Ordering::Relaxed)
    }

    fn counter(&self, mode: FailureMode) -> &AtomicU64 {
        match mode {
            FailureMode::Open => &self.store_errors_open,
            // Unspecified compiles to closed (DESIGN §4: never fail open silently).
            FailureMode::Closed | FailureMode::Unspecified => &self.store_errors_closed,
        }
    }

    /// Appends the counters in Prometheus text format (version 0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        const NAME: &str = "palisade_ratelimit_store_errors_total";
        let _ = writeln!(
            out,
            "# HELP {NAME} Global rate-limit checks the shared store did not answer, by the failure mode applied instead."
        );
        let _ = writeln!(out, "# TYPE {NAME} counter");
        for (label, mode) in [("open", FailureMode::Open), ("closed", FailureMode::Closed)] {
            let _ = writeln!(
                out,
                "{NAME}{{failure_mode=\"{label}\"}} {}",
                self.store_errors(mode)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_mode_and_renders() {
        let m = RateLimitMetrics::default();
        m.record_store_error(FailureMode::Open);
        m.record_store_error(FailureMode::Closed);
        m.record_store_error(FailureMode::Closed);
        assert_eq!(m.store_errors(FailureMode::Open), 1);
        assert_eq!(m.store_errors(FailureMode::Closed), 2);
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert_eq!(
            text,
            "\
# HELP palisade_ratelimit_store_errors_total Global rate-limit checks the shared store did not answer, by the failure mode applied instead.
# TYPE palisade_ratelimit_store_errors_total counter
palisade_ratelimit_store_errors_total{failure_mode=\"open\"} 1
palisade_ratelimit_store_errors_total{failure_mode=\"closed\"} 2
"
        );
    }
}
