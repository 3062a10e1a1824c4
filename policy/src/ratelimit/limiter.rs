//! The public entry point: one configured limit over many keys.

use std::fmt;
use std::time::Duration;

use super::clock::to_nanos;
use super::config::{Algorithm, LimitConfig, RateLimitConfigError};
use super::fixed_window::FixedWindow;
use super::outcome::RateLimitOutcome;
use super::sliding_window::SlidingWindow;
use super::table::KeyTable;
use super::token_bucket::TokenBucket;

/// Applies one `LimitConfig` to each key independently. Pure: the caller
/// supplies the time, so decisions are reproducible and testable.
pub struct RateLimiter {
    config: LimitConfig,
    table: AlgorithmTable,
}

/// Static dispatch: the algorithm is fixed at construction, and `check` is
/// hot enough that a `match` beats a virtual call.
enum AlgorithmTable {
    TokenBucket(KeyTable<TokenBucket>),
    FixedWindow(KeyTable<FixedWindow>),
    SlidingWindow(KeyTable<SlidingWindow>),
}

impl RateLimiter {
    pub fn new(config: LimitConfig) -> Result<Self, RateLimitConfigError> {
        config.validate()?;
        let period = to_nanos(config.period);
        let table = match config.algorithm {
            Algorithm::TokenBucket => AlgorithmTable::TokenBucket(KeyTable::new(
                TokenBucket::new(config.amount, period, config.bucket_capacity()),
                config.max_keys,
            )),
            Algorithm::FixedWindow => AlgorithmTable::FixedWindow(KeyTable::new(
                FixedWindow::new(config.amount, period),
                config.max_keys,
            )),
            Algorithm::SlidingWindow => AlgorithmTable::SlidingWindow(KeyTable::new(
                SlidingWindow::new(config.amount, period),
                config.max_keys,
            )),
        };
        Ok(Self { config, table })
    }

    /// Decides one request for `key`. `now` is a monotonic timestamp from an
    /// arbitrary epoch; if it goes backwards the limiter grants nothing for it.
    pub fn check(&self, key: &[u8], now: Duration) -> RateLimitOutcome {
        let now = to_nanos(now);
        match &self.table {
            AlgorithmTable::TokenBucket(table) => table.check(key, now),
            AlgorithmTable::FixedWindow(table) => table.check(key, now),
            AlgorithmTable::SlidingWindow(table) => table.check(key, now),
        }
    }

    /// Keys with their own state right now; never more than `max_keys`.
    pub fn tracked_keys(&self) -> usize {
        match &self.table {
            AlgorithmTable::TokenBucket(table) => table.tracked_keys(),
            AlgorithmTable::FixedWindow(table) => table.tracked_keys(),
            AlgorithmTable::SlidingWindow(table) => table.tracked_keys(),
        }
    }

    pub fn config(&self) -> &LimitConfig {
        &self.config
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RateLimiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
