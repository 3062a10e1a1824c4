//! Token bucket with continuous refill, in exact integer arithmetic.
//!
//! Levels are kept in "units" where one token is `period_ns` units and every
//! elapsed nanosecond adds `amount` units. Refill is then an exact integer
//! product (no rounding, so no drift however often a key is checked), and
//! `u128` holds any `u64 × u64` product without overflow.

use super::algorithm::LimitAlgorithm;
use super::clock::{Nanos, clamp_nanos, from_nanos};
use super::outcome::RateLimitOutcome;

pub(crate) struct TokenBucket {
    capacity: u64,
    /// Units gained per elapsed nanosecond.
    refill_per_nano: u128,
    /// Units per token (the period in nanoseconds).
    token: u128,
    /// Units in a full bucket.
    full: u128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BucketState {
    level: u128,
    /// Latest time the bucket was refilled to. Never moves backwards, so a
    /// clock that jumps back cannot be used to refill the same span twice.
    refilled_at: Nanos,
}

impl TokenBucket {
    /// `amount >= 1` and `period_ns >= 1`, as `LimitConfig::validate` ensures.
    pub(crate) fn new(amount: u64, period_ns: Nanos, capacity: u64) -> Self {
        let token = u128::from(period_ns.max(1));
        Self {
            capacity,
            refill_per_nano: u128::from(amount.max(1)),
            token,
            full: u128::from(capacity).saturating_mul(token),
        }
    }

    fn refill(&self, state: &mut BucketState, now: Nanos) {
        if now > state.refilled_at {
            let gained = u128::from(now - state.refilled_at).saturating_mul(self.refill_per_nano);
            state.level = state.level.saturating_add(gained).min(self.full);
            state.refilled_at = now;
        }
    }

    /// Nanoseconds of refill needed to gain `units`, rounded up so a caller
    /// retrying after that long is certain to find them.
    fn nanos_to_gain(&self, units: u128) -> u128 {
        units.div_ceil(self.refill_per_nano)
    }
}

impl LimitAlgorithm for TokenBucket {
    type State = BucketState;

    fn fresh_state(&self, now: Nanos) -> BucketState {
        BucketState {
            level: self.full,
            refilled_at: now,
        }
    }

    fn check(&self, state: &mut BucketState, now: Nanos) -> RateLimitOutcome {
        self.refill(state, now);
        // Non-zero only when the clock went backwards: waits are counted from
        // the bucket's own time, so the caller must also wait out the gap.
        let lag = u128::from(state.refilled_at.saturating_sub(now));

        let allowed = state.level >= self.token;
        if allowed {
            state.level -= self.token;
        }
        let retry_after = if allowed {
            0
        } else {
            lag.saturating_add(self.nanos_to_gain(self.token - state.level))
        };
        RateLimitOutcome {
            allowed,
            limit: self.capacity,
            remaining: clamp_nanos(state.level / self.token),
            reset_after: from_nanos(
                lag.saturating_add(self.nanos_to_gain(self.full - state.level)),
            ),
            retry_after: from_nanos(retry_after),
        }
    }

