//! Cost of one `RateLimiter::check`: on a hot key already tracked, and on
//! keys spread over a table holding 10,000 of them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_policy::ratelimit::{Algorithm, LimitConfig, RateLimiter};

const ALGORITHMS: [(Algorithm, &str); 3] = [
    (Algorithm::TokenBucket, "token_bucket"),
    (Algorithm::FixedWindow, "fixed_window"),
    (Algorithm::SlidingWindow, "sliding_window"),
];

const TABLE_KEYS: u64 = 10_000;

fn limiter(algorithm: Algorithm) -> RateLimiter {
    let config = LimitConfig {
        algorithm,
        // Generous enough that most checks are admitted, the common case.
        amount: 1_000_000,
        period: Duration::from_secs(1),
        burst: 0,
        max_keys: 20_000,
    };
    match RateLimiter::new(config) {
        Ok(limiter) => limiter,
        Err(error) => panic!("benchmark config rejected: {error}"),
    }
}

fn hot_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit/hot_key");
    for (algorithm, name) in ALGORITHMS {
        let limiter = limiter(algorithm);
        let mut now = Duration::ZERO;
        group.bench_function(name, |b| {
            b.iter(|| {
                now += Duration::from_nanos(700);
                black_box(limiter.check(black_box(b"tenant-a:/api/orders"), now))
            })
        });
    }
    group.finish();
}

fn ten_thousand_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit/10k_keys");
    for (algorithm, name) in ALGORITHMS {
        let limiter = limiter(algorithm);
        let keys: Vec<String> = (0..TABLE_KEYS).map(|i| format!("client-{i:05}")).collect();
        for key in &keys {
            limiter.check(key.as_bytes(), Duration::ZERO);
        }
        assert_eq!(limiter.tracked_keys(), TABLE_KEYS as usize);
        let mut next = 0;
        let mut now = Duration::ZERO;
        group.bench_function(name, |b| {
            b.iter(|| {
                next = (next + 7_919) % keys.len();
                now += Duration::from_nanos(700);
                black_box(limiter.check(black_box(keys[next].as_bytes()), now))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hot_key, ten_thousand_keys);
criterion_main!(benches);
