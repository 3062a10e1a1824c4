//! `scope: global` rate limits against a real `redis-server`, which each test
//! starts on its own loopback port and kills when done.
//!
//! - Two `palisade-agent ratelimit-probe` processes sharing one Redis admit the
//!   limit in aggregate, not twice it (each algorithm).
//! - With Redis stopped, `failureMode: closed` admits nothing and `open`
//!   admits everything, and both count the errors; an unanswering Redis is
//!   cut off by the check's timeout; a Redis that comes back is used again.
//! - Each Lua script decides exactly what the engine's local limiter decides
//!   for the same request sequence.
//! - Redis holds only hashes of the request keys.
//!
//! `redis-server` must be installed (`scripts/test` installs it): without it
//! these tests fail, they are not skipped.

use std::net::TcpListener;
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use palisade_agent::ratelimit::{
    GlobalOutcome, GlobalRateLimiter, GlobalRateLimiterConfig, LimitSpec, store_key, unix_now_ms,
};
use palisade_policy::ratelimit::{Algorithm, LimitConfig, RateLimitOutcome, RateLimiter};
use palisade_policy::wire::rate_limit::FailureMode;
use tokio::process::Command;

// --- a real redis-server -----------------------------------------------------

/// A `redis-server` child on a loopback port, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    async fn start() -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::start_on(port).await {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// Starts on `port` and waits (bounded) until it answers PING.
    async fn start_on(port: u16) -> Result<Self, String> {
        let child = StdCommand::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH). The global rate-limit tests need a \
                 real Redis: run scripts/test, which installs it, or `apt-get install redis-server`."
            ),
            Err(e) => return Err(format!("spawn: {e}")),
        };
        let mut server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("redis-server on port {port} exited: {status}"));
            }
            if server.ping().await {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("redis-server on port {port} never answered PING"))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connecting to redis timed out")
        .expect("connect to redis")
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let attempt = async {
            let mut con = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut con).await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), attempt).await,
            Ok(Ok(pong)) if pong == "PONG"
        )
    }

    /// Kills the server and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// --- the probe as a process --------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Report {
    admitted: u64,
    denied: u64,
    errors: u64,
}

fn parse_report(stdout: &str) -> Report {
    let line = stdout.lines().last().unwrap_or_default();
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in probe output {stdout:?}"))
    };
    Report {
        admitted: field("admitted"),
        denied: field("denied"),
        errors: field("errors"),
    }
}

