//! Tests across the whole module through the public API: key independence,
//! concurrency, the memory bound and the admission bounds of each algorithm.

use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::TokenBucket,
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
];

fn config(algorithm: Algorithm, amount: u64, burst: u64, max_keys: usize) -> LimitConfig {
    LimitConfig {
        algorithm,
        amount,
        period: Duration::from_secs(1),
        burst,
        max_keys,
    }
}

fn limiter(config: LimitConfig) -> RateLimiter {
    match RateLimiter::new(config) {
        Ok(limiter) => limiter,
        Err(error) => panic!("test config rejected: {error}"),
    }
}

/// The most one key can take at a single instant.
fn capacity(config: &LimitConfig) -> u64 {
    match config.algorithm {
        Algorithm::TokenBucket => config.bucket_capacity(),
        Algorithm::FixedWindow | Algorithm::SlidingWindow => config.amount,
    }
}

fn admitted(limiter: &RateLimiter, key: &[u8], now: Duration, tries: u64) -> u64 {
    (0..tries)
        .filter(|_| limiter.check(key, now).allowed)
        .count() as u64
}

#[test]
fn limiter_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimiter>();
}

#[test]
fn new_rejects_invalid_config_and_keeps_a_valid_one() {
    let zero = config(Algorithm::TokenBucket, 0, 0, 10);
    assert_eq!(
        RateLimiter::new(zero).err(),
        Some(RateLimitConfigError::ZeroAmount)
    );
    let valid = config(Algorithm::SlidingWindow, 3, 0, 10);
    assert_eq!(limiter(valid.clone()).config(), &valid);
}

#[test]
fn keys_are_independent() {
    for algorithm in ALGORITHMS {
        let limiter = limiter(config(algorithm, 3, 0, 100));
        assert_eq!(
            admitted(&limiter, b"alice", Duration::ZERO, 10),
            3,
            "{algorithm:?}"
        );
        assert_eq!(
            admitted(&limiter, b"bob", Duration::ZERO, 10),
            3,
            "{algorithm:?}"
        );
        assert_eq!(
            admitted(&limiter, b"alice", Duration::ZERO, 10),
            0,
            "{algorithm:?}"
        );
        assert_eq!(limiter.tracked_keys(), 2);
    }
}

#[test]
fn clock_going_backwards_grants_nothing() {
    for algorithm in ALGORITHMS {
        let limiter = limiter(config(algorithm, 3, 0, 100));
        let late = Duration::from_secs(100);
        assert_eq!(admitted(&limiter, b"k", late, 10), 3, "{algorithm:?}");
        for earlier in [
            Duration::ZERO,
            Duration::from_secs(99),
            late - Duration::from_nanos(1),
        ] {
            let outcome = limiter.check(b"k", earlier);
            assert!(!outcome.allowed, "{algorithm:?} at {earlier:?}");
            assert!(
                outcome.retry_after > late - earlier,
                "{algorithm:?} at {earlier:?}"
            );
        }
        assert_eq!(admitted(&limiter, b"k", late, 10), 0, "{algorithm:?}");
    }
}

#[test]
fn huge_timestamps_do_not_panic() {
    for algorithm in ALGORITHMS {
        let limiter = limiter(config(algorithm, 3, 0, 2));
        for now in [
            Duration::MAX,
            Duration::ZERO,
            Duration::from_nanos(u64::MAX),
            Duration::MAX,
        ] {
            for key in [&b""[..], b"a", b"b", b"c"] {
                let _ = limiter.check(key, now);
            }
        }
        assert!(limiter.tracked_keys() <= 2);
    }
}

#[test]
fn eight_threads_on_one_key_admit_exactly_capacity() {
    for algorithm in ALGORITHMS {
        let config = config(algorithm, 100, 0, 1_000);
        let limiter = limiter(config.clone());
        let start = Barrier::new(8);
        let now = Duration::from_secs(42);
        let total: u64 = thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        admitted(&limiter, b"shared", now, 1_000)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or(u64::MAX))
                .sum()
        });
        assert_eq!(total, capacity(&config), "{algorithm:?}");
    }
}

