//! The CA as stored: four PEM texts, the same in a state directory and in the
//! Kubernetes Secret. Nothing here is parsed yet; [`super::Ca::load`] does
//! that and checks the pieces fit together.

/// The issuing certificate, optionally followed by the certificates above it.
pub const ISSUER_FILE: &str = "issuer.pem";
/// The issuing certificate's private key (PKCS#8 PEM).
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";
/// Certificates between the issuer and a root (optional; may include the root).
pub const CHAIN_FILE: &str = "chain.pem";
/// One or more root certificates agents trust.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// The keys cert-manager writes into a Certificate's Secret; accepted as an
/// alternative to ours so a cert-manager-issued intermediate works as is.
pub const CERT_MANAGER_CERT: &str = "tls.crt";
pub const CERT_MANAGER_KEY: &str = "tls.key";
pub const CERT_MANAGER_CA: &str = "ca.crt";

#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    pub issuer_pem: String,
    pub issuer_key_pem: String,
    pub chain_pem: String,
    pub trust_bundle_pem: String,
}

// The key never appears in logs or panics.
impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("issuer_pem", &self.issuer_pem)
            .field("issuer_key_pem", &"[redacted]")
            .field("chain_pem", &self.chain_pem)
            .field("trust_bundle_pem", &self.trust_bundle_pem)
            .finish()
    }
}

/// Whether this process created the CA or found one already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Created,
    Existing,
}
