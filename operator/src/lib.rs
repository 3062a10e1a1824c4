//! Palisade control plane library: the pieces `palisade-operator` wires
//! together. Kept as a library so integration tests can drive the CA store
//! and token review against a mock Kubernetes API server.

pub mod admin;
pub mod ca;
pub mod discovery;
pub mod identity;
pub mod server;
pub mod tls;
pub mod tokens;

/// The audience agents request for their projected ServiceAccount token and
/// the one TokenReview must confirm (DESIGN §3).
pub const TOKEN_AUDIENCE: &str = "palisade.dev";

/// The operator's own ServiceAccount, which names its serving identity.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "palisade-operator";
