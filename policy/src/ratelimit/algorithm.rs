//! The contract between the key table and the per-key arithmetic of each
//! algorithm, so sharding and eviction are written once.

use super::clock::Nanos;
use super::outcome::RateLimitOutcome;

pub(crate) trait LimitAlgorithm: Send + Sync {
    /// What is remembered per key; small and `Copy`-cheap.
    type State: Send;

    /// The state of a key first seen at `now`.
    fn fresh_state(&self, now: Nanos) -> Self::State;

    /// Decides one request at `now`, charging `state` if it is admitted.
    /// `now` may be earlier than times seen before; that must never help.
    fn check(&self, state: &mut Self::State, now: Nanos) -> RateLimitOutcome;

    /// The earliest instant from which `state` admits exactly what a fresh key
    /// would, so forgetting it then loses nothing. Never decreases as the
    /// state is charged, which lets the table cache a lower bound.
    fn fresh_from(&self, state: &Self::State) -> Nanos;
}
