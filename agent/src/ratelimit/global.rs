//! `scope: global` limits, counted in one Redis shared by every agent.
//!
//! Each check is one `EVALSHA` of a Lua script (one per algorithm, same
//! semantics as the engine's local limiters, in whole milliseconds), so the
//! read-modify-write of a key's state is atomic in Redis whatever the number
//! of agents. The agent's wall clock is passed in (`ARGV[1]`); see
//! `docs/rate-limiting.md`, "Global limits", for why and what clock skew does.

use std::sync::Arc;
use std::time::Duration;

use palisade_policy::engine::CompiledRateLimit;
use palisade_policy::ratelimit::{Algorithm, LimitConfig, RateLimitOutcome};
use palisade_policy::wire::rate_limit::FailureMode;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use sha2::{Digest, Sha256};

use super::metrics::RateLimitMetrics;

/// The Lua helpers every script starts with.
const COMMON_LUA: &str = include_str!("lua/common.lua");
const TOKEN_BUCKET_LUA: &str = include_str!("lua/token_bucket.lua");
const FIXED_WINDOW_LUA: &str = include_str!("lua/fixed_window.lua");
const SLIDING_WINDOW_LUA: &str = include_str!("lua/sliding_window.lua");

/// How long a key's state outlives the moment it becomes equivalent to a
/// fresh key's. Keeping it longer changes no decision (the scripts roll and
/// refill stale state exactly); it covers agents whose clocks lag the one
/// that wrote the state by up to this much, which would otherwise find the
/// key gone while, for them, it still holds live state.
pub const STATE_GRACE: Duration = Duration::from_secs(1);

/// Largest `amount × period_ms` (and `burst × period_ms`) the scripts accept:
/// every intermediate then stays below 2^53, where Lua's doubles are exact
/// integers. 2^50 ms-requests is e.g. 10 million a day.
pub const MAX_AMOUNT_TIMES_PERIOD_MS: u64 = 1 << 50;

/// Largest `now_unix_ms` accepted (about the year 144,000), for the same reason.
const MAX_NOW_MS: u64 = 1 << 51;

/// The deny reason when the store could not be asked and the limit fails closed.
pub const STORE_UNAVAILABLE_REASON: &str = "ratelimit.store_unavailable";
/// The deny reason when the store refused the request (same code as the engine's).
pub const EXCEEDED_REASON: &str = "ratelimit.exceeded";

