//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.

use std::fmt;

/// A verified mesh peer identity, split into its parts once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    // Byte ranges into `uri`, so the parts cost no extra allocation.
    trust_domain: (usize, usize),
    namespace: (usize, usize),
    service_account: (usize, usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("not a spiffe:// URI")]
    Scheme,
    #[error("the trust domain is empty or not a lower-case DNS name")]
    TrustDomain,
    #[error("the path is not /ns/<namespace>/sa/<serviceaccount>")]
    Path,
}

impl SpiffeId {
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let slash = rest.find('/').ok_or(SpiffeIdError::Path)?;
        let td = &rest[..slash];
        if !is_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain);
        }
        let path = &rest[slash..];
        let mut parts = path.split('/');
        let (Some(""), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::Path);
        };
        if !is_path_segment(ns) || !is_path_segment(sa) {
            return Err(SpiffeIdError::Path);
        }
        let td_start = "spiffe://".len();
        let td_end = td_start + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        let sa_start = ns_end + "/sa/".len();
        Ok(Self {
            uri: uri.to_owned(),
            trust_domain: (td_start, td_end),
            namespace: (ns_start, ns_end),
            service_account: (sa_start, uri.len()),
        })
    }

    /// The identity of a service account.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }
    pub fn trust_domain(&self) -> &str {
        &self.uri[self.trust_domain.0..self.trust_domain.1]
    }
    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }
    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account.0..self.service_account.1]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
}

/// Kubernetes names: lower-case alphanumerics, `-` and `.`.
fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// A principal pattern as written in policies: an exact SPIFFE ID, a prefix
/// ending in `*`, or `*` alone (any authenticated peer).
pub fn principal_matches(pattern: &str, peer: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => peer.starts_with(prefix),
        None => pattern == peer,
    }
}

/// Checks a principal pattern written in a policy.
pub fn check_principal_pattern(pattern: &str) -> Result<(), SpiffeIdError> {
    if pattern == "*" {
        return Ok(());
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            if !prefix.starts_with("spiffe://") {
                return Err(SpiffeIdError::Scheme);
            }
            if prefix.len() <= "spiffe://".len() || prefix[..prefix.len() - 1].contains('*') {
                return Err(SpiffeIdError::Path);
            }
            Ok(())
        }
        None => SpiffeId::parse(pattern).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "orders");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
    }

    #[test]
    fn refuses_malformed_ids() {
        for (bad, err) in [
            ("https://cluster.local/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:///ns/a/sa/b", SpiffeIdError::TrustDomain),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                SpiffeIdError::TrustDomain,
            ),
            ("spiffe://td/ns/a", SpiffeIdError::Path),
            ("spiffe://td/ns/a/sa/b/extra", SpiffeIdError::Path),
            ("spiffe://td/ns//sa/b", SpiffeIdError::Path),
            ("spiffe://td/sa/b/ns/a", SpiffeIdError::Path),
            ("spiffe://td/ns/A/sa/b", SpiffeIdError::Path),
            ("spiffe://td", SpiffeIdError::Path),
        ] {
            assert_eq!(SpiffeId::parse(bad), Err(err), "{bad}");
        }
    }

    #[test]
    fn principal_patterns() {
        let peer = "spiffe://cluster.local/ns/shop/sa/orders";
        assert!(principal_matches(peer, peer));
        assert!(principal_matches("spiffe://cluster.local/ns/shop/*", peer));
        assert!(principal_matches("*", peer));
        assert!(!principal_matches(
            "spiffe://cluster.local/ns/shop/sa/order",
            peer
        ));
        assert!(!principal_matches("spiffe://cluster.local/ns/sho/*x", peer));
        assert!(check_principal_pattern("spiffe://cluster.local/ns/shop/*").is_ok());
        assert!(check_principal_pattern("*").is_ok());
        assert!(check_principal_pattern("orders").is_err());
        assert!(check_principal_pattern("spiffe://*").is_err());
        assert!(check_principal_pattern("spiffe://td/*/sa/*").is_err());
    }
}
