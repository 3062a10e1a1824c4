//! Sliding-window counter: two adjacent fixed windows, the previous one
//! weighted by the share of it still inside the trailing period.
//!
//! A request at offset `e` into window `k` is admitted when
//! `previous × (period − e) / period + current + 1 <= amount`. Both sides are
//! multiplied by `period` so the test is exact in integers (`u128`): no
//! rounding ever admits a request the formula would refuse.
//! `docs/rate-limiting.md` derives the bound this gives against an exact log.

use super::algorithm::LimitAlgorithm;
use super::clock::{Nanos, clamp_nanos, from_nanos};
use super::outcome::RateLimitOutcome;

pub(crate) struct SlidingWindow {
    amount: u64,
    period: Nanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowPair {
    /// Index of the newest window seen (clock going backwards is charged here).
    window: u64,
    current: u64,
    previous: u64,
}

impl SlidingWindow {
    /// `amount >= 1` and `period >= 1`, as `LimitConfig::validate` ensures.
    pub(crate) fn new(amount: u64, period: Nanos) -> Self {
        Self {
            amount: amount.max(1),
            period: period.max(1),
        }
    }

    fn roll(&self, state: &mut WindowPair, now: Nanos) {
        let window = now / self.period;
        if window > state.window {
            let previous = if window - state.window == 1 {
                state.current
            } else {
                0
            };
            *state = WindowPair {
                window,
                current: 0,
                previous,
            };
        }
    }

    /// Load on the limit in units of requests × period, at `offset` into the
    /// state's window.
    fn load(&self, previous: u64, current: u64, offset: u128) -> u128 {
        let period = u128::from(self.period);
        let previous_weight = period - offset.min(period);
        u128::from(previous)
            .saturating_mul(previous_weight)
            .saturating_add(u128::from(current).saturating_mul(period))
    }

    fn budget(&self) -> u128 {
        u128::from(self.amount).saturating_mul(u128::from(self.period))
    }

    /// The smallest offset into a window with these counts at which one more
    /// request fits, if any does before the window ends.
    fn first_admitting_offset(&self, previous: u64, current: u64) -> Option<u128> {
        if current >= self.amount {
            return None;
        }
        let period = u128::from(self.period);
        if previous == 0 {
            return Some(0);
        }
        // Need previous × (period − e) <= (amount − current − 1) × period.
        let room = u128::from(self.amount - current - 1).saturating_mul(period);
        let max_previous_weight = room / u128::from(previous);
        let offset = period.saturating_sub(max_previous_weight);
        (offset < period).then_some(offset)
    }

    /// Absolute time at which the next request would be admitted, counting
    /// only the requests already recorded in `state`.
    fn next_admission(&self, state: &WindowPair) -> u128 {
        let period = u128::from(self.period);
        let start = u128::from(state.window) * period;
        if let Some(offset) = self.first_admitting_offset(state.previous, state.current) {
            return start + offset;
        }
        if let Some(offset) = self.first_admitting_offset(state.current, 0) {
            return start + period + offset;
        }
        start + 2 * period
    }

    /// Absolute time from which both windows have slid out entirely.
    fn forgotten_at(&self, state: &WindowPair) -> u128 {
        let period = u128::from(self.period);
        let start = u128::from(state.window) * period;
        if state.current > 0 {
            start + 2 * period
        } else if state.previous > 0 {
            start + period
        } else {
            start
        }
    }
}

impl LimitAlgorithm for SlidingWindow {
    type State = WindowPair;

    fn fresh_state(&self, now: Nanos) -> WindowPair {
        WindowPair {
            window: now / self.period,
            current: 0,
            previous: 0,
        }
    }

    fn check(&self, state: &mut WindowPair, now: Nanos) -> RateLimitOutcome {
        self.roll(state, now);
        let start = state.window.saturating_mul(self.period);
        // A clock behind the state's window counts as its very start, where
        // the previous window weighs most: the strictest reading.
        let offset = u128::from(now.saturating_sub(start));
        let period = u128::from(self.period);
        let budget = self.budget();

        let mut load = self.load(state.previous, state.current, offset);
        let allowed = load.saturating_add(period) <= budget;
        if allowed {
            state.current += 1;
            load += period;
        }
        let now = u128::from(now);
        let retry_after = if allowed {
            0
        } else {
            self.next_admission(state).saturating_sub(now)
        };
        RateLimitOutcome {
            allowed,
            limit: self.amount,
            remaining: clamp_nanos(budget.saturating_sub(load) / period),
            reset_after: from_nanos(self.forgotten_at(state).saturating_sub(now)),
            retry_after: from_nanos(retry_after),
        }
    }

