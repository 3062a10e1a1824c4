//! Certificate signing requests. Only the public key is taken from a CSR,
//! after its self-signature proves the requester holds the private key; the
//! subject and any requested extensions (SANs included) are ignored, because
//! the identity comes from the token.
//!
//! rcgen's `CertificateSigningRequestParams::from_pem` does verify the
//! signature, but it also refuses any extension it does not model and copies
//! the requested SANs into the parameters, so we parse with x509-parser and
//! keep nothing but the key.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// CSRs larger than this are refused before parsing.
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("not a PEM CERTIFICATE REQUEST")]
    Pem,
    #[error("not a PKCS#10 request")]
    Der,
    #[error("the signature does not verify with the request's own key")]
    Signature,
    #[error("unsupported key: {0}")]
    Key(&'static str),
}

/// A CSR whose signature has been checked; holds only its public key.
#[derive(Debug)]
pub struct VerifiedCsr {
    public_key: SubjectPublicKeyInfo,
}

impl VerifiedCsr {
    pub fn from_pem(pem: &str) -> Result<Self, CsrError> {
        if pem.len() > MAX_CSR_PEM_BYTES {
            return Err(CsrError::TooLarge);
        }
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| CsrError::Pem)?;
        Self::from_der(der.as_ref())
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Der)?;
        if !rest.is_empty() {
            return Err(CsrError::Der);
        }
        csr.verify_signature().map_err(|_| CsrError::Signature)?;
        let spki = &csr.certification_request_info.subject_pki;
        check_key(spki)?;
        let public_key =
            SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| CsrError::Key("algorithm"))?;
        Ok(Self { public_key })
    }

    pub fn public_key(&self) -> &SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// ECDSA P-256/P-384, Ed25519, or RSA of at least 2048 bits — what the
/// verifiers on the other end (webpki with ring) accept.
fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => match point.key_size() {
            256 | 384 => Ok(()),
            _ => Err(CsrError::Key("EC keys must be P-256 or P-384")),
        },
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok(()),
        Ok(PublicKey::RSA(_)) => Err(CsrError::Key("RSA keys must be at least 2048 bits")),
        // Ed25519 is not decoded into a variant of its own.
        Ok(PublicKey::Unknown(_))
            if spki.algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519 =>
        {
            Ok(())
        }
        _ => Err(CsrError::Key("use ECDSA P-256")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};

    fn csr_der(key: &KeyPair) -> Vec<u8> {
        let params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_p256_and_ed25519() {
        for alg in [&PKCS_ECDSA_P256_SHA256, &PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = VerifiedCsr::from_der(&csr_der(&key)).unwrap();
            use rcgen::PublicKeyData;
            assert_eq!(csr.public_key().der_bytes(), key.public_key_raw());
        }
    }

    #[test]
    fn refuses_a_tampered_signature() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_der(&key);
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert_eq!(
            VerifiedCsr::from_der(&der).unwrap_err(),
            CsrError::Signature
        );
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert_eq!(VerifiedCsr::from_pem("hello").unwrap_err(), CsrError::Pem);
        assert_eq!(
            VerifiedCsr::from_der(b"\x30\x03\x02\x01\x00").unwrap_err(),
            CsrError::Der
        );
        let big = "A".repeat(MAX_CSR_PEM_BYTES + 1);
        assert_eq!(VerifiedCsr::from_pem(&big).unwrap_err(), CsrError::TooLarge);
    }
}
