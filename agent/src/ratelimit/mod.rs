//! Rate limiting in the agent.
//!
//! `scope: local` limits are decided by the policy engine itself
//! (`palisade_policy::ratelimit`); the engine hands `scope: global` limits
//! back in `Decision::global_limits` and the agent checks them here:
//!
//! - [`global`]: [`GlobalRateLimiter`], one atomic Lua script per check in a
//!   Redis shared by every agent, with the limit's failure mode when Redis
//!   cannot answer in time.
//! - [`headers`]: `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`
//!   and `Retry-After` for a local or global outcome.
//! - [`metrics`]: `palisade_ratelimit_store_errors_total` by failure mode.
//! - [`probe`]: the `palisade-agent ratelimit-probe` subcommand.
//!
//! Semantics, key layout and the clock trade-off: `docs/rate-limiting.md`,
//! "Global limits".

pub mod global;
pub mod headers;
pub mod metrics;
pub mod probe;

pub use global::{
    GlobalOutcome, GlobalRateLimiter, GlobalRateLimiterConfig, LimitSpec, StoreError, store_key,
    unix_now_ms,
};
pub use metrics::RateLimitMetrics;
