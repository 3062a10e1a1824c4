//! Mesh TLS: who we trust (a hot-swappable bundle of roots), how a peer's
//! certificate is verified (chain + SPIFFE ID rule), the rustls configs built
//! from that, and reading the verified identity back out of a connection.

mod bundle;
mod config;
mod peer;
mod verify;

pub use bundle::{BundleError, SharedTrustBundle, TrustBundle};
pub use config::{
    ALPN_H2, ALPN_HTTP11, MeshTrust, MtlsMode, TlsConfigError, allowed_cipher_suites,
    crypto_provider,
};
pub use peer::{PeerIdentityError, peer_identity, server_peer_identity};
pub use verify::{SpiffeClientVerifier, SpiffeServerVerifier, Usage, VerifyError};
