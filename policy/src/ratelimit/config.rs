//! What a limit is configured with, and which configurations are refused.

use std::time::Duration;

/// Which counting scheme a limiter uses. `docs/rate-limiting.md` compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Continuous refill of `amount` tokens per `period`, up to `burst` tokens.
    TokenBucket,
    /// `amount` requests per window; windows are aligned to multiples of `period`.
    FixedWindow,
    /// Sliding-window counter: the current fixed window plus the previous one,
    /// weighted by how much of it still overlaps the trailing `period`.
    SlidingWindow,
}

/// One rate limit, applied independently to every key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitConfig {
    pub algorithm: Algorithm,
    /// Requests admitted per period (token bucket: tokens refilled per period).
    pub amount: u64,
    pub period: Duration,
    /// Token bucket capacity; 0 means `amount`. Ignored by the window algorithms.
    pub burst: u64,
    /// Cap on distinct keys tracked at once, across all shards.
    pub max_keys: usize,
}

/// Shortest accepted period: below this, timer granularity dominates the limit.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

/// Longest accepted period: time is kept as `u64` nanoseconds (about 584 years).
pub const MAX_PERIOD: Duration = Duration::from_nanos(u64::MAX);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitConfigError {
    #[error("rate limit amount must be at least 1 request per period")]
    ZeroAmount,
    #[error("rate limit period {period:?} is shorter than the minimum {minimum:?}")]
    PeriodTooShort { period: Duration, minimum: Duration },
    #[error("rate limit period {period:?} is longer than the maximum {maximum:?}")]
    PeriodTooLong { period: Duration, maximum: Duration },
    #[error("rate limit max_keys must be at least 1")]
    ZeroMaxKeys,
}

impl LimitConfig {
    /// Checks every field, so the algorithms may rely on `amount >= 1` and a
    /// period of at least 1 ms that fits in `u64` nanoseconds.
    pub fn validate(&self) -> Result<(), RateLimitConfigError> {
        if self.amount == 0 {
            return Err(RateLimitConfigError::ZeroAmount);
        }
        if self.period < MIN_PERIOD {
            return Err(RateLimitConfigError::PeriodTooShort {
                period: self.period,
                minimum: MIN_PERIOD,
            });
        }
        if self.period > MAX_PERIOD {
            return Err(RateLimitConfigError::PeriodTooLong {
                period: self.period,
                maximum: MAX_PERIOD,
            });
        }
        if self.max_keys == 0 {
            return Err(RateLimitConfigError::ZeroMaxKeys);
        }
        Ok(())
    }

    /// Token bucket capacity: `burst`, or `amount` when `burst` is 0.
    pub fn bucket_capacity(&self) -> u64 {
        if self.burst == 0 {
            self.amount
        } else {
            self.burst
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> LimitConfig {
        LimitConfig {
            algorithm: Algorithm::TokenBucket,
            amount: 10,
            period: Duration::from_secs(1),
            burst: 0,
            max_keys: 100,
        }
    }

    #[test]
    fn accepts_a_sane_config() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn rejects_each_invalid_field() {
        let zero_amount = LimitConfig {
            amount: 0,
            ..valid()
        };
        assert_eq!(
            zero_amount.validate(),
            Err(RateLimitConfigError::ZeroAmount)
        );

        for period in [Duration::ZERO, Duration::from_micros(999)] {
            let short = LimitConfig { period, ..valid() };
            assert_eq!(
                short.validate(),
                Err(RateLimitConfigError::PeriodTooShort {
                    period,
                    minimum: MIN_PERIOD
                })
            );
        }
        let period = Duration::MAX;
        let long = LimitConfig { period, ..valid() };
        assert_eq!(
            long.validate(),
            Err(RateLimitConfigError::PeriodTooLong {
                period,
                maximum: MAX_PERIOD
            })
        );

        let no_keys = LimitConfig {
            max_keys: 0,
            ..valid()
        };
        assert_eq!(no_keys.validate(), Err(RateLimitConfigError::ZeroMaxKeys));
    }

    #[test]
    fn bucket_capacity_defaults_to_amount() {
        assert_eq!(valid().bucket_capacity(), 10);
        assert_eq!(
            LimitConfig {
                burst: 5,
                ..valid()
            }
            .bucket_capacity(),
            5
        );
    }
}
