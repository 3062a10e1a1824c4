//! The rustls configurations mesh connections use, built in one place so the
//! protocol versions, cipher suites and verifiers cannot drift apart.

use std::sync::Arc;

use palisade_policy::identity::{SpiffeId, SpiffeIdError};
use rustls::SupportedCipherSuite;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, ring};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::UnixTime;

use super::bundle::SharedTrustBundle;
use super::peer::{PeerIdentityError, server_peer_identity};
use super::verify::{PeerVerifier, SpiffeClientVerifier, SpiffeServerVerifier};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Whether an inbound TLS client must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// A verified client certificate is required.
    Strict,
    /// A client certificate is verified when presented; without one the
    /// connection carries no identity and policy decides.
    Permissive,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("invalid trust domain {0:?}")]
    TrustDomain(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the clock is before 1970")]
    Clock,
}

/// The cipher suites mesh TLS offers and accepts: TLS 1.3's AEAD suites, and
/// for TLS 1.2 only ECDHE key exchange with an AEAD (forward secrecy, no CBC,
/// no static RSA). Listed in `docs/identity.md`.
pub fn allowed_cipher_suites() -> Vec<SupportedCipherSuite> {
    use ring::cipher_suite::*;
    vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// ring, restricted to [`allowed_cipher_suites`]. Passed explicitly to every
/// builder so no process-wide default provider is needed (or can interfere).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: allowed_cipher_suites(),
        ..ring::default_provider()
    })
}

/// TLS 1.3 is preferred (listed first); TLS 1.2 is the floor. rustls has no
/// code for anything older, so 1.0/1.1 can never be negotiated.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Everything needed to verify mesh peers: the trust bundle, our trust domain,
/// the crypto provider and the clock handshakes are checked against.
#[derive(Clone, Debug)]
pub struct MeshTrust {
    bundle: SharedTrustBundle,
    trust_domain: Arc<str>,
    provider: Arc<CryptoProvider>,
    time: Arc<dyn TimeProvider>,
}

impl MeshTrust {
    pub fn new(bundle: SharedTrustBundle, trust_domain: &str) -> Result<Self, TlsConfigError> {
        // Reuse the SPIFFE ID grammar to validate the trust domain.
        SpiffeId::for_service_account(trust_domain, "ns", "sa")
            .map_err(|_: SpiffeIdError| TlsConfigError::TrustDomain(trust_domain.to_owned()))?;
        Ok(Self {
            bundle,
            trust_domain: trust_domain.into(),
            provider: crypto_provider(),
            time: Arc::new(DefaultTimeProvider),
        })
    }

    /// Verify certificates against another clock (tests, or a trusted time source).
    pub fn with_time_provider(mut self, time: Arc<dyn TimeProvider>) -> Self {
        self.time = time;
        self
    }

    pub fn bundle(&self) -> &SharedTrustBundle {
        &self.bundle
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The time certificates are checked against.
    pub fn now(&self) -> Result<UnixTime, TlsConfigError> {
        self.time.current_time().ok_or(TlsConfigError::Clock)
    }

    /// The verified client identity of an accepted connection, for the
    /// request pipeline; `None` when the client sent no certificate.
    pub fn peer_identity<IO>(
        &self,
        stream: &tokio_rustls::server::TlsStream<IO>,
    ) -> Result<Option<SpiffeId>, PeerIdentityError> {
        server_peer_identity(stream, &self.trust_domain)
    }

    pub(crate) fn peer_verifier(&self) -> PeerVerifier {
        PeerVerifier::new(
            self.bundle.clone(),
            self.trust_domain.clone(),
            self.provider.signature_verification_algorithms,
        )
    }

    /// The client-side verifier, for callers building their own config.
    pub fn server_cert_verifier(&self, expected: Option<SpiffeId>) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier::new(self.peer_verifier(), expected))
    }

    /// The server-side verifier, for callers building their own config.
    pub fn client_cert_verifier(&self, mode: MtlsMode) -> Arc<SpiffeClientVerifier> {
        Arc::new(SpiffeClientVerifier::new(
            self.peer_verifier(),
            mode == MtlsMode::Strict,
        ))
    }

    /// Inbound: our certificate from `certs` (swappable), peers verified by
    /// the SPIFFE rule, ALPN `h2` then `http/1.1`.
    pub fn server_config(
        &self,
        certs: Arc<dyn ResolvesServerCert>,
        mode: MtlsMode,
    ) -> Result<ServerConfig, TlsConfigError> {
        let mut config =
            ServerConfig::builder_with_details(self.provider.clone(), self.time.clone())
                .with_protocol_versions(VERSIONS)?
                .with_client_cert_verifier(self.client_cert_verifier(mode))
                .with_cert_resolver(certs);
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        // No resumption: a resumed session skips certificate verification, so
        // an expired leaf or a root removed from the bundle could live on.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// Outbound: presents our certificate when `certs` is given, and requires
    /// the server to be `expected_server` when given. ALPN `h2`, `http/1.1`;
    /// callers may replace `alpn_protocols`.
    pub fn client_config(
        &self,
        certs: Option<Arc<dyn ResolvesClientCert>>,
        expected_server: Option<SpiffeId>,
    ) -> Result<ClientConfig, TlsConfigError> {
        let verifier = self.server_cert_verifier(expected_server);
        let builder = ClientConfig::builder_with_details(self.provider.clone(), self.time.clone())
            .with_protocol_versions(VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match certs {
            Some(certs) => builder.with_client_cert_resolver(certs),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls13_and_ecdhe_aead_tls12_suites() {
        for suite in allowed_cipher_suites() {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(
                name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
    }
}
