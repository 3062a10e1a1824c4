//! The certificate handshakes use. Swapping it is one pointer write: a
//! connection already established keeps the key it negotiated with, and every
//! handshake after the swap picks up the new certificate.

use std::sync::Arc;

use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::{
    CertIdentityError, CertificateSummary, spiffe_id_of_certificate,
};
use parking_lot::RwLock;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::CertificateDer;

use super::status::{ExpiryGauge, Readiness};

#[derive(Debug, thiserror::Error)]
pub enum IssuedCertError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("leaf certificate: {0}")]
    Leaf(#[from] CertIdentityError),
}

/// A certificate chain with its key and what we need to know about the leaf.
#[derive(Debug)]
pub struct IssuedCert {
    certified: Arc<CertifiedKey>,
    spiffe_id: SpiffeId,
    serial_hex: String,
    not_before: i64,
    not_after: i64,
}

impl IssuedCert {
    /// `chain` is leaf first. Checks the leaf carries a SPIFFE ID of `trust_domain`;
    /// chain verification is the caller's job (it knows the bundle).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: Arc<dyn SigningKey>,
        trust_domain: &str,
    ) -> Result<Self, IssuedCertError> {
        let leaf = chain.first().ok_or(IssuedCertError::EmptyChain)?;
        let spiffe_id = spiffe_id_of_certificate(leaf.as_ref(), trust_domain)?;
        let summary = CertificateSummary::parse(leaf.as_ref())?;
        Ok(Self {
            certified: Arc::new(CertifiedKey::new(chain, key)),
            spiffe_id,
            serial_hex: summary.serial_hex,
            not_before: summary.not_before,
            not_after: summary.not_after,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }
    /// Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }
    /// Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }
}

/// Our current certificate, readiness and expiry gauge. Implements both rustls
/// resolvers so one store serves inbound and outbound handshakes.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<Arc<IssuedCert>>>,
    readiness: Readiness,
    expiry: ExpiryGauge,
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Make `cert` the one new handshakes present.
    pub fn install(&self, cert: IssuedCert) {
        let not_after = cert.not_after;
        *self.current.write() = Some(Arc::new(cert));
        self.expiry.set_not_after(not_after);
        self.readiness.set_ready();
    }

    pub fn current(&self) -> Option<Arc<IssuedCert>> {
        self.current.read().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    pub fn expiry(&self) -> &ExpiryGauge {
        &self.expiry
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().as_ref().map(|c| c.certified.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // rustls checks the key can sign one of the server's schemes itself.
        self.certified()
    }

    fn has_certs(&self) -> bool {
        self.current.read().is_some()
    }
}
