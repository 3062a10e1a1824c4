//! Reading workload identities out of X.509 certificates (DESIGN §3).
//!
//! Pure: parses DER handed in, checks nothing about time or signatures (that is
//! the chain verifier's job). Used by the agent after a chain has verified and by
//! `palisadectl certs inspect`.

use std::fmt::Write as _;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::identity::{SpiffeId, SpiffeIdError};

/// Why a certificate does not carry a usable mesh identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertIdentityError {
    #[error("the certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("the certificate has no URI SAN (a SPIFFE ID is required)")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; exactly one SPIFFE ID is allowed")]
    MultipleUriSans(usize),
    #[error("the URI SAN is not a workload SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] SpiffeIdError),
    #[error("the SPIFFE ID is in trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain { expected: String, found: String },
    #[error("a CA certificate cannot be a workload identity")]
    CaCertificate,
}

/// The SPIFFE ID a leaf certificate proves, by the mesh's rule: exactly one URI
/// SAN, `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`, and not a CA. DNS SANs may sit
/// beside it and are ignored.
pub fn spiffe_id_of_certificate(
    der: &[u8],
    trust_domain: &str,
) -> Result<SpiffeId, CertIdentityError> {
    let cert = parse(der)?;
    if cert.is_ca() {
        return Err(CertIdentityError::CaCertificate);
    }
    let uris = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(CertIdentityError::NoUriSan),
        [one] => *one,
        more => return Err(CertIdentityError::MultipleUriSans(more.len())),
    };
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain() != trust_domain {
        return Err(CertIdentityError::WrongTrustDomain {
            expected: trust_domain.to_owned(),
            found: id.trust_domain().to_owned(),
        });
    }
    Ok(id)
}

/// What `palisadectl certs inspect` shows about one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    pub subject: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lower-case hex, no separators.
    pub serial_hex: String,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub is_ca: bool,
}

impl CertificateSummary {
    pub fn parse(der: &[u8]) -> Result<Self, CertIdentityError> {
        let cert = parse(der)?;
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        for name in general_names(&cert)? {
            match name {
                GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                _ => {}
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            serial_hex: serial_hex(cert.raw_serial()),
            uri_sans,
            dns_sans,
            is_ca: cert.is_ca(),
        })
    }
}

/// Lower-case hex of a certificate serial, leading zero bytes (DER sign padding)
/// removed so the same serial always prints the same.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let mut out = String::with_capacity(raw.len() * 2);
    for b in &raw[start..] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertIdentityError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertIdentityError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

fn general_names<'c>(
    cert: &'c X509Certificate<'_>,
) -> Result<&'c [GeneralName<'c>], CertIdentityError> {
    // A duplicated SAN extension is an error here, not "take the first".
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => Ok(&ext.value.general_names),
        Ok(None) => Ok(&[]),
        Err(e) => Err(CertIdentityError::Malformed(e.to_string())),
    }
}

fn uri_sans<'c>(cert: &'c X509Certificate<'_>) -> Result<Vec<&'c str>, CertIdentityError> {
    Ok(general_names(cert)?
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType, SerialNumber,
    };

    const TD: &str = "cluster.local";

    fn ca() -> Issuer<'static, KeyPair> {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test root");
        Issuer::new(p, KeyPair::generate().unwrap())
    }

    fn leaf(sans: Vec<SanType>, is_ca: bool) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x8a, 0x01]));
        if is_ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &ca()).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn one_spiffe_uri_is_the_identity() {
        let der = leaf(vec![uri("spiffe://cluster.local/ns/shop/sa/orders")], false);
        let id = spiffe_id_of_certificate(&der, TD).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(id.namespace(), "shop");
    }

    #[test]
    fn dns_sans_beside_the_uri_are_ignored() {
        let der = leaf(
            vec![
                dns("orders.shop.svc"),
                uri("spiffe://cluster.local/ns/shop/sa/orders"),
            ],
            false,
        );
        assert!(spiffe_id_of_certificate(&der, TD).is_ok());
    }

    #[test]
    fn dns_only_is_refused() {
        let der = leaf(vec![dns("orders.shop.svc")], false);
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::NoUriSan)
        );
    }

    #[test]
    fn no_san_is_refused() {
        let der = leaf(vec![], false);
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::NoUriSan)
        );
    }

    #[test]
    fn two_uri_sans_are_refused() {
        let der = leaf(
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/orders"),
                uri("spiffe://cluster.local/ns/shop/sa/admin"),
            ],
            false,
        );
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::MultipleUriSans(2))
        );
    }

    #[test]
    fn a_spiffe_uri_beside_a_non_spiffe_uri_is_refused() {
        let der = leaf(
            vec![
                uri("https://example.com/x"),
                uri("spiffe://cluster.local/ns/shop/sa/orders"),
            ],
            false,
        );
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::MultipleUriSans(2))
        );
    }

    #[test]
    fn wrong_trust_domain_is_refused() {
        let der = leaf(vec![uri("spiffe://evil.example/ns/shop/sa/orders")], false);
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::WrongTrustDomain {
                expected: TD.into(),
                found: "evil.example".into()
            })
        );
    }

    #[test]
    fn non_workload_paths_and_schemes_are_refused() {
        for bad in [
            "https://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/workload/orders",
            "spiffe://cluster.local/ns/shop/sa/orders/extra",
        ] {
            let der = leaf(vec![uri(bad)], false);
            assert!(
                matches!(
                    spiffe_id_of_certificate(&der, TD),
                    Err(CertIdentityError::InvalidSpiffeId(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn ca_certificates_are_not_identities() {
        let der = leaf(vec![uri("spiffe://cluster.local/ns/shop/sa/orders")], true);
        assert_eq!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::CaCertificate)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            spiffe_id_of_certificate(b"not a cert", TD),
            Err(CertIdentityError::Malformed(_))
        ));
        let mut der = leaf(vec![uri("spiffe://cluster.local/ns/a/sa/b")], false);
        der.push(0);
        assert!(matches!(
            spiffe_id_of_certificate(&der, TD),
            Err(CertIdentityError::Malformed(_))
        ));
    }

    #[test]
    fn summary_lists_the_fields_inspect_shows() {
        let der = leaf(
            vec![uri("spiffe://cluster.local/ns/shop/sa/orders"), dns("a.b")],
            false,
        );
        let s = CertificateSummary::parse(&der).unwrap();
        assert_eq!(s.uri_sans, ["spiffe://cluster.local/ns/shop/sa/orders"]);
        assert_eq!(s.dns_sans, ["a.b"]);
        assert_eq!(s.serial_hex, "8a01");
        assert!(s.issuer.contains("test root"), "{}", s.issuer);
        assert!(!s.is_ca);
        assert!(s.not_before < s.not_after);
    }

    #[test]
    fn serial_hex_strips_sign_padding() {
        assert_eq!(serial_hex(&[0x00, 0xff]), "ff");
        assert_eq!(serial_hex(&[0x01, 0x00]), "0100");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "");
    }
}
