//! `palisade-agent ratelimit-probe`: drives global checks from a real agent
//! process, so tests (and operators) can show that several agents sharing one
//! Redis admit a limit in aggregate, and what each failure mode does while
//! Redis is down.
//!
//! Each request goes the way a proxied one does: the policy engine decides a
//! `GET /` carrying the key in a header, leaves the `scope: global` limit to
//! the agent, and [`GlobalRateLimiter::check`] asks Redis.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use http::{HeaderMap, HeaderValue, Method};
use palisade_policy::ratelimit::Algorithm;
use palisade_policy::wire::{self as pb, rate_limit::FailureMode};
use palisade_policy::{PolicyEngine, Request, RequestTime};

use super::global::{GlobalRateLimiter, GlobalRateLimiterConfig, unix_now_ms};

/// The header the probe's policy keys its limit on.
const KEY_HEADER: &str = "x-probe-key";

/// What to probe.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub store: GlobalRateLimiterConfig,
    /// The limit's id (names its Redis keys); agents sharing a limit share it.
    pub limit_id: String,
    pub algorithm: Algorithm,
    pub amount: u64,
    pub period: Duration,
    /// Token bucket capacity; 0 means `amount`.
    pub burst: u64,
    pub failure_mode: FailureMode,
    /// The rate-limit key every request carries.
    pub key: String,
    pub requests: u64,
    /// Checks in flight at once, over the one multiplexed connection.
    pub concurrency: usize,
    /// Connect first, then start the checks at this Unix time (ms), so that
    /// several probe processes run at the same moment.
    pub not_before_unix_ms: Option<u64>,
}

/// What the probe saw. `errors` counts checks the store did not answer (they
/// are also counted in `admitted` or `denied`, as the failure mode decided).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    pub admitted: u64,
    pub denied: u64,
    pub errors: u64,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "admitted={} denied={} errors={}",
            self.admitted, self.denied, self.errors
        )
    }
}

/// The one-route policy the probe enforces: anyone may `GET /`, under one
/// `scope: global` limit keyed by [`KEY_HEADER`].
fn probe_policy(config: &ProbeConfig) -> pb::WorkloadPolicy {
    use pb::rate_limit::{Algorithm as A, KeyKind, Scope};
    let algorithm = match config.algorithm {
        Algorithm::TokenBucket => A::TokenBucket,
        Algorithm::FixedWindow => A::FixedWindow,
        Algorithm::SlidingWindow => A::SlidingWindow,
    };
    pb::WorkloadPolicy {
        version: "ratelimit-probe".into(),
        workload: "ratelimit-probe".into(),
        trust_domain: "cluster.local".into(),
        default_mtls: pb::MtlsMode::Permissive.into(),
        routes: vec![pb::Route {
            id: "probe/route".into(),
            policy: "probe".into(),
            allow: vec![pb::Rule::default()],
            rate_limit: Some(pb::RateLimit {
                id: config.limit_id.clone(),
                algorithm: algorithm.into(),
                amount: config.amount,
                period_ms: u64::try_from(config.period.as_millis()).unwrap_or(u64::MAX),
                burst: config.burst,
                key: KeyKind::Header.into(),
                key_name: KEY_HEADER.into(),
                scope: Scope::Global.into(),
                failure_mode: config.failure_mode.into(),
                max_keys: 0,
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Runs `config.requests` checks and reports how they went.
pub async fn run_probe(config: &ProbeConfig) -> anyhow::Result<ProbeReport> {
    let engine =
        Arc::new(PolicyEngine::load(probe_policy(config)).context("the probe's limit is invalid")?);
    let limiter = Arc::new(GlobalRateLimiter::new(&config.store).context("--redis")?);
    let mut headers = HeaderMap::new();
    headers.insert(
        KEY_HEADER,
        HeaderValue::from_str(&config.key).context("--key is not a header value")?,
    );
    let headers = Arc::new(headers);

    // Redis may be down on purpose: then every check reports an error.
    let _ = limiter.preload_scripts(Duration::from_secs(2)).await;
    if let Some(start) = config.not_before_unix_ms {
        let wait = start.saturating_sub(unix_now_ms());
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }

    let tickets = Arc::new(AtomicU64::new(config.requests));
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..config.concurrency.max(1) {
        let (engine, limiter, headers) = (engine.clone(), limiter.clone(), headers.clone());
        let (tickets, admitted) = (tickets.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            while tickets
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                if one_request(&engine, &limiter, &headers).await {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("a probe task panicked")?;
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let metrics = limiter.metrics();
    Ok(ProbeReport {
        admitted,
        denied: config.requests - admitted,
        errors: metrics.store_errors(FailureMode::Open) + metrics.store_errors(FailureMode::Closed),
    })
}

/// One request through the engine and the global limiter: admitted or not.
async fn one_request(
    engine: &PolicyEngine,
    limiter: &GlobalRateLimiter,
    headers: &HeaderMap,
) -> bool {
    let now_ms = unix_now_ms();
    let request = Request {
        method: &Method::GET,
        target: "/",
        host: Some("ratelimit-probe"),
        headers,
        port: 8080,
        peer_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        peer: None,
        jwt_claims: None,
        api_key_client: None,
        credential_error: None,
        has_body: false,
        time: RequestTime {
            unix_seconds: i64::try_from(now_ms / 1000).unwrap_or(i64::MAX),
            monotonic: Duration::from_millis(now_ms),
        },
    };
    let decision = engine.decide(&request);
    if !decision.allowed() {
        return false;
    }
    for limit in &decision.global_limits {
        let mut buf = [0u8; 16];
        let key = limit.key_bytes(&request, decision.client_ip, &mut buf);
        if !limiter.check(limit, key, now_ms).await.allowed() {
            return false;
        }
    }
    true
}