#[test]
fn eight_threads_rotating_keys_never_exceed_max_keys() {
    for algorithm in ALGORITHMS {
        let limiter = limiter(config(algorithm, 1, 0, 1_000));
        thread::scope(|scope| {
            for thread_id in 0..8u32 {
                let limiter = &limiter;
                scope.spawn(move || {
                    for i in 0..5_000u32 {
                        let key = [thread_id.to_le_bytes(), i.to_le_bytes()].concat();
                        let now = Duration::from_millis(u64::from(i));
                        limiter.check(&key, now);
                        if i % 500 == 0 {
                            assert!(limiter.tracked_keys() <= 1_000);
                        }
                    }
                });
            }
        });
        assert!(limiter.tracked_keys() <= 1_000, "{algorithm:?}");
    }
}

/// 100,000 distinct keys at one frozen instant, against a 10,000-key table:
/// the table stays within bound, a drained key stays drained, and the flood
/// gets one admission per table slot it took plus one overflow budget.
#[test]
fn key_rotation_flood_is_bounded_and_resets_no_live_key() {
    for algorithm in ALGORITHMS {
        let config = config(algorithm, 10, 5, 10_000);
        let limiter = limiter(config.clone());
        let now = Duration::ZERO;
        assert_eq!(admitted(&limiter, b"victim", now, 100), capacity(&config));

        let mut flood_admitted = 0;
        for i in 0..100_000u32 {
            flood_admitted += u64::from(limiter.check(&i.to_le_bytes(), now).allowed);
            assert!(
                limiter.tracked_keys() <= 10_000,
                "{algorithm:?} after {i} keys"
            );
        }
        // Every shard filled, so the victim's slot aside, 9,999 flood keys got
        // a slot each and all the rest shared one overflow budget.
        assert_eq!(flood_admitted, 9_999 + capacity(&config), "{algorithm:?}");
        assert_eq!(limiter.tracked_keys(), 10_000);
        assert!(
            !limiter.check(b"victim", now).allowed,
            "{algorithm:?}: victim reset"
        );
    }
}

/// A flood spread over time may evict states, but only those equivalent to
/// a fresh key: a key checked throughout sees exactly what it would see in a
/// limiter nobody else uses.
#[test]
fn flood_over_time_never_changes_a_live_key_outcome() {
    for algorithm in ALGORITHMS {
        let config = config(algorithm, 10, 5, 10_000);
        let flooded = limiter(config.clone());
        let quiet = limiter(config);
        let mut now = Duration::ZERO;
        for i in 0..100_000u32 {
            // 100,000 keys over 2 s: flood keys drained early become evictable.
            now = Duration::from_micros(u64::from(i) * 20);
            flooded.check(&i.to_le_bytes(), now);
            assert!(flooded.tracked_keys() <= 10_000);
            if i % 1_000 == 0 {
                for _ in 0..3 {
                    assert_eq!(
                        flooded.check(b"victim", now),
                        quiet.check(b"victim", now),
                        "{algorithm:?} at {now:?}"
                    );
                }
            }
        }
        assert_eq!(
            flooded.check(b"victim", now),
            quiet.check(b"victim", now),
            "{algorithm:?}"
        );
    }
}

/// A key whose state was evicted as fresh-equivalent gets exactly a fresh
/// key's budget back, and keys arriving after that take slots, not overflow.
#[test]
fn evicting_fresh_states_frees_slots_without_granting_extra() {
    for algorithm in ALGORITHMS {
        let config = config(algorithm, 2, 0, 64);
        let limiter = limiter(config);
        for i in 0..1_000u32 {
            limiter.check(&i.to_le_bytes(), Duration::ZERO);
        }
        assert_eq!(limiter.tracked_keys(), 64);
        // Two periods on, every state is fresh-equivalent: each new key gets
        // its own full budget (overflow could grant only 2 in total).
        let later = Duration::from_secs(2);
        let fresh_keys = (5_000..5_064u32)
            .filter(|i| admitted(&limiter, &i.to_le_bytes(), later, 2) == 2)
            .count();
        assert!(
            fresh_keys >= 32,
            "{algorithm:?}: only {fresh_keys} new keys got slots"
        );
        assert!(limiter.tracked_keys() <= 64);
    }
}

fn admitted_times(config: LimitConfig, gaps: &[u64]) -> Vec<u64> {
    let limiter = limiter(config);
    let mut now = 0u64;
    let mut times = Vec::new();
    for gap in gaps {
        now += gap;
        if limiter.check(b"k", Duration::from_nanos(now)).allowed {
            times.push(now);
        }
    }
    times
}