/// Where the shared store is and how long a check may wait for it.
#[derive(Clone, Debug)]
pub struct GlobalRateLimiterConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` with TLS support).
    pub url: String,
    /// Bound on each check, connection (re-)establishment included; past it
    /// the limit's failure mode applies. Default 50 ms.
    pub timeout: Duration,
}

impl GlobalRateLimiterConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_millis(50),
        }
    }
}

/// The parts of a compiled limit a global check needs. Built from a
/// [`CompiledRateLimit`], or directly (the probe, tests).
#[derive(Clone, Copy, Debug)]
pub struct LimitSpec<'a> {
    /// The limit's id: names its keys in Redis.
    pub id: &'a str,
    pub config: &'a LimitConfig,
    pub failure_mode: FailureMode,
}

impl<'a> From<&'a CompiledRateLimit> for LimitSpec<'a> {
    fn from(limit: &'a CompiledRateLimit) -> Self {
        Self {
            id: &limit.id,
            config: &limit.config,
            failure_mode: limit.failure_mode,
        }
    }
}

/// The result of one global check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalOutcome {
    /// The store answered (the request was charged if admitted).
    Checked(RateLimitOutcome),
    /// The store did not answer in time or failed; the limit's failure mode
    /// decided: `Open` admits, `Closed` denies with 429.
    StoreUnavailable { allowed: bool },
}

impl GlobalOutcome {
    pub fn allowed(&self) -> bool {
        match self {
            Self::Checked(outcome) => outcome.allowed,
            Self::StoreUnavailable { allowed } => *allowed,
        }
    }

    /// HTTP status to send: 200 to pass the request on, else 429.
    pub fn status(&self) -> u16 {
        if self.allowed() { 200 } else { 429 }
    }

    /// The audit reason of a denial; `None` when admitted.
    pub fn deny_reason(&self) -> Option<&'static str> {
        match self {
            _ if self.allowed() => None,
            Self::Checked(_) => Some(EXCEEDED_REASON),
            Self::StoreUnavailable { .. } => Some(STORE_UNAVAILABLE_REASON),
        }
    }

    /// The limit's state, for the `RateLimit-*` headers; `None` when the
    /// store could not be asked.
    pub fn rate_limit(&self) -> Option<&RateLimitOutcome> {
        match self {
            Self::Checked(outcome) => Some(outcome),
            Self::StoreUnavailable { .. } => None,
        }
    }
}

/// Why a check got no answer from the store. Only logged (at debug: it
/// happens per request while Redis is down) and counted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("rate-limit store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("rate-limit store sent an unexpected reply {0:?}")]
    BadReply(Vec<i64>),
    #[error(
        "rate limit {0}: amount or burst × period (ms) is over 2^50, or the clock is out of range"
    )]
    Unsupported(String),
}

/// Checks `scope: global` limits against a Redis shared by all agents.
///
/// Cheap to share (`Arc`) across tasks: the connection is one multiplexed,
/// automatically reconnecting [`ConnectionManager`], so concurrent checks
/// are pipelined on one socket instead of each taking a connection.
pub struct GlobalRateLimiter {
    redis: ConnectionManager,
    timeout: Duration,
    token_bucket: Script,
    fixed_window: Script,
    sliding_window: Script,
    metrics: Arc<RateLimitMetrics>,
}

impl std::fmt::Debug for GlobalRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: not printed.
        f.debug_struct("GlobalRateLimiter")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl GlobalRateLimiter {
    /// Does not connect: the first check (or [`Self::preload_scripts`]) does,
    /// so an agent starts while Redis is down and applies the failure modes.
    /// Must be called inside a Tokio runtime.
    pub fn new(config: &GlobalRateLimiterConfig) -> Result<Self, StoreError> {
        Self::with_metrics(config, Arc::new(RateLimitMetrics::default()))
    }

    /// As [`Self::new`], counting store errors into `metrics` (shared with
    /// the admin endpoint).
    pub fn with_metrics(
        config: &GlobalRateLimiterConfig,
        metrics: Arc<RateLimitMetrics>,
    ) -> Result<Self, StoreError> {
        let client = Client::open(config.url.as_str())?;
        // Reconnection is retried briefly; a check never waits past
        // `timeout` anyway, and the next check after a failed reconnection
        // starts a new one.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(10))))
            .set_response_timeout(Some(config.timeout.max(Duration::from_millis(10))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(5))
            .set_max_delay(Duration::from_millis(50));
        let redis = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            redis,
            timeout: config.timeout,
            token_bucket: Script::new(&format!("{COMMON_LUA}\n{TOKEN_BUCKET_LUA}")),
            fixed_window: Script::new(&format!("{COMMON_LUA}\n{FIXED_WINDOW_LUA}")),
            sliding_window: Script::new(&format!("{COMMON_LUA}\n{SLIDING_WINDOW_LUA}")),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<RateLimitMetrics> {
        &self.metrics
    }

    /// Connects and loads the three scripts (`SCRIPT LOAD`), so the first
    /// checks need one round trip each. Optional: a check that meets
    /// `NOSCRIPT` (first use, Redis restarted or flushed) loads its script
    /// and retries, within its timeout.
    pub async fn preload_scripts(&self, within: Duration) -> Result<(), StoreError> {
        let mut redis = self.redis.clone();
        let load = async {
            for script in [&self.token_bucket, &self.fixed_window, &self.sliding_window] {
                script.prepare_invoke().load_async(&mut redis).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::time::timeout(within, load)
            .await
            .map_err(|_| StoreError::Timeout(within))??;
        Ok(())
    }

    /// Decides one request for `key` under a compiled `scope: global` limit.
    /// `now_unix_ms` is the agent's wall clock (milliseconds since the Unix
    /// epoch), which also aligns the windows.
    pub async fn check(
        &self,
        limit: &CompiledRateLimit,
        key: &[u8],
        now_unix_ms: u64,
    ) -> GlobalOutcome {
        self.check_spec(LimitSpec::from(limit), key, now_unix_ms)
            .await
    }

    /// As [`Self::check`], for a limit given by its parts.
    pub async fn check_spec(
        &self,
        limit: LimitSpec<'_>,
        key: &[u8],
        now_unix_ms: u64,
    ) -> GlobalOutcome {
        match self.try_check(limit, key, now_unix_ms).await {
            Ok(outcome) => GlobalOutcome::Checked(outcome),
            Err(error) => {
                self.metrics.record_store_error(limit.failure_mode);
                let allowed = limit.failure_mode == FailureMode::Open;
                tracing::debug!(limit = limit.id, %error, allowed, "global rate limit not checked");
                GlobalOutcome::StoreUnavailable { allowed }
            }
        }
    }

    /// One check without the failure mode: what the store answered, or why
    /// it did not.
    pub async fn try_check(
        &self,
        limit: LimitSpec<'_>,
        key: &[u8],
        now_unix_ms: u64,
    ) -> Result<RateLimitOutcome, StoreError> {
        let args = ScriptArgs::new(limit.config, now_unix_ms)
            .ok_or_else(|| StoreError::Unsupported(limit.id.to_owned()))?;
        let script = match limit.config.algorithm {
            Algorithm::TokenBucket => &self.token_bucket,
            Algorithm::FixedWindow => &self.fixed_window,
            Algorithm::SlidingWindow => &self.sliding_window,
        };
        let mut invocation = script.key(store_key(limit.id, key));
        invocation
            .arg(now_unix_ms)
            .arg(args.amount)
            .arg(args.period_ms);
        if limit.config.algorithm == Algorithm::TokenBucket {
            invocation.arg(args.capacity);
        }
        invocation.arg(duration_ms(STATE_GRACE));

        let mut redis = self.redis.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut redis))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))??;
        parse_reply(reply)
    }
}

/// The script arguments of a limit, or `None` when the scripts' exact
/// integer range cannot hold it.
struct ScriptArgs {
    amount: u64,
    /// Whole milliseconds, rounded up: a sub-millisecond part only ever
    /// lengthens the period (stricter). Policies carry whole milliseconds.
    period_ms: u64,
    capacity: u64,
}

impl ScriptArgs {
    fn new(config: &LimitConfig, now_unix_ms: u64) -> Option<Self> {
        let period_ms = duration_ms_ceil(config.period).max(1);
        let amount = config.amount;
        let capacity = config.bucket_capacity();
        let fits = |n: u64| {
            n >= 1
                && n.checked_mul(period_ms)
                    .is_some_and(|p| p <= MAX_AMOUNT_TIMES_PERIOD_MS)
        };
        (fits(amount) && fits(capacity) && now_unix_ms <= MAX_NOW_MS).then_some(Self {
            amount,
            period_ms,
            capacity,
        })
    }
}

fn parse_reply(reply: Vec<i64>) -> Result<RateLimitOutcome, StoreError> {
    let [allowed, limit, remaining, reset_after, retry_after] = reply[..] else {
        return Err(StoreError::BadReply(reply));
    };
    let unsigned = |v: i64| u64::try_from(v).ok();
    match (
        allowed,
        unsigned(limit),
        unsigned(remaining),
        unsigned(reset_after),
        unsigned(retry_after),
    ) {
        (0 | 1, Some(limit), Some(remaining), Some(reset_after), Some(retry_after)) => {
            Ok(RateLimitOutcome {
                allowed: allowed == 1,
                limit,
                remaining,
                reset_after: Duration::from_millis(reset_after),
                retry_after: Duration::from_millis(retry_after),
            })
        }
        _ => Err(StoreError::BadReply(reply)),
    }
}

/// The Redis key holding `key`'s state under limit `limit_id`:
/// `palisade:rl:{<limit id>}:<hex sha256(key)>`.
///
/// The braces are a Redis Cluster hash tag, so all keys of one limit share a
/// slot. The request's key (a principal, API client id, address or header
/// value) is hashed so it never appears in Redis. The digest has a fixed
/// length, so distinct (id, key) pairs never map to the same name.
pub fn store_key(limit_id: &str, key: &[u8]) -> String {
    const PREFIX: &str = "palisade:rl:{";
    let digest = Sha256::digest(key);
    let mut out = String::with_capacity(PREFIX.len() + limit_id.len() + 2 + 64);
    out.push_str(PREFIX);
    out.push_str(limit_id);
    out.push_str("}:");
    for byte in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn duration_ms_ceil(d: Duration) -> u64 {
    let ms = duration_ms(d);
    if d > Duration::from_millis(ms) {
        ms.saturating_add(1)
    } else {
        ms
    }
}

/// Milliseconds since the Unix epoch by the system clock; 0 before 1970.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, duration_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algorithm: Algorithm, amount: u64, period: Duration, burst: u64) -> LimitConfig {
        LimitConfig {
            algorithm,
            amount,
            period,
            burst,
            max_keys: 1,
        }
    }

    #[test]
    fn store_key_hashes_the_request_key_under_a_hash_tag() {
        let key = store_key("shop/p/routes[0]/rateLimit", b"client-42");
        assert!(key.starts_with("palisade:rl:{shop/p/routes[0]/rateLimit}:"));
        assert!(!key.contains("client-42"));
        let digest = key.rsplit(':').next().unwrap();
        assert_eq!(digest.len(), 64);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        // sha256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            store_key("l", b"abc"),
            "palisade:rl:{l}:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(store_key("a", b"k"), store_key("b", b"k"));
    }

    #[test]
    fn script_args_refuse_what_doubles_cannot_hold_exactly() {
        let ok = config(
            Algorithm::TokenBucket,
            10_000_000,
            Duration::from_secs(86_400),
            0,
        );
        assert!(ScriptArgs::new(&ok, unix_now_ms()).is_some());
        let too_big = config(Algorithm::SlidingWindow, 1 << 40, Duration::from_secs(2), 0);
        assert!(ScriptArgs::new(&too_big, 0).is_none());
        let burst = config(Algorithm::TokenBucket, 1, Duration::from_secs(2), 1 << 40);
        assert!(ScriptArgs::new(&burst, 0).is_none());
        let sub_ms = config(Algorithm::FixedWindow, 1, Duration::from_micros(1500), 0);
        assert_eq!(ScriptArgs::new(&sub_ms, 0).unwrap().period_ms, 2);
        assert!(ScriptArgs::new(&sub_ms, u64::MAX).is_none());
    }

    #[test]
    fn replies_are_validated() {
        let outcome = parse_reply(vec![0, 30, 0, 1500, 250]).unwrap();
        assert_eq!(
            outcome,
            RateLimitOutcome {
                allowed: false,
                limit: 30,
                remaining: 0,
                reset_after: Duration::from_millis(1500),
                retry_after: Duration::from_millis(250),
            }
        );
        assert!(parse_reply(vec![1, 2, 3]).is_err());
        assert!(parse_reply(vec![2, 30, 0, 0, 0]).is_err());
        assert!(parse_reply(vec![1, 30, -1, 0, 0]).is_err());
    }

    #[test]
    fn outcome_status_and_reason() {
        let denied = GlobalOutcome::StoreUnavailable { allowed: false };
        assert_eq!(denied.status(), 429);
        assert_eq!(denied.deny_reason(), Some("ratelimit.store_unavailable"));
        assert!(denied.rate_limit().is_none());
        let open = GlobalOutcome::StoreUnavailable { allowed: true };
        assert_eq!((open.status(), open.deny_reason()), (200, None));
        let exceeded = GlobalOutcome::Checked(parse_reply(vec![0, 1, 0, 10, 10]).unwrap());
        assert_eq!(exceeded.deny_reason(), Some("ratelimit.exceeded"));
    }
}
