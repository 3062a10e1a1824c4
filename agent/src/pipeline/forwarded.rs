//! `X-Forwarded-For` for the app: the client address is the connection's
//! peer unless that peer is a trusted hop (`ipFilter.trustedProxies`).
//!
//! - From a trusted hop the chain it sent is kept and the hop appended, as
//!   every proxy in a chain does.
//! - From anyone else `X-Forwarded-For` is replaced by the peer's address,
//!   and `Forwarded` (RFC 7239) and `X-Real-IP` are removed: an app that logs
//!   or rate-limits by them must not be told a client address the client
//!   wrote itself.

use std::net::IpAddr;

use http::header::{FORWARDED, HeaderMap, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The `X-Forwarded-For` value naming `peer` (IPv4-mapped addresses as
/// IPv4); computed once per connection.
pub fn address_value(peer: IpAddr) -> HeaderValue {
    // An address always formats as visible ASCII.
    HeaderValue::try_from(peer.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets `X-Forwarded-For` from `peer` (an [`address_value`]); no allocation
/// for an untrusted peer.
pub fn set_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue, peer_is_trusted: bool) {
    if peer_is_trusted {
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !chain.is_empty() {
            let value = format!(
                "{}, {}",
                chain.join(", "),
                peer.to_str().unwrap_or_default()
            );
            if let Ok(v) = HeaderValue::try_from(value) {
                headers.insert(X_FORWARDED_FOR, v);
            }
            return;
        }
    } else {
        headers.remove(FORWARDED);
        headers.remove(X_REAL_IP);
    }
    headers.insert(X_FORWARDED_FOR, peer.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_untrusted_peer_cannot_name_another_client() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("forwarded", "for=9.9.9.9"),
            ("x-real-ip", "8.8.8.8"),
        ]);
        set_forwarded_for(&mut h, &address_value("10.0.0.7".parse().unwrap()), false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-real-ip").is_none());
        // Without any header the peer is still named.
        let mut h = HeaderMap::new();
        set_forwarded_for(
            &mut h,
            &address_value("::ffff:10.0.0.7".parse().unwrap()),
            false,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
    }

    #[test]
    fn a_trusted_hop_extends_the_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ]);
        set_forwarded_for(&mut h, &address_value("10.0.0.7".parse().unwrap()), true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 10.0.0.7");
        let mut h = HeaderMap::new();
        set_forwarded_for(&mut h, &address_value("10.0.0.7".parse().unwrap()), true);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
    }
}