    fn fresh_from(&self, state: &WindowPair) -> Nanos {
        clamp_nanos(self.forgotten_at(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    fn admitted(limit: &SlidingWindow, state: &mut WindowPair, now: Nanos, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| limit.check(state, now).allowed)
            .count() as u32
    }

    #[test]
    fn burst_at_start_admits_exactly_amount() {
        let limit = SlidingWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        let first = limit.check(&mut state, 0);
        assert_eq!(
            first,
            RateLimitOutcome {
                allowed: true,
                limit: 10,
                remaining: 9,
                // The request also weighs on the next window, fully gone at 2 s.
                reset_after: Duration::from_secs(2),
                retry_after: Duration::ZERO,
            }
        );
        assert_eq!(admitted(&limit, &mut state, 0, 20), 9);
        let denied = limit.check(&mut state, 0);
        assert_eq!(
            denied,
            RateLimitOutcome {
                allowed: false,
                limit: 10,
                remaining: 0,
                reset_after: Duration::from_secs(2),
                // At 1.1 s the 10 previous requests weigh 10 × 0.9 = 9.
                retry_after: Duration::from_millis(1_100),
            }
        );
    }

    /// The fixed window's 2× edge burst is cut: 10 just before the edge,
    /// then nothing just after it, and only what has "slid out" later.
    #[test]
    fn edge_burst_is_limited_to_the_slid_out_share() {
        let limit = SlidingWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, SEC - 1, 20), 10);

        let after_edge = limit.check(&mut state, SEC);
        assert!(!after_edge.allowed);
        assert_eq!(after_edge.remaining, 0);
        assert_eq!(after_edge.retry_after, Duration::from_millis(100));

        // Half-way through: the previous window weighs 5, so 5 more fit.
        assert_eq!(admitted(&limit, &mut state, 1_500 * MS, 20), 5);
        let denied = limit.check(&mut state, 1_500 * MS);
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        // Current window holds 5, so the state is forgotten only at 3 s.
        assert_eq!(denied.reset_after, Duration::from_millis(1_500));
    }

    /// The worst case documented in docs/rate-limiting.md: the previous
    /// window's requests all came at its very end, so the trailing second
    /// [1 s − 1 ns, 2 s − 1 ns) holds 10 + 9 = 19 = 2 × amount − 1.
    #[test]
    fn worst_case_trailing_period_holds_two_amounts_minus_one() {
        let limit = SlidingWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, SEC - 1, 20), 10);
        let mut later = 0;
        for ns in (SEC..2 * SEC - 1).step_by(MS as usize) {
            later += admitted(&limit, &mut state, ns, 20);
        }
        later += admitted(&limit, &mut state, 2 * SEC - 2, 20);
        assert_eq!(later, 9);
    }

    #[test]
    fn remaining_counts_the_previous_window_share() {
        let limit = SlidingWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, 0, 4), 4);
        // At 1.25 s: 4 × 0.75 = 3 from before, plus this one.
        let outcome = limit.check(&mut state, 1_250 * MS);
        assert!(outcome.allowed);
        assert_eq!(outcome.remaining, 6);
        assert_eq!(outcome.reset_after, Duration::from_millis(1_750));
    }

    #[test]
    fn long_run_at_a_steady_rate_admits_just_under_amount_per_period() {
        let limit = SlidingWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        // One request every 10 ms for 10 s: 100/s offered, 10/s allowed.
        let total = (0..1_000u64)
            .filter(|i| limit.check(&mut state, i * 10 * MS).allowed)
            .count();
        // 10 in the first window, then 9 in each later one: with 9 carried
        // over, a 10th fits only once the previous window has fully slid out
        // (offset = period), and the last request comes at 990 ms. Saturating
        // steady load thus gets slightly under `amount`: the safe direction.
        assert_eq!(total, 10 + 9 * 9);
    }

    #[test]
    fn a_window_skipped_entirely_forgets_everything() {
        let limit = SlidingWindow::new(3, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, 0, 5), 3);
        assert_eq!(limit.fresh_from(&state), 2 * SEC);
        assert_eq!(admitted(&limit, &mut state, 2 * SEC, 5), 3);
    }

    #[test]
    fn amount_one_waits_for_the_window_after_next() {
        let limit = SlidingWindow::new(1, SEC);
        let mut state = limit.fresh_state(0);
        assert!(limit.check(&mut state, 500 * MS).allowed);
        let denied = limit.check(&mut state, 600 * MS);
        assert_eq!(denied.retry_after, Duration::from_millis(1_400));
        assert!(!limit.check(&mut state, 2 * SEC - 1).allowed);
        assert!(limit.check(&mut state, 2 * SEC).allowed);
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let limit = SlidingWindow::new(4, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, 0, 4), 4);
        // At 1.5 s two slots have slid out; take one, leave one.
        assert_eq!(admitted(&limit, &mut state, 1_500 * MS, 1), 1);
        // Back into the first window: read as the start of the second, where
        // the previous window weighs fully, so nothing fits.
        let back = limit.check(&mut state, 200 * MS);
        assert!(!back.allowed);
        assert_eq!(back.retry_after, Duration::from_millis(1_300));
        assert_eq!(admitted(&limit, &mut state, 1_500 * MS, 5), 1);
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let limit = SlidingWindow::new(u64::MAX, u64::MAX);
        let mut state = limit.fresh_state(u64::MAX);
        assert!(limit.check(&mut state, u64::MAX).allowed);
        assert!(limit.check(&mut state, 0).allowed);
        assert_eq!(limit.fresh_from(&state), u64::MAX);

        let tight = SlidingWindow::new(1, 1);
        let mut state = tight.fresh_state(u64::MAX);
        assert!(tight.check(&mut state, u64::MAX).allowed);
        assert!(!tight.check(&mut state, u64::MAX).allowed);
    }
}
