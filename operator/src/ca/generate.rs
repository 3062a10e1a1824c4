//! A fresh self-signed root, used when no CA exists yet.

use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};

use super::material::CaMaterial;
use super::serial::random_serial;
use super::{BACKDATE, CaError};

/// Ten years: the root is rotated deliberately (docs/operations.md), not by expiry.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A new ECDSA P-256 root that is also the issuer. One level of
/// intermediate is allowed below it so an operator can later move issuance
/// to an intermediate without replacing the root.
pub fn generate_root(now: SystemTime) -> Result<CaMaterial, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    // A short random suffix keeps successive roots distinguishable by name
    // while two of them sit in the trust bundle during a rotation.
    let mut tag = [0u8; 4];
    rand::rng().fill_bytes(&mut tag);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Palisade");
    dn.push(
        DnType::CommonName,
        format!("Palisade root CA {}", hex::encode(tag)),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    let pem = cert.pem();
    Ok(CaMaterial {
        issuer_pem: pem.clone(),
        issuer_key_pem: key.serialize_pem(),
        chain_pem: String::new(),
        trust_bundle_pem: pem,
    })
}
