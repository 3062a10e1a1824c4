//! The issuing certificate authority (DESIGN §3).
//!
//! One concept per file: [`material`] is the CA as stored, [`generate`]
//! makes a new root, [`dir`] and [`secret`] are the two stores (state
//! directory, Kubernetes Secret), [`csr`] checks signing requests, and
//! [`leaf`] is the profile of the certificates handed out; [`reload`]
//! keeps local mode's CA in step with its files. This file holds
//! [`Ca`], the loaded and checked CA that signs.

pub mod csr;
pub mod dir;
pub mod generate;
pub mod leaf;
pub mod material;
pub mod pem;
pub mod reload;
pub mod secret;
pub mod serial;

use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use palisade_policy::identity::SpiffeId;

pub use leaf::{IssuedLeaf, LeafProfile};
pub use material::{CaMaterial, Origin};

/// Certificates are back-dated so a peer whose clock runs a little behind
/// still accepts them.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{file}: {source}")]
    Pem {
        file: &'static str,
        source: pem::PemError,
    },
    #[error("{file}: not a certificate: {reason}")]
    Certificate { file: &'static str, reason: String },
    #[error("issuer key: not a PKCS#8 PEM private key rcgen can use ({0})")]
    Key(rcgen::Error),
    #[error("the issuer certificate is not a CA (basicConstraints CA:TRUE is required)")]
    IssuerNotCa,
    #[error("the issuer certificate is not valid now (it runs from {not_before} to {not_after})")]
    IssuerExpired {
        not_before: String,
        not_after: String,
    },
    #[error("the issuer key does not belong to the issuer certificate")]
    KeyMismatch,
    #[error(
        "the issuer does not chain to the trust bundle with the given chain: {0} \
         (chain.pem must hold every certificate between the issuer and a bundle root)"
    )]
    Chain(webpki::Error),
    #[error("generating a certificate: {0}")]
    Generate(rcgen::Error),
    #[error("signing a certificate: {0}")]
    Sign(rcgen::Error),
    #[error("invalid SPIFFE ID or name: {0}")]
    Name(String),
}

/// A loaded CA whose issuer, key, chain and trust bundle have been checked
/// to fit together (a probe leaf is issued and verified at load time).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
    /// Certificates served after the leaf: the issuer and anything between
    /// it and a root, minus the roots themselves (peers have those).
    intermediates: Vec<CertificateDer<'static>>,
    trust_bundle: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("intermediates", &self.intermediates.len())
            .field("trust_bundle", &self.root_fingerprints())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Parses and checks stored CA material.
    pub fn load(material: &CaMaterial) -> Result<Self, CaError> {
        let issuer_file = material::ISSUER_FILE;
        let mut issuer_certs =
            pem::certificates_nonempty(&material.issuer_pem).map_err(|source| CaError::Pem {
                file: issuer_file,
                source,
            })?;
        let issuer_der = issuer_certs.remove(0);
        // The rest of issuer.pem (cert-manager's tls.crt carries its chain
        // this way) plus chain.pem.
        let mut chain = issuer_certs;
        chain.extend(
            pem::certificates(&material.chain_pem).map_err(|source| CaError::Pem {
                file: material::CHAIN_FILE,
                source,
            })?,
        );
        let trust_bundle =
            pem::certificates_nonempty(&material.trust_bundle_pem).map_err(|source| {
                CaError::Pem {
                    file: material::TRUST_BUNDLE_FILE,
                    source,
                }
            })?;
        for root in &trust_bundle {
            parse(root, material::TRUST_BUNDLE_FILE)?;
        }

        let key = KeyPair::from_pem(&material.issuer_key_pem).map_err(CaError::Key)?;
        let parsed = parse(&issuer_der, issuer_file)?;
        if !parsed.is_ca() {
            return Err(CaError::IssuerNotCa);
        }
        // Compare the key bits, not the whole SPKI: encoders differ in how they
        // write algorithm parameters.
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let validity = parsed.validity();
        if !validity.is_valid() {
            return Err(CaError::IssuerExpired {
                not_before: validity.not_before.to_string(),
                not_after: validity.not_after.to_string(),
            });
        }
        let issuer_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));

        let issuer =
            Issuer::from_ca_cert_der(&issuer_der, key).map_err(|e| CaError::Certificate {
                file: issuer_file,
                reason: e.to_string(),
            })?;
        let intermediates = std::iter::once(issuer_der)
            .chain(chain)
            .filter(|c| !trust_bundle.contains(c))
            .collect();
        let ca = Self {
            issuer,
            issuer_not_after,
            intermediates,
            trust_bundle,
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Issues a certificate for `public_key` with the given profile.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        profile: &LeafProfile,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        leaf::issue(
            &self.issuer,
            self.issuer_not_after,
            public_key,
            profile,
            now,
        )
    }

    /// The certificates a leaf is served with, after the leaf itself.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    pub fn intermediates_pem(&self) -> Vec<String> {
        self.intermediates
            .iter()
            .map(|c| pem::certificate(c))
            .collect()
    }

    pub fn trust_bundle_pem(&self) -> Vec<String> {
        self.trust_bundle
            .iter()
            .map(|c| pem::certificate(c))
            .collect()
    }

    /// `sha256:<hex>` of each root in the bundle, in bundle order.
    pub fn root_fingerprints(&self) -> Vec<String> {
        self.trust_bundle.iter().map(|c| fingerprint(c)).collect()
    }

    /// Verifies a leaf chain against the trust bundle, as a peer would.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), webpki::Error> {
        let anchors = self
            .trust_bundle
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()?;
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }

    /// Issues a throw-away leaf and verifies it the way an agent will, so a
    /// mismatched key, a missing intermediate or a root absent from the
    /// bundle stops the operator at start-up instead of at the first peer.
    fn self_check(&self) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let probe = SpiffeId::parse("spiffe://palisade.invalid/ns/probe/sa/probe")
            .map_err(|e| CaError::Name(e.to_string()))?;
        let now = SystemTime::now();
        let leaf = self.issue(
            &key,
            &LeafProfile::workload(probe, Duration::from_secs(60)),
            now,
        )?;
        self.verify(&leaf.der, &self.intermediates, now)
            .map_err(CaError::Chain)
    }
}

/// `sha256:<hex>` of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

fn parse<'a>(
    der: &'a CertificateDer<'_>,
    file: &'static str,
) -> Result<X509Certificate<'a>, CaError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| CaError::Certificate {
        file,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CaError::Certificate {
            file,
            reason: "trailing bytes".into(),
        });
    }
    Ok(cert)
}
