//! The client address: the TCP peer, or the first untrusted hop of
//! `X-Forwarded-For` when the peer is a trusted proxy.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Walks `X-Forwarded-For` from the right (nearest hop first) while each hop
/// is a trusted proxy; the first untrusted address is the client. With no
/// trusted proxies the header is ignored entirely. A malformed entry stops
/// the walk at the last trusted hop, so garbage cannot pick the address.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Hops in header order are client, proxy1, proxy2…; the last field
    // line is the one our nearest proxy appended.
    let lines: smallvec::SmallVec<[&str; 4]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    for line in lines.iter().rev() {
        for hop in line.rsplit(',') {
            let Ok(addr) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = addr;
            if !is_trusted(addr, trusted) {
                return client;
            }
        }
    }
    client
}

fn is_trusted(addr: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn header_ignored_without_trusted_proxies() {
        let h = headers(&["1.2.3.4"]);
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &[]), ip("10.0.0.9"));
    }

    #[test]
    fn header_ignored_when_peer_is_not_trusted() {
        let h = headers(&["1.2.3.4"]);
        let trusted = ["192.168.0.0/16".parse().unwrap()];
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn first_untrusted_hop_from_the_right_is_the_client() {
        // The client forged "6.6.6.6" at the left; only trusted hops are skipped.
        let h = headers(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &trusted), ip("1.2.3.4"));
    }

    #[test]
    fn garbage_stops_at_the_last_trusted_hop() {
        let h = headers(&["1.2.3.4, not-an-ip"]);
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &trusted), ip("10.0.0.9"));
    }
}