/// Runs `palisade-agent ratelimit-probe` with `args`, bounded to 30 s.
fn probe(redis_url: &str, args: &[&str]) -> impl Future<Output = Report> + use<> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_palisade-agent"));
    command
        .arg("ratelimit-probe")
        .args(["--redis", redis_url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn palisade-agent");
    async move {
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("ratelimit-probe did not finish within 30 s")
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "ratelimit-probe failed: {}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        parse_report(&stdout)
    }
}

const PERIOD_MS: u64 = 10_000;
const AMOUNT: u64 = 30;
const PER_PROCESS: u64 = 50;

/// Two agent processes, 50 requests each for one key, 30 per 10 s, started
/// at the same instant with 4 checks in flight each. Returns the aggregate
/// report and how long the run lasted from the common start (ms).
async fn two_agents(algorithm: &str, start_unix_ms: u64) -> (Report, u64) {
    let redis = RedisServer::start().await;
    let start = start_unix_ms.to_string();
    let args = [
        "--amount",
        "30",
        "--period",
        "10s",
        "--algorithm",
        algorithm,
        "--key",
        "client-a",
        "--requests",
        "50",
        "--concurrency",
        "4",
        "--failure-mode",
        "closed",
        // Generous: two debug-build processes on a 2-core machine.
        "--timeout-ms",
        "2000",
        "--not-before-unix-ms",
        &start,
    ];
    let (a, b) = tokio::join!(probe(&redis.url(), &args), probe(&redis.url(), &args));
    let elapsed = unix_now_ms().saturating_sub(start_unix_ms);
    assert_eq!((a.errors, b.errors), (0, 0), "Redis was up: {a:?} {b:?}");
    assert_eq!(a.admitted + a.denied, PER_PROCESS);
    assert_eq!(b.admitted + b.denied, PER_PROCESS);
    let total = Report {
        admitted: a.admitted + b.admitted,
        denied: a.denied + b.denied,
        errors: 0,
    };
    (total, elapsed)
}

/// A start 1.5 s from now (time for both processes to connect), moved to
/// just after the next window edge when fewer than 6 s of the current
/// 10 s window would be left, so the run cannot straddle a window edge.
fn start_inside_one_window() -> u64 {
    let start = unix_now_ms() + 1_500;
    if start % PERIOD_MS > PERIOD_MS - 6_000 {
        (start / PERIOD_MS + 1) * PERIOD_MS + 100
    } else {
        start
    }
}

/// The two agents admitted at least the limit, at most `bound`, and less
/// than a budget each.
fn assert_admitted_within(bound: u64, total: &Report, elapsed: u64) {
    assert!(
        (AMOUNT..=bound).contains(&total.admitted),
        "admitted {} over {elapsed} ms; expected 30..={bound}",
        total.admitted
    );
    assert!(
        total.admitted < 2 * AMOUNT,
        "each agent spent its own budget"
    );
}

#[tokio::test]
async fn two_agents_share_a_fixed_window_limit() {
    let start = start_inside_one_window();
    let (total, elapsed) = two_agents("fixedWindow", start).await;
    assert!(
        start % PERIOD_MS + elapsed < PERIOD_MS,
        "the run crossed a window edge ({elapsed} ms from offset {}): inconclusive",
        start % PERIOD_MS
    );
    assert_eq!(
        total.admitted, AMOUNT,
        "two agents admitted {total:?} of 100 for a limit of 30"
    );
}

#[tokio::test]
async fn two_agents_share_a_token_bucket_limit() {
    let (total, elapsed) = two_agents("tokenBucket", unix_now_ms() + 1_500).await;
    // docs/rate-limiting.md: at most C + ⌊A·δ/P⌋ within δ (C = A here).
    assert_admitted_within(AMOUNT + AMOUNT * elapsed / PERIOD_MS, &total, elapsed);
}

#[tokio::test]
async fn two_agents_share_a_sliding_window_limit() {
    let (total, elapsed) = two_agents("slidingWindow", unix_now_ms() + 1_500).await;
    assert!(elapsed < PERIOD_MS, "run took {elapsed} ms: inconclusive");
    // docs/rate-limiting.md: at most A + ⌊A·δ/P⌋ within δ < P; a fresh key
    // inside one window admits exactly A.
    assert_admitted_within(AMOUNT + AMOUNT * elapsed / PERIOD_MS, &total, elapsed);
}

#[tokio::test]
async fn redis_stopped_closed_admits_nothing_and_open_admits_everything() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    // 30 per 10 s for key `k`, `requests` checks.
    let args = |requests| {
        vec![
            "--amount",
            "30",
            "--period",
            "10s",
            "--key",
            "k",
            "--requests",
            requests,
        ]
    };
    let up = probe(&url, &args("5")).await;
    assert_eq!(
        up,
        Report {
            admitted: 5,
            denied: 0,
            errors: 0
        }
    );
    redis.stop();

    for algorithm in ["fixedWindow", "tokenBucket", "slidingWindow"] {
        let mut closed = args("50");
        closed.extend(["--algorithm", algorithm, "--failure-mode", "closed"]);
        let mut open = args("50");
        open.extend(["--algorithm", algorithm, "--failure-mode", "open"]);
        let (closed, open) = tokio::join!(probe(&url, &closed), probe(&url, &open));
        assert_eq!(
            closed,
            Report {
                admitted: 0,
                denied: 50,
                errors: 50
            },
            "{algorithm}, failure mode closed"
        );
        assert_eq!(
            open,
            Report {
                admitted: 50,
                denied: 0,
                errors: 50
            },
            "{algorithm}, failure mode open"
        );
    }
}

// --- the library against Redis ----------------------------------------------

fn limit(algorithm: Algorithm, amount: u64, period_ms: u64, burst: u64) -> LimitConfig {
    LimitConfig {
        algorithm,
        amount,
        period: Duration::from_millis(period_ms),
        burst,
        max_keys: 16,
    }
}

fn spec<'a>(id: &'a str, config: &'a LimitConfig, failure_mode: FailureMode) -> LimitSpec<'a> {
    LimitSpec {
        id,
        config,
        failure_mode,
    }
}

fn limiter(url: String, timeout: Duration) -> GlobalRateLimiter {
    let mut config = GlobalRateLimiterConfig::new(url);
    config.timeout = timeout;
    GlobalRateLimiter::new(&config).unwrap()
}

