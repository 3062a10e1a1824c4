//! Peer certificate verification: the chain must end at a root in the current
//! trust bundle at the handshake's time, and the leaf must carry exactly one
//! SPIFFE ID of our trust domain (`palisade_policy::spiffe_cert`). Host names
//! play no part: mesh identity is the SPIFFE ID, not DNS.

use std::fmt;
use std::sync::Arc;

use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::{CertIdentityError, spiffe_id_of_certificate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{SignatureScheme, pki_types};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::bundle::SharedTrustBundle;

/// Which end of a connection the certificate belongs to; checked against the
/// leaf's extended key usage (a leaf without the extension may be used for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate chain: {0}")]
    Chain(webpki::Error),
    #[error("certificate identity: {0}")]
    Identity(#[from] CertIdentityError),
    #[error("peer is {found}, expected {expected}")]
    UnexpectedPeer { expected: String, found: String },
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        use webpki::Error as W;
        let cert_err = match e {
            VerifyError::Chain(W::CertExpired { time, not_after }) => {
                CertificateError::ExpiredContext { time, not_after }
            }
            VerifyError::Chain(W::CertNotValidYet { time, not_before }) => {
                CertificateError::NotValidYetContext { time, not_before }
            }
            VerifyError::Chain(W::InvalidCertValidity) => CertificateError::Expired,
            VerifyError::Chain(W::UnknownIssuer) => CertificateError::UnknownIssuer,
            VerifyError::Chain(W::InvalidSignatureForPublicKey) => CertificateError::BadSignature,
            VerifyError::Chain(W::BadDer | W::BadDerTime) => CertificateError::BadEncoding,
            VerifyError::Chain(W::RequiredEkuNotFoundContext(_)) => {
                CertificateError::InvalidPurpose
            }
            // Everything else (identity rule, unexpected peer, exotic chain
            // faults) keeps its message; the peer sees a bad_certificate alert.
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_err)
    }
}

/// The shared core of both verifiers.
#[derive(Clone)]
pub(crate) struct PeerVerifier {
    bundle: SharedTrustBundle,
    trust_domain: Arc<str>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.bundle.current().roots().len())
            .finish()
    }
}

impl PeerVerifier {
    pub(crate) fn new(
        bundle: SharedTrustBundle,
        trust_domain: Arc<str>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            bundle,
            trust_domain,
            algs,
        }
    }

    /// Chain to the current bundle at `now`, then the SPIFFE ID rule.
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let bundle = self.bundle.current();
        self.verify_with(bundle.anchors(), end_entity, intermediates, now, usage)
    }

    pub(crate) fn verify_with(
        &self,
        anchors: &[pki_types::TrustAnchor<'_>],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        cert.verify_for_usage(self.algs.all, anchors, intermediates, now, eku, None, None)
            .map_err(VerifyError::Chain)?;
        Ok(spiffe_id_of_certificate(
            end_entity.as_ref(),
            &self.trust_domain,
        )?)
    }
}

/// The handshake-signature half of both verifier traits, identical for the
/// two: signatures are checked with the `inner` [`PeerVerifier`]'s algorithms.
macro_rules! handshake_signatures_by_inner_algs {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.inner.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.inner.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.algs.supported_schemes()
        }
    };
}

/// Client side: verifies the server's certificate, and its SPIFFE ID when the
/// caller knows whom it meant to reach (outbound: from discovery; identity
/// client: the operator's ID). The TLS server name is not checked.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    inner: PeerVerifier,
    expected: Option<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(inner: PeerVerifier, expected: Option<SpiffeId>) -> Self {
        Self { inner, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = self
            .inner
            .verify(end_entity, intermediates, now, Usage::Server)?;
        if let Some(expected) = &self.expected
            && *expected != found
        {
            return Err(VerifyError::UnexpectedPeer {
                expected: expected.to_string(),
                found: found.to_string(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_inner_algs!();
}

/// Server side: verifies a client certificate when one is presented; whether
/// one is required depends on the mTLS mode. Any SPIFFE ID of our trust domain
/// passes here — which peers may do what is policy's business, later.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: PeerVerifier,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(inner: PeerVerifier, mandatory: bool) -> Self {
        Self { inner, mandatory }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA hints: the bundle changes at run time and mesh clients hold one
        // certificate anyway, so hints would only leak the CA names.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_inner_algs!();
}
