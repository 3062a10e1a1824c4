//! Response headers for a rate-limit decision, local or global.
//!
//! - `RateLimit-Limit`: the most requests the key can make at once.
//! - `RateLimit-Remaining`: requests admissible right now, after this one.
//! - `RateLimit-Reset`: seconds until the key's state is as good as a fresh
//!   key's, rounded up.
//! - `Retry-After` (on 429 only): seconds until the next request would be
//!   admitted, rounded up and at least 1, so a client that waits it out is
//!   admitted if nobody else spent the budget meanwhile.
//!
//! Rounding up never tells a client to come back before it can succeed.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use palisade_policy::ratelimit::RateLimitOutcome;

use super::global::GlobalOutcome;

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// `Retry-After` when a global limit failed closed: the store's state is
/// unknown, so the client is told to try again shortly.
pub const STORE_UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// Whole seconds, rounded up (saturating: `Duration::MAX` gives `u64::MAX`).
pub fn seconds_rounded_up(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// Sets the `RateLimit-*` headers of `outcome`, and `Retry-After` when it
/// was denied.
pub fn insert_rate_limit_headers(headers: &mut HeaderMap, outcome: &RateLimitOutcome) {
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(outcome.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(outcome.remaining));
    headers.insert(
        RATELIMIT_RESET,
        HeaderValue::from(seconds_rounded_up(outcome.reset_after)),
    );
    if !outcome.allowed {
        let retry = seconds_rounded_up(outcome.retry_after).max(1);
        headers.insert(RETRY_AFTER, HeaderValue::from(retry));
    }
}

/// Headers for a global check: those of the store's answer, or only
/// `Retry-After: 1` when the store was unavailable and the limit failed
/// closed (nothing when it failed open: no state is known).
pub fn insert_global_headers(headers: &mut HeaderMap, outcome: &GlobalOutcome) {
    match outcome {
        GlobalOutcome::Checked(outcome) => insert_rate_limit_headers(headers, outcome),
        GlobalOutcome::StoreUnavailable { allowed: false } => {
            headers.insert(
                RETRY_AFTER,
                HeaderValue::from(STORE_UNAVAILABLE_RETRY_AFTER_SECS),
            );
        }
        GlobalOutcome::StoreUnavailable { allowed: true } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(allowed: bool, remaining: u64, reset_ms: u64, retry_ms: u64) -> RateLimitOutcome {
        RateLimitOutcome {
            allowed,
            limit: 30,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: Duration::from_millis(retry_ms),
        }
    }

    fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn rounding_is_up_to_whole_seconds() {
        assert_eq!(seconds_rounded_up(Duration::ZERO), 0);
        assert_eq!(seconds_rounded_up(Duration::from_nanos(1)), 1);
        assert_eq!(seconds_rounded_up(Duration::from_millis(1000)), 1);
        assert_eq!(seconds_rounded_up(Duration::from_millis(1001)), 2);
        assert_eq!(seconds_rounded_up(Duration::MAX), u64::MAX);
    }

    #[test]
    fn allowed_outcome_has_no_retry_after() {
        let mut headers = HeaderMap::new();
        insert_rate_limit_headers(&mut headers, &outcome(true, 29, 9_200, 0));
        assert_eq!(get(&headers, "RateLimit-Limit"), Some("30"));
        assert_eq!(get(&headers, "RateLimit-Remaining"), Some("29"));
        assert_eq!(get(&headers, "RateLimit-Reset"), Some("10"));
        assert_eq!(get(&headers, "Retry-After"), None);
    }

    #[test]
    fn denied_outcome_has_retry_after_rounded_up() {
        let mut headers = HeaderMap::new();
        insert_rate_limit_headers(&mut headers, &outcome(false, 0, 10_000, 2_001));
        assert_eq!(get(&headers, "RateLimit-Remaining"), Some("0"));
        assert_eq!(get(&headers, "RateLimit-Reset"), Some("10"));
        assert_eq!(get(&headers, "Retry-After"), Some("3"));
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        for retry_ms in [0, 1, 999] {
            let mut headers = HeaderMap::new();
            insert_rate_limit_headers(&mut headers, &outcome(false, 0, 0, retry_ms));
            assert_eq!(get(&headers, "Retry-After"), Some("1"), "{retry_ms} ms");
            assert_eq!(get(&headers, "RateLimit-Reset"), Some("0"));
        }
    }

    #[test]
    fn global_outcomes() {
        let mut headers = HeaderMap::new();
        insert_global_headers(
            &mut headers,
            &GlobalOutcome::StoreUnavailable { allowed: false },
        );
        assert_eq!(get(&headers, "Retry-After"), Some("1"));
        assert_eq!(headers.len(), 1);

        let mut headers = HeaderMap::new();
        insert_global_headers(
            &mut headers,
            &GlobalOutcome::StoreUnavailable { allowed: true },
        );
        assert!(headers.is_empty());

        let mut headers = HeaderMap::new();
        insert_global_headers(
            &mut headers,
            &GlobalOutcome::Checked(outcome(false, 0, 1_500, 1_500)),
        );
        assert_eq!(get(&headers, "RateLimit-Limit"), Some("30"));
        assert_eq!(get(&headers, "Retry-After"), Some("2"));
    }
}
