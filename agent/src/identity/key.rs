//! The workload's private key: ECDSA P-256, generated in memory and never
//! written anywhere. A fresh key is made for every certificate, so renewal
//! also rotates the key.

use std::fmt;
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::sign::SigningKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating the workload key: {0}")]
    Generate(rcgen::Error),
    #[error("building the certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("loading the workload key into TLS: {0}")]
    Load(rustls::Error),
}

pub struct WorkloadKey {
    key: KeyPair,
}

// Never print key material, not even in debug logs.
impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(ECDSA P-256, redacted)")
    }
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, KeyError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(KeyError::Generate)?;
        Ok(Self { key })
    }

    /// A PKCS#10 request with no subject and no SANs: the operator writes the
    /// identity the token proves, never one the CSR asks for.
    pub fn csr_pem(&self) -> Result<String, KeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(KeyError::Csr)
    }

    /// The raw public key (uncompressed EC point), to check that an issued
    /// certificate is really for this key.
    pub fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// The key as rustls signs handshakes with it.
    pub fn signing_key(&self, provider: &CryptoProvider) -> Result<Arc<dyn SigningKey>, KeyError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        provider
            .key_provider
            .load_private_key(der)
            .map_err(KeyError::Load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_parses_and_carries_the_key() {
        let key = WorkloadKey::generate().unwrap();
        let pem = key.csr_pem().unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert!(csr.params.subject_alt_names.is_empty());
        assert!(
            key.signing_key(&rustls::crypto::ring::default_provider())
                .is_ok()
        );
        assert!(!format!("{key:?}").contains("BEGIN"));
    }
}
