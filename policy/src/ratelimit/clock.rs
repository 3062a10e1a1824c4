//! Conversions between the caller's `Duration` timestamps and the `u64`
//! nanosecond arithmetic used inside. Saturating, so no input can panic.

use std::time::Duration;

/// Nanoseconds since the caller's arbitrary monotonic epoch.
pub(crate) type Nanos = u64;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Timestamps past ~584 years saturate: time then stands still, which only
/// ever withholds refills (fails closed) rather than granting them.
pub(crate) fn to_nanos(duration: Duration) -> Nanos {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Accepts `u128` so that waits computed past `u64` nanoseconds (a huge burst
/// refilled slowly) are reported instead of wrapping.
pub(crate) fn from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 1e9, so it always fits in u32.
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// Saturating `Nanos` from a wider intermediate.
pub(crate) fn clamp_nanos(nanos: u128) -> Nanos {
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate_instead_of_panicking() {
        assert_eq!(to_nanos(Duration::MAX), u64::MAX);
        assert_eq!(to_nanos(Duration::from_millis(1)), 1_000_000);
        assert_eq!(from_nanos(u128::MAX).as_secs(), u64::MAX);
        assert_eq!(from_nanos(1_500_000_000), Duration::from_millis(1500));
        assert_eq!(clamp_nanos(u128::MAX), u64::MAX);
    }
}
