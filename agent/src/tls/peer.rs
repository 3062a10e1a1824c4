//! The verified peer identity of a finished handshake, for the request
//! pipeline. Only a certificate that passed our verifier can be in the session,
//! so reading the SPIFFE ID back out of it is safe.

use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::{CertIdentityError, spiffe_id_of_certificate};
use rustls::CommonState;

#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("the handshake has not finished")]
    Handshaking,
    #[error("peer certificate: {0}")]
    Certificate(#[from] CertIdentityError),
}

/// `None` when the peer presented no certificate (permissive mode).
pub fn peer_identity(
    conn: &CommonState,
    trust_domain: &str,
) -> Result<Option<SpiffeId>, PeerIdentityError> {
    if conn.is_handshaking() {
        return Err(PeerIdentityError::Handshaking);
    }
    match conn.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => Ok(Some(spiffe_id_of_certificate(leaf.as_ref(), trust_domain)?)),
        None => Ok(None),
    }
}

/// The client's identity on an accepted inbound connection.
pub fn server_peer_identity<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
    trust_domain: &str,
) -> Result<Option<SpiffeId>, PeerIdentityError> {
    peer_identity(stream.get_ref().1, trust_domain)
}
