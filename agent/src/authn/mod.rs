//! Request authentication: JWTs and API keys (DESIGN §4, the `authenticate`
//! step of §6). User-facing behaviour is in `docs/authentication.md`.
//!
//! - [`jwks`]: parse a JWKS document into verification keys (public keys only).
//! - [`jwks_fetch`]: fetch a JWKS by URI, cache it as `Cache-Control` says,
//!   refetch on an unknown `kid` at a bounded rate.
//! - [`jwt`]: [`JwtVerifier`], built from the policy's `JwtProvider`s; verified
//!   tokens are cached by their SHA-256 until they expire.
//! - [`api_key`]: [`ApiKeyVerifier`], built from the policy's `ApiKeyAuth`;
//!   keys are compared by hash, in constant time.
//!
//! Both verifiers answer with something the policy engine takes directly:
//! verified claims (`Request::jwt_claims`), a client id
//! (`Request::api_key_client`), or an error whose `code()` is a short stable
//! string for `Request::credential_error` and audit. A "missing" error means no
//! credential was presented, which is not a credential error: the caller leaves
//! `credential_error` empty and lets policy decide. No error ever contains a
//! token or a key.

pub mod api_key;
pub mod jwks;
pub mod jwks_fetch;
pub mod jwt;

#[cfg(test)]
mod test_support;

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use api_key::{ApiKeyError, ApiKeyVerifier};
pub use jwks::{JwkKey, JwksError, KeySet};
pub use jwks_fetch::{JwksFetchConfig, JwksFetcher};
pub use jwt::{JwtError, JwtOptions, JwtVerifier, VerifiedJwt};

/// Wall-clock time in whole seconds since the Unix epoch, injectable so tests
/// can move time (token expiry, JWKS cache ages, refetch rate).
pub trait Clock: Send + Sync + fmt::Debug {
    fn unix_seconds(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_seconds(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }
    }
}

/// A clock that only moves when told to (tests, simulations).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(unix_seconds: i64) -> Self {
        ManualClock(AtomicI64::new(unix_seconds))
    }

    pub fn set(&self, unix_seconds: i64) {
        self.0.store(unix_seconds, Ordering::SeqCst);
    }

    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_seconds(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Equality of two byte strings whose running time depends only on their
/// lengths, never on where they differ. Lengths are not secret here (both
/// sides are SHA-256 digests).
#[inline(never)]
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimizer from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authn_ct_eq() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(!ct_eq(&[0, 2, 3], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2], &[1, 2, 3]));
    }

    #[test]
    fn authn_manual_clock() {
        let c = ManualClock::new(100);
        c.advance(5);
        assert_eq!(c.unix_seconds(), 105);
        c.set(7);
        assert_eq!(c.unix_seconds(), 7);
        assert!(SystemClock.unix_seconds() > 1_600_000_000);
    }
}

#[cfg(test)]
mod robustness;