#[tokio::test]
async fn store_errors_apply_the_failure_mode_and_are_counted() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let global = limiter(redis.url(), Duration::from_millis(50));
    let config = limit(Algorithm::FixedWindow, 2, 60_000, 0);
    let closed = spec("store-errors/closed", &config, FailureMode::Closed);
    let open = spec("store-errors/open", &config, FailureMode::Open);

    let now = unix_now_ms();
    assert!(global.check_spec(closed, b"k", now).await.allowed());
    assert!(global.check_spec(open, b"k", now).await.allowed());
    assert_eq!(global.metrics().store_errors(FailureMode::Closed), 0);

    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let outcome = global.check_spec(closed, b"k", now).await;
        assert_eq!(outcome, GlobalOutcome::StoreUnavailable { allowed: false });
        assert_eq!(outcome.status(), 429);
        assert_eq!(outcome.deny_reason(), Some("ratelimit.store_unavailable"));
        assert!(started.elapsed() < Duration::from_secs(1));
        let outcome = global.check_spec(open, b"k", now).await;
        assert_eq!(outcome, GlobalOutcome::StoreUnavailable { allowed: true });
    }
    assert_eq!(global.metrics().store_errors(FailureMode::Closed), 3);
    assert_eq!(global.metrics().store_errors(FailureMode::Open), 3);
    let mut text = String::new();
    global.metrics().render_prometheus(&mut text);
    assert!(text.contains("palisade_ratelimit_store_errors_total{failure_mode=\"closed\"} 3\n"));

    // Redis comes back on the same address (empty: it kept nothing): the
    // same limiter reconnects by itself.
    let _redis = RedisServer::start_on(port).await.expect("restart redis");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = global.check_spec(closed, b"k", unix_now_ms()).await;
        if let GlobalOutcome::Checked(state) = outcome {
            assert!(state.allowed);
            assert_eq!(state.limit, 2);
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected to Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server that accepts connections and never answers: every check must
/// give up after its timeout and apply the failure mode.
#[tokio::test]
async fn an_unanswering_store_is_cut_off_by_the_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let _accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let global = limiter(url, Duration::from_millis(50));
    let config = limit(Algorithm::TokenBucket, 10, 1_000, 0);
    for mode in [FailureMode::Closed, FailureMode::Open] {
        let started = Instant::now();
        let outcome = global
            .check_spec(spec("silent", &config, mode), b"k", unix_now_ms())
            .await;
        let took = started.elapsed();
        assert_eq!(
            outcome,
            GlobalOutcome::StoreUnavailable {
                allowed: mode == FailureMode::Open
            }
        );
        assert!(
            took >= Duration::from_millis(45) && took < Duration::from_millis(500),
            "check took {took:?}"
        );
    }
    assert_eq!(global.metrics().store_errors(FailureMode::Closed), 1);
    assert_eq!(global.metrics().store_errors(FailureMode::Open), 1);
}

/// Local durations are nanosecond-exact and rounded up; the scripts work in
/// whole milliseconds, rounding waits up. With whole-millisecond request
/// times both must agree exactly after rounding the local ones up to ms.
fn in_whole_ms(outcome: RateLimitOutcome) -> RateLimitOutcome {
    let up = |d: Duration| {
        Duration::from_millis(u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap())
    };
    RateLimitOutcome {
        reset_after: up(outcome.reset_after),
        retry_after: up(outcome.retry_after),
        ..outcome
    }
}

/// A deterministic request schedule: bursts at one instant, small and large
/// steps forward, and the clock going backwards now and then.
fn schedule(seed: u64, steps: usize, period_ms: u64, start: u64) -> Vec<u64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut now = start;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        match next() % 10 {
            0..=3 => {}                                        // same instant
            4..=6 => now += next() % (period_ms / 10).max(2),  // a little later
            7 => now += next() % (2 * period_ms),              // up to two periods
            8 => now = now.saturating_sub(next() % period_ms), // clock steps back
            _ => now += period_ms - now % period_ms - 1,       // just before an edge
        }
        times.push(now);
    }
    times
}

#[tokio::test]
async fn each_script_decides_exactly_like_the_local_limiter() {
    let redis = RedisServer::start().await;
    let global = limiter(redis.url(), Duration::from_secs(2));
    global
        .preload_scripts(Duration::from_secs(5))
        .await
        .unwrap();
    let cases = [
        limit(Algorithm::TokenBucket, 10, 1_000, 5),
        limit(Algorithm::TokenBucket, 3, 1_000, 0),
        limit(Algorithm::TokenBucket, 7, 60_000, 20),
        limit(Algorithm::FixedWindow, 10, 1_000, 0),
        limit(Algorithm::FixedWindow, 1, 250, 0),
        limit(Algorithm::FixedWindow, 30, 10_000, 0),
        limit(Algorithm::SlidingWindow, 10, 1_000, 0),
        limit(Algorithm::SlidingWindow, 1, 1_000, 0),
        limit(Algorithm::SlidingWindow, 7, 3_000, 0),
    ];
    // Realistic magnitudes: the scripts get Unix milliseconds.
    let epoch = 1_750_000_000_000;
    for (i, config) in cases.iter().enumerate() {
        let id = format!("equivalence/{i}");
        let period_ms = u64::try_from(config.period.as_millis()).unwrap();
        let local = RateLimiter::new(config.clone()).unwrap();
        let mut admitted = (0, 0);
        for (step, now) in schedule(i as u64 + 1, 400, period_ms, epoch)
            .into_iter()
            .enumerate()
        {
            let want = in_whole_ms(local.check(b"key", Duration::from_millis(now)));
            let got = global
                .try_check(spec(&id, config, FailureMode::Closed), b"key", now)
                .await
                .unwrap();
            assert_eq!(got, want, "{config:?}, step {step} at {now}");
            admitted.0 += u32::from(want.allowed);
            admitted.1 += u32::from(got.allowed);
        }
        assert_eq!(admitted.0, admitted.1);
        assert!(
            (1..400).contains(&admitted.0),
            "{config:?}: the schedule should both admit and deny, admitted {}",
            admitted.0
        );
    }
}