    fn fresh_from(&self, state: &BucketState) -> Nanos {
        let until_full = clamp_nanos(self.nanos_to_gain(self.full - state.level));
        state.refilled_at.saturating_add(until_full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    /// 10 tokens per second, capacity 5: one token every 100 ms.
    fn ten_per_sec_burst_five() -> TokenBucket {
        TokenBucket::new(10, SEC, 5)
    }

    fn admitted(bucket: &TokenBucket, state: &mut BucketState, now: Nanos, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| bucket.check(state, now).allowed)
            .count() as u32
    }

    #[test]
    fn burst_at_start_admits_exactly_capacity() {
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(0);

        let first = bucket.check(&mut state, 0);
        assert_eq!(
            first,
            RateLimitOutcome {
                allowed: true,
                limit: 5,
                remaining: 4,
                reset_after: Duration::from_millis(100),
                retry_after: Duration::ZERO,
            }
        );
        assert_eq!(admitted(&bucket, &mut state, 0, 10), 4);

        let denied = bucket.check(&mut state, 0);
        assert_eq!(
            denied,
            RateLimitOutcome {
                allowed: false,
                limit: 5,
                remaining: 0,
                reset_after: Duration::from_millis(500),
                retry_after: Duration::from_millis(100),
            }
        );
    }

    #[test]
    fn refills_one_token_per_step_and_not_before() {
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(0);
        assert_eq!(admitted(&bucket, &mut state, 0, 10), 5);

        // 1 ns short of a whole token: nothing, and the wait is exactly 1 ns.
        let early = bucket.check(&mut state, 100 * MS - 1);
        assert!(!early.allowed);
        assert_eq!(early.retry_after, Duration::from_nanos(1));

        let on_time = bucket.check(&mut state, 100 * MS);
        assert!(on_time.allowed);
        assert_eq!(on_time.remaining, 0);
        assert_eq!(on_time.reset_after, Duration::from_millis(500));
        assert_eq!(admitted(&bucket, &mut state, 100 * MS, 10), 0);

        // 250 ms later: two whole tokens and half of a third.
        assert_eq!(admitted(&bucket, &mut state, 350 * MS, 10), 2);
        let denied = bucket.check(&mut state, 350 * MS);
        assert_eq!(denied.retry_after, Duration::from_millis(50));
        assert_eq!(denied.reset_after, Duration::from_millis(450));
    }

    #[test]
    fn idle_time_never_fills_past_capacity() {
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(0);
        assert_eq!(admitted(&bucket, &mut state, 0, 10), 5);
        assert_eq!(admitted(&bucket, &mut state, 3_600 * SEC, 100), 5);
    }

    #[test]
    fn long_run_admits_burst_plus_rate_times_time() {
        // Requests every millisecond for 10 s: 5 (burst) + 10/s × 10 s = 105.
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(0);
        let total = (0..=10_000u64)
            .filter(|ms| bucket.check(&mut state, ms * MS).allowed)
            .count();
        assert_eq!(total, 105);
    }

    #[test]
    fn uneven_rates_do_not_drift() {
        // 3 per 7 ms: period/amount is not an integer number of nanoseconds.
        // Capacity is large so that nothing is ever lost to a full bucket.
        let bucket = TokenBucket::new(3, 7 * MS, 1_000);
        let mut state = bucket.fresh_state(0);
        assert_eq!(admitted(&bucket, &mut state, 0, 2_000), 1_000);
        // Checked every microsecond for 1001 ms = 143 periods: token k lands
        // at exactly k × 7/3 ms, the last at 1001 ms itself.
        let total = (1..=1_001_000u64)
            .filter(|us| bucket.check(&mut state, us * 1_000).allowed)
            .count();
        assert_eq!(total, 3 * 143);
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(10 * SEC);
        assert_eq!(admitted(&bucket, &mut state, 10 * SEC, 10), 5);

        // Back to t=0, then forward to 10.1 s: only the 100 ms after the
        // latest time seen may refill, i.e. one token.
        let back = bucket.check(&mut state, 0);
        assert!(!back.allowed);
        assert_eq!(back.retry_after, Duration::from_millis(10_100));
        assert_eq!(admitted(&bucket, &mut state, 5 * SEC, 10), 0);
        assert_eq!(admitted(&bucket, &mut state, 10 * SEC + 100 * MS, 10), 1);
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let bucket = TokenBucket::new(u64::MAX, u64::MAX, u64::MAX);
        let mut state = bucket.fresh_state(u64::MAX);
        assert!(bucket.check(&mut state, u64::MAX).allowed);
        assert!(bucket.check(&mut state, 0).allowed);

        let slow = TokenBucket::new(1, u64::MAX, u64::MAX);
        let mut state = slow.fresh_state(0);
        let outcome = slow.check(&mut state, 0);
        assert!(outcome.allowed);
        assert_eq!(outcome.remaining, u64::MAX - 1);
        assert_eq!(slow.fresh_from(&state), u64::MAX);
    }

    #[test]
    fn fresh_from_is_when_the_bucket_is_full_again() {
        let bucket = ten_per_sec_burst_five();
        let mut state = bucket.fresh_state(0);
        assert_eq!(bucket.fresh_from(&state), 0);
        admitted(&bucket, &mut state, 0, 2);
        assert_eq!(bucket.fresh_from(&state), 200 * MS);
    }
}
