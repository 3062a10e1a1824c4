//! The decision for one request, with what the RateLimit headers need.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitOutcome {
    pub allowed: bool,
    /// For `RateLimit-Limit`: the most requests the key can make at once.
    pub limit: u64,
    /// For `RateLimit-Remaining`: requests admissible right now, after this one.
    pub remaining: u64,
    /// For `RateLimit-Reset`: until the key's state is as good as a fresh key's
    /// (`remaining` back at `limit`).
    pub reset_after: Duration,
    /// For `Retry-After`: zero when allowed; when denied, until the next request
    /// would be admitted if nothing else arrives meanwhile.
    pub retry_after: Duration,
}
