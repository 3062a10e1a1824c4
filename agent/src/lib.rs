//! The Palisade sidecar as a library; `main.rs` only parses flags and wires.
//!
//! - [`tls`]: SPIFFE-aware certificate verification and the rustls configs for
//!   mesh traffic (DESIGN §3, §6).
//! - [`identity`]: the workload key, certificate issuance from the operator,
//!   renewal and the certificate store handshakes read from.
//! - [`authn`]: JWT and API-key authentication (DESIGN §4, §6): verified
//!   claims and client ids for the policy engine.
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics` on the admin port (15020).
//! - [`ratelimit`]: `scope: global` rate limits in a shared Redis, and the
//!   `RateLimit-*` / `Retry-After` response headers.

pub mod admin;
pub mod authn;
pub mod identity;
pub mod ratelimit;
pub mod tls;
