//! Identity status other parts of the agent read without locking: readiness
//! (for `/readyz`) and the time left on the current certificate (for `/metrics`).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// False until the first certificate is installed; never goes back, because
/// a still-valid certificate keeps serving while renewals fail.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The current certificate's NotAfter; seconds to expiry are computed when read
/// so the value is never stale. Negative once expired.
#[derive(Debug)]
pub struct ExpiryGauge {
    not_after_unix: AtomicI64,
}

const NONE: i64 = i64::MIN;

impl Default for ExpiryGauge {
    fn default() -> Self {
        Self {
            not_after_unix: AtomicI64::new(NONE),
        }
    }
}

impl ExpiryGauge {
    pub(crate) fn set_not_after(&self, unix: i64) {
        self.not_after_unix.store(unix, Ordering::Release);
    }

    pub fn not_after_unix(&self) -> Option<i64> {
        match self.not_after_unix.load(Ordering::Acquire) {
            NONE => None,
            t => Some(t),
        }
    }

    /// `None` before the first certificate.
    pub fn seconds_to_expiry_at(&self, now_unix: i64) -> Option<i64> {
        self.not_after_unix().map(|t| t.saturating_sub(now_unix))
    }

    pub fn seconds_to_expiry(&self) -> Option<i64> {
        self.seconds_to_expiry_at(unix_now())
    }
}

pub(crate) fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_counts_down_and_goes_negative() {
        let g = ExpiryGauge::default();
        assert_eq!(g.seconds_to_expiry_at(100), None);
        g.set_not_after(130);
        assert_eq!(g.seconds_to_expiry_at(100), Some(30));
        assert_eq!(g.seconds_to_expiry_at(140), Some(-10));
    }

    #[test]
    fn readiness_latches() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        r.set_ready();
        assert!(r.is_ready());
    }
}
