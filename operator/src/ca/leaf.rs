//! The profile of issued certificates: SPIFFE X.509-SVIDs (one URI SAN),
//! usable as TLS client and server, short-lived, random serial.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;

use palisade_policy::identity::SpiffeId;

use super::serial::random_serial;
use super::{BACKDATE, CaError, pem};

/// What goes into a leaf besides the key.
#[derive(Clone, Debug)]
pub struct LeafProfile {
    pub spiffe_id: SpiffeId,
    /// Only the operator's own serving certificate carries these; workload
    /// certificates are built with [`LeafProfile::workload`], which has none.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub ttl: Duration,
}

impl LeafProfile {
    /// A workload certificate: the SPIFFE ID is the only SAN.
    pub fn workload(spiffe_id: SpiffeId, ttl: Duration) -> Self {
        Self {
            spiffe_id,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            ttl,
        }
    }
}

/// An issued certificate and the facts worth logging about it.
#[derive(Clone, Debug)]
pub struct IssuedLeaf {
    pub der: CertificateDer<'static>,
    /// Lower-case hex of the serial number.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssuedLeaf {
    pub fn pem(&self) -> String {
        pem::certificate(&self.der)
    }
}

pub(super) fn issue(
    issuer: &Issuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
    public_key: &impl PublicKeyData,
    profile: &LeafProfile,
    now: SystemTime,
) -> Result<IssuedLeaf, CaError> {
    let mut params = CertificateParams::default();
    // Empty subject: the identity lives in the SAN (SPIFFE X.509-SVID), and
    // rcgen then marks the SAN extension critical as RFC 5280 requires.
    params.distinguished_name = DistinguishedName::new();
    let uri = profile
        .spiffe_id
        .as_str()
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Name(e.to_string()))?;
    params.subject_alt_names.push(SanType::URI(uri));
    for name in &profile.dns_names {
        let dns = name
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Name(e.to_string()))?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    for ip in &profile.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    // TLS 1.3 and ECDHE suites only ever sign with the leaf key.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let serial = random_serial();
    let serial_hex = hex::encode(serial.to_bytes());
    params.serial_number = Some(serial);
    let not_before = now - BACKDATE;
    // A leaf never outlives its issuer.
    let not_after = (now + profile.ttl).min(issuer_not_after);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params
        .signed_by(public_key, issuer)
        .map_err(CaError::Sign)?;
    Ok(IssuedLeaf {
        der: cert.der().clone(),
        serial: serial_hex,
        not_before: truncate_to_seconds(not_before),
        not_after: truncate_to_seconds(not_after),
    })
}

/// X.509 times have one-second resolution; report what the certificate says.
fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}
