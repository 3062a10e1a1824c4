//! The Palisade sidecar as a library; `main.rs` only parses flags and wires.
//!
//! - [`tls`]: SPIFFE-aware certificate verification and the rustls configs for
//!   mesh traffic (DESIGN §3, §6).
//! - [`identity`]: the workload key, certificate issuance from the operator,
//!   renewal and the certificate store handshakes read from.
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics` on the admin port (15020).

pub mod admin;
pub mod identity;
pub mod tls;
