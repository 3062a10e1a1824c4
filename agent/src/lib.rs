//! The Palisade sidecar as a library; `main.rs` only parses flags and wires.
//!
//! - [`tls`]: SPIFFE-aware certificate verification and the rustls configs for
//!   mesh traffic (DESIGN §3, §6).
//! - [`identity`]: the workload key, certificate issuance from the operator,
//!   renewal and the certificate store handshakes read from.
//! - [`authn`]: JWT and API-key authentication (DESIGN §4, §6): verified
//!   claims and client ids for the policy engine.
//! - [`capture`]: transparent capture, the iptables rules `palisade-agent
//!   init` installs (DESIGN §6).
//! - [`admin`]: `/healthz`, `/readyz` and `/metrics` on the admin port (15020).
//! - [`pipeline`]: the pure per-request header steps of the inbound path
//!   (identity-header stripping, `x-request-id`, XFCC, deny responses,
//!   deprecation headers).
//! - [`inbound`]: the inbound proxy in explicit mode (listen here, forward
//!   there), running the pipeline and the policy engine per request.
//! - [`outbound`]: the outbound proxy: plaintext from the app, an mTLS
//!   tunnel to meshed destinations with the server's SPIFFE ID verified.
//! - [`ratelimit`]: `scope: global` rate limits in a shared Redis, and the
//!   `RateLimit-*` / `Retry-After` response headers.
//! - [`discovery`]: the policy stream from the operator (ACK/NACK, last
//!   good policy kept while the operator is unreachable).
//! - [`sidecar`]: all of the above assembled into the running sidecar
//!   (`palisade-agent run`), with its graceful drain on SIGTERM.

pub mod admin;
pub mod audit;
pub mod authn;
pub mod capture;
pub mod discovery;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod orig_dst;
pub mod outbound;
pub mod pipeline;
pub mod ratelimit;
pub mod sidecar;
pub mod tls;
