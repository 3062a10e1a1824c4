//! The bounded, sharded map from key to algorithm state.
//!
//! Keys are hashed once with a per-table random seed (`RandomState`), so a
//! client cannot choose keys that pile into one shard. The hash picks one of
//! up to 64 shards, each behind its own lock: there is no global lock on the
//! hot path. Two keys whose 64-bit hashes collide share one state, which can
//! only make both stricter.
//!
//! Memory is bounded: shard capacities add up to exactly `max_keys`. A key
//! arriving at a full shard first evicts states that are already equivalent
//! to a fresh key (losing nothing); if none are, it is charged to one shared
//! overflow state, so rotating through keys never earns more than that one
//! extra budget.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use parking_lot::Mutex;

use super::algorithm::LimitAlgorithm;
use super::clock::Nanos;
use super::outcome::RateLimitOutcome;
use super::prehashed::BuildPrehashed;

/// Enough to keep 2–64 cores off each other's locks; more only costs memory.
const MAX_SHARDS: usize = 64;

pub(crate) struct KeyTable<A: LimitAlgorithm> {
    algorithm: A,
    key_hasher: RandomState,
    shards: Box<[PaddedShard<A::State>]>,
    shard_mask: usize,
    /// Charged for every key that finds its shard full of live states.
    overflow: Mutex<A::State>,
}

/// One shard per cache line, so locking one does not slow its neighbours.
#[repr(align(64))]
struct PaddedShard<S>(Mutex<Shard<S>>);

struct Shard<S> {
    states: HashMap<u64, S, BuildPrehashed>,
    capacity: usize,
    /// No state in this shard becomes evictable before this instant, so a
    /// full shard under a key-rotation flood is scanned at most once per
    /// instant at which something can actually be freed.
    next_eviction_at: Nanos,
}

/// Keys one shard can hold at least, when `max_keys` allows.
const MIN_SHARD_CAPACITY: usize = 64;

impl<A: LimitAlgorithm> KeyTable<A> {
    /// `max_keys >= 1`, as `LimitConfig::validate` ensures.
    pub(crate) fn new(algorithm: A, max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        // A power of two, with room for at least MIN_SHARD_CAPACITY keys in
        // each shard: with tiny shards, two keys hashing together would
        // push one into the overflow state while other shards sit empty.
        let wanted = (max_keys / MIN_SHARD_CAPACITY).clamp(1, MAX_SHARDS);
        let shard_count = 1 << wanted.ilog2();
        let shards = (0..shard_count)
            .map(|index| {
                // Spread the remainder so capacities sum to exactly max_keys.
                let capacity = max_keys / shard_count + usize::from(index < max_keys % shard_count);
                PaddedShard(Mutex::new(Shard {
                    states: HashMap::default(),
                    capacity,
                    next_eviction_at: Nanos::MAX,
                }))
            })
            .collect();
        let overflow = Mutex::new(algorithm.fresh_state(0));
        Self {
            algorithm,
            key_hasher: RandomState::new(),
            shards,
            shard_mask: shard_count - 1,
            overflow,
        }
    }

    pub(crate) fn check(&self, key: &[u8], now: Nanos) -> RateLimitOutcome {
        let hash = self.key_hasher.hash_one(key);
        let mut shard = self.shards[hash as usize & self.shard_mask].0.lock();
        // The hot path: a tracked key is updated in place, without allocating.
        if let Some(state) = shard.states.get_mut(&hash) {
            return self.algorithm.check(state, now);
        }
        if shard.states.len() >= shard.capacity {
            self.evict_fresh_states(&mut shard, now);
        }
        if shard.states.len() < shard.capacity {
            let mut state = self.algorithm.fresh_state(now);
            let outcome = self.algorithm.check(&mut state, now);
            shard.next_eviction_at = shard
                .next_eviction_at
                .min(self.algorithm.fresh_from(&state));
            shard.states.insert(hash, state);
            return outcome;
        }
        drop(shard);
        self.algorithm.check(&mut self.overflow.lock(), now)
    }

    /// Drops every state that is already as good as a fresh key's.
    fn evict_fresh_states(&self, shard: &mut Shard<A::State>, now: Nanos) {
        if now < shard.next_eviction_at {
            return;
        }
        let mut next_eviction_at = Nanos::MAX;
        shard.states.retain(|_, state| {
            let fresh_from = self.algorithm.fresh_from(state);
            let live = fresh_from > now;
            if live {
                next_eviction_at = next_eviction_at.min(fresh_from);
            }
            live
        });
        shard.next_eviction_at = next_eviction_at;
    }

    pub(crate) fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.0.lock().states.len())
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn shard_capacities(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|shard| shard.0.lock().capacity)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixed_window::FixedWindow;
    use super::*;

    #[test]
    fn shard_capacities_add_up_to_max_keys() {
        for max_keys in [1, 2, 3, 63, 64, 65, 10_000, 12_345] {
            let table = KeyTable::new(FixedWindow::new(1, 1_000_000), max_keys);
            let capacities = table.shard_capacities();
            assert!(capacities.len().is_power_of_two());
            assert!(capacities.len() <= MAX_SHARDS);
            assert!(capacities.iter().all(|&capacity| capacity >= 1));
            assert_eq!(capacities.iter().sum::<usize>(), max_keys);
        }
    }

    #[test]
    fn a_full_table_is_not_rescanned_before_anything_can_be_evicted() {
        let table = KeyTable::new(FixedWindow::new(1, 1_000), 1);
        assert!(table.check(b"first", 0).allowed);
        // The lone shard is full until t=1000: others share the overflow.
        assert!(table.check(b"second", 10).allowed);
        assert!(!table.check(b"third", 20).allowed);
        assert_eq!(table.shards[0].0.lock().next_eviction_at, 1_000);
        // From t=1000 "first" is fresh again and gives up its slot.
        assert!(table.check(b"fourth", 1_000).allowed);
        assert_eq!(table.tracked_keys(), 1);
        assert!(!table.check(b"fourth", 1_001).allowed);
    }
}