#[tokio::test]
async fn documented_examples_hold_in_redis() {
    let redis = RedisServer::start().await;
    let global = limiter(redis.url(), Duration::from_secs(2));
    let epoch = 1_750_000_000_000; // a multiple of 1 s and of 10 s
    let admitted = async |config: &LimitConfig, id: &str, at: u64, tries: u32| {
        let mut n = 0;
        for _ in 0..tries {
            let outcome = global
                .try_check(spec(id, config, FailureMode::Closed), b"k", at)
                .await
                .unwrap();
            n += u32::from(outcome.allowed);
        }
        n
    };
    // Token bucket 10/s, burst 5: 5 at once, 1 at 100 ms, 2 more at 350 ms.
    let bucket = limit(Algorithm::TokenBucket, 10, 1_000, 5);
    assert_eq!(admitted(&bucket, "doc/bucket", epoch, 10).await, 5);
    assert_eq!(admitted(&bucket, "doc/bucket", epoch + 99, 10).await, 0);
    assert_eq!(admitted(&bucket, "doc/bucket", epoch + 100, 10).await, 1);
    assert_eq!(admitted(&bucket, "doc/bucket", epoch + 350, 10).await, 2);
    // Fixed window 10/s: 10 just before the edge and 10 just after it.
    let fixed = limit(Algorithm::FixedWindow, 10, 1_000, 0);
    assert_eq!(admitted(&fixed, "doc/fixed", epoch + 999, 20).await, 10);
    assert_eq!(admitted(&fixed, "doc/fixed", epoch + 1_000, 20).await, 10);
    // Sliding window 10/s: 10 before the edge, none right after, 5 half-way.
    let sliding = limit(Algorithm::SlidingWindow, 10, 1_000, 0);
    assert_eq!(admitted(&sliding, "doc/sliding", epoch + 999, 20).await, 10);
    let after_edge = global
        .try_check(
            spec("doc/sliding", &sliding, FailureMode::Closed),
            b"k",
            epoch + 1_000,
        )
        .await
        .unwrap();
    assert!(!after_edge.allowed);
    assert_eq!(after_edge.retry_after, Duration::from_millis(100));
    assert_eq!(
        admitted(&sliding, "doc/sliding", epoch + 1_500, 20).await,
        5
    );
}

#[tokio::test]
async fn redis_holds_only_hashes_of_the_request_keys() {
    let redis = RedisServer::start().await;
    let global = limiter(redis.url(), Duration::from_secs(2));
    let raw_key = "api-client-7f3a9c";
    let limit_id = "shop/orders/routes[0]/rateLimit";
    for algorithm in [
        Algorithm::TokenBucket,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let config = limit(algorithm, 5, 60_000, 0);
        let id = format!("{limit_id}/{algorithm:?}");
        let outcome = global
            .check_spec(
                spec(&id, &config, FailureMode::Closed),
                raw_key.as_bytes(),
                unix_now_ms(),
            )
            .await;
        assert!(outcome.allowed(), "{outcome:?}");
    }

    let mut con = redis.connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("palisade:rl:*")
        .query_async(&mut con)
        .await
        .unwrap();
    keys.sort();
    let mut expected: Vec<String> = ["FixedWindow", "SlidingWindow", "TokenBucket"]
        .iter()
        .map(|a| store_key(&format!("{limit_id}/{a}"), raw_key.as_bytes()))
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(all.len(), 3, "nothing else is stored: {all:?}");
    for key in &keys {
        assert!(!key.contains(raw_key), "raw key in {key}");
        assert!(
            key.starts_with(&format!("palisade:rl:{{{limit_id}/")),
            "{key}"
        );
        let fields: Vec<String> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(fields.iter().all(|f| !f.contains(raw_key)));
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}