/// Gaps between requests: many simultaneous, some close, some across edges.
fn request_gaps() -> impl Strategy<Value = Vec<u64>> {
    let gap = prop_oneof![
        3 => Just(0u64),
        3 => 0u64..10_000_000,
        2 => 0u64..400_000_000,
        1 => 0u64..2_500_000_000,
    ];
    prop::collection::vec(gap, 1..250)
}

const PERIOD_NS: u64 = 1_000_000_000;

proptest! {
    /// Between any two admissions δ apart (inclusive): at most
    /// burst + floor(amount·δ / period).
    #[test]
    fn token_bucket_never_exceeds_burst_plus_rate(amount in 1u64..6, burst in 0u64..8, gaps in request_gaps()) {
        let config = config(Algorithm::TokenBucket, amount, burst, 10);
        let capacity = config.bucket_capacity();
        let times = admitted_times(config, &gaps);
        for (i, &first) in times.iter().enumerate() {
            for (j, &last) in times.iter().enumerate().skip(i) {
                let admitted = (j - i + 1) as u64;
                let bound = capacity + amount * (last - first) / PERIOD_NS;
                prop_assert!(admitted <= bound, "{admitted} in [{first}, {last}] > {bound}");
            }
        }
    }

    /// At most `amount` per aligned window (so at most 2·amount in any
    /// period-long interval, which straddles two windows).
    #[test]
    fn fixed_window_never_exceeds_amount_per_window(amount in 1u64..6, gaps in request_gaps()) {
        let times = admitted_times(config(Algorithm::FixedWindow, amount, 0, 10), &gaps);
        for (i, &first) in times.iter().enumerate() {
            let same_window = times[i..].iter().take_while(|&&t| t / PERIOD_NS == first / PERIOD_NS).count() as u64;
            prop_assert!(same_window <= amount);
            let within_period = times[i..].iter().take_while(|&&t| t - first < PERIOD_NS).count() as u64;
            prop_assert!(within_period <= 2 * amount);
        }
    }

    /// The documented bound: at most `amount` per aligned window, and between
    /// any two admissions δ < period apart (inclusive) at most
    /// amount + floor(amount·δ / period), hence at most 2·amount − 1.
    #[test]
    fn sliding_window_never_exceeds_documented_bound(amount in 1u64..6, gaps in request_gaps()) {
        let times = admitted_times(config(Algorithm::SlidingWindow, amount, 0, 10), &gaps);
        for (i, &first) in times.iter().enumerate() {
            let same_window = times[i..].iter().take_while(|&&t| t / PERIOD_NS == first / PERIOD_NS).count() as u64;
            prop_assert!(same_window <= amount);
            for (j, &last) in times.iter().enumerate().skip(i) {
                if last - first >= PERIOD_NS {
                    break;
                }
                let admitted = (j - i + 1) as u64;
                let bound = amount + amount * (last - first) / PERIOD_NS;
                prop_assert!(admitted <= bound, "{admitted} in [{first}, {last}] > {bound}");
                prop_assert!(admitted < 2 * amount || amount == 1 && admitted == 1);
            }
        }
    }

    /// Any configuration that validates and any timestamps, in any order.
    #[test]
    fn no_input_panics(
        algorithm in prop::sample::select(ALGORITHMS.to_vec()),
        amount in any::<u64>(),
        burst in any::<u64>(),
        period_ns in 1_000_000u64..,
        max_keys in 1usize..4,
        times in prop::collection::vec((any::<u64>(), 0u32..1_000_000_000, 0u8..6), 1..40),
    ) {
        let config = LimitConfig { algorithm, amount, period: Duration::from_nanos(period_ns), burst, max_keys };
        if let Ok(limiter) = RateLimiter::new(config) {
            for (secs, nanos, key) in times {
                let outcome = limiter.check(&[key], Duration::new(secs, nanos));
                prop_assert!(outcome.remaining <= outcome.limit);
                prop_assert!(outcome.allowed || outcome.retry_after > Duration::ZERO);
            }
            prop_assert!(limiter.tracked_keys() <= max_keys);
        }
    }
}
