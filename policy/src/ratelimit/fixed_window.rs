//! Fixed window: at most `amount` admissions in each window
//! `[k·period, (k+1)·period)` of the caller's clock.

use super::algorithm::LimitAlgorithm;
use super::clock::{Nanos, from_nanos};
use super::outcome::RateLimitOutcome;

pub(crate) struct FixedWindow {
    amount: u64,
    period: Nanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowCount {
    /// Index of the newest window seen; a clock that goes backwards keeps
    /// being charged to it rather than reopening an older, emptier window.
    window: u64,
    admitted: u64,
}

impl FixedWindow {
    /// `amount >= 1` and `period >= 1`, as `LimitConfig::validate` ensures.
    pub(crate) fn new(amount: u64, period: Nanos) -> Self {
        Self {
            amount: amount.max(1),
            period: period.max(1),
        }
    }

    fn window_end(&self, window: u64) -> Nanos {
        // window × period never exceeds a timestamp already seen, so only the
        // addition can overflow.
        window
            .saturating_mul(self.period)
            .saturating_add(self.period)
    }
}

impl LimitAlgorithm for FixedWindow {
    type State = WindowCount;

    fn fresh_state(&self, now: Nanos) -> WindowCount {
        WindowCount {
            window: now / self.period,
            admitted: 0,
        }
    }

    fn check(&self, state: &mut WindowCount, now: Nanos) -> RateLimitOutcome {
        let window = now / self.period;
        if window > state.window {
            *state = WindowCount {
                window,
                admitted: 0,
            };
        }
        let allowed = state.admitted < self.amount;
        if allowed {
            state.admitted += 1;
        }
        let reset_after = from_nanos(u128::from(
            self.window_end(state.window).saturating_sub(now),
        ));
        RateLimitOutcome {
            allowed,
            limit: self.amount,
            remaining: self.amount - state.admitted,
            reset_after,
            retry_after: if allowed {
                Default::default()
            } else {
                reset_after
            },
        }
    }

    fn fresh_from(&self, state: &WindowCount) -> Nanos {
        if state.admitted == 0 {
            0
        } else {
            self.window_end(state.window)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    fn admitted(limit: &FixedWindow, state: &mut WindowCount, now: Nanos, tries: u32) -> u32 {
        (0..tries)
            .filter(|_| limit.check(state, now).allowed)
            .count() as u32
    }

    #[test]
    fn burst_at_start_admits_exactly_amount() {
        let limit = FixedWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        let first = limit.check(&mut state, 0);
        assert_eq!(
            first,
            RateLimitOutcome {
                allowed: true,
                limit: 10,
                remaining: 9,
                reset_after: Duration::from_secs(1),
                retry_after: Duration::ZERO,
            }
        );
        assert_eq!(admitted(&limit, &mut state, 0, 20), 9);
        let denied = limit.check(&mut state, 250 * MS);
        assert_eq!(
            denied,
            RateLimitOutcome {
                allowed: false,
                limit: 10,
                remaining: 0,
                reset_after: Duration::from_millis(750),
                retry_after: Duration::from_millis(750),
            }
        );
    }

    /// The known weakness, admitted on purpose: 10 just before the edge and
    /// 10 just after it make 20 in 2 ns, twice the configured rate.
    #[test]
    fn edge_burst_admits_twice_the_amount() {
        let limit = FixedWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        assert_eq!(admitted(&limit, &mut state, SEC - 1, 20), 10);
        let last_before = limit.check(&mut state, SEC - 1);
        assert_eq!(last_before.retry_after, Duration::from_nanos(1));
        assert_eq!(admitted(&limit, &mut state, SEC, 20), 10);
    }

    #[test]
    fn windows_are_aligned_to_the_epoch_not_the_first_request() {
        let limit = FixedWindow::new(3, SEC);
        let mut state = limit.fresh_state(900 * MS);
        let first = limit.check(&mut state, 900 * MS);
        assert_eq!(first.reset_after, Duration::from_millis(100));
        assert_eq!(admitted(&limit, &mut state, 999 * MS, 5), 2);
        assert_eq!(admitted(&limit, &mut state, SEC, 5), 3);
    }

    #[test]
    fn long_run_admits_amount_per_window() {
        let limit = FixedWindow::new(10, SEC);
        let mut state = limit.fresh_state(0);
        let total = (0..10_000u64)
            .filter(|ms| limit.check(&mut state, ms * MS).allowed)
            .count();
        assert_eq!(total, 10 * 10);
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let limit = FixedWindow::new(2, SEC);
        let mut state = limit.fresh_state(5 * SEC);
        assert_eq!(admitted(&limit, &mut state, 5 * SEC, 5), 2);
        let back = limit.check(&mut state, SEC);
        assert!(!back.allowed);
        assert_eq!(back.retry_after, Duration::from_secs(5));
        assert_eq!(admitted(&limit, &mut state, 5 * SEC + 999 * MS, 5), 0);
        assert_eq!(admitted(&limit, &mut state, 6 * SEC, 5), 2);
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let limit = FixedWindow::new(u64::MAX, u64::MAX);
        let mut state = limit.fresh_state(u64::MAX);
        let outcome = limit.check(&mut state, u64::MAX);
        assert!(outcome.allowed);
        assert_eq!(outcome.remaining, u64::MAX - 1);
        assert_eq!(limit.fresh_from(&state), u64::MAX);
    }

    #[test]
    fn fresh_from_is_the_end_of_a_used_window() {
        let limit = FixedWindow::new(2, SEC);
        let mut state = limit.fresh_state(1_500 * MS);
        assert_eq!(limit.fresh_from(&state), 0);
        limit.check(&mut state, 1_500 * MS);
        assert_eq!(limit.fresh_from(&state), 2 * SEC);
    }
}
