//! Per-key rate limiting for the decision engine: token bucket, fixed window
//! and sliding-window counter over a bounded, sharded key table.
//!
//! Everything here is pure: the caller injects the time. Behaviour at window
//! edges, error bounds and the overflow policy are in `docs/rate-limiting.md`.

mod algorithm;
mod clock;
mod config;
mod fixed_window;
mod limiter;
mod outcome;
mod prehashed;
mod sliding_window;
mod table;
mod token_bucket;

#[cfg(test)]
mod tests;

pub use config::{Algorithm, LimitConfig, MAX_PERIOD, MIN_PERIOD, RateLimitConfigError};
pub use limiter::RateLimiter;
pub use outcome::RateLimitOutcome;
