//! Hasher for the shard maps, whose keys are already seeded 64-bit hashes:
//! hashing them again would only cost time.

use std::hash::{BuildHasherDefault, Hasher};

pub(crate) type BuildPrehashed = BuildHasherDefault<Prehashed>;

#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        // The low bits chose the shard, so they are equal within one map.
        // Rotating moves fresh bits to both ends, where the map takes its
        // bucket index (low bits) and control tag (top 7 bits).
        self.0.rotate_right(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; fold anything else in rather than panic.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}
