//! `x-forwarded-client-cert` for the app, from the verified peer certificate
//! only (DESIGN §4). Runs after [`super::strip`] removed whatever the client
//! sent.
//!
//! Envoy's format, with the elements this agent knows in Envoy's order:
//!
//! ```text
//! By=<local SPIFFE ID>;Hash=<hex SHA-256 of the peer certificate DER>;URI=<peer SPIFFE ID>
//! ```
//!
//! `Hash` is present only when the peer certificate's DER is given. A value
//! containing `,`, `;`, `=`, `"` or `\` is written double-quoted with `"`
//! and `\` escaped by a backslash. Validated SPIFFE IDs never contain those
//! characters, so in practice values are bare; the quoting keeps the header
//! unambiguous if that ever changes. Plaintext requests (no verified peer)
//! get no header at all.
//!
//! Allocation: one `String` sized up front, moved into the `HeaderValue`.

use http::header::{HeaderMap, HeaderValue};
use palisade_policy::identity::SpiffeId;
use sha2::{Digest, Sha256};

use super::strip::X_FORWARDED_CLIENT_CERT;

/// The verified peer of an mTLS connection.
#[derive(Clone, Copy, Debug)]
pub struct PeerCert<'a> {
    pub id: &'a SpiffeId,
    /// The leaf certificate's DER, when the handshake kept it.
    pub der: Option<&'a [u8]>,
}

/// The header value for a verified peer.
pub fn xfcc_value(local: &SpiffeId, peer: PeerCert<'_>) -> HeaderValue {
    let (local, uri) = (local.as_str(), peer.id.as_str());
    let hash_len = if peer.der.is_some() {
        ";Hash=".len() + 64
    } else {
        0
    };
    let mut out =
        String::with_capacity("By=".len() + local.len() + hash_len + ";URI=".len() + uri.len() + 4);
    out.push_str("By=");
    push_value(&mut out, local);
    if let Some(der) = peer.der {
        out.push_str(";Hash=");
        push_hex(&mut out, &Sha256::digest(der));
    }
    out.push_str(";URI=");
    push_value(&mut out, uri);
    // SPIFFE IDs are ASCII without control characters; quoting keeps it so.
    HeaderValue::try_from(out).expect("XFCC value is visible ASCII")
}

/// Sets `x-forwarded-client-cert` for a verified peer, replacing any value;
/// removes it for plaintext (`peer: None`).
pub fn set_xfcc(headers: &mut HeaderMap, local: &SpiffeId, peer: Option<PeerCert<'_>>) {
    match peer {
        Some(peer) => {
            headers.insert(X_FORWARDED_CLIENT_CERT, xfcc_value(local, peer));
        }
        None => {
            headers.remove(X_FORWARDED_CLIENT_CERT);
        }
    }
}

fn push_value(out: &mut String, value: &str) {
    if !value.contains([',', ';', '=', '"', '\\']) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    /// The header value for a verified `peer` with `der` (if any) at `local`.
    fn value_for(local: &SpiffeId, peer: &SpiffeId, der: Option<&[u8]>) -> HeaderValue {
        xfcc_value(local, PeerCert { id: peer, der })
    }

    #[test]
    fn format_without_hash() {
        let local = id("spiffe://cluster.local/ns/prod/sa/api");
        let peer = id("spiffe://cluster.local/ns/web/sa/frontend");
        let v = value_for(&local, &peer, None);
        assert_eq!(
            v,
            "By=spiffe://cluster.local/ns/prod/sa/api;URI=spiffe://cluster.local/ns/web/sa/frontend"
        );
    }

    #[test]
    fn format_with_hash_of_the_der() {
        let local = id("spiffe://td/ns/a/sa/b");
        let peer = id("spiffe://td/ns/c/sa/d");
        // SHA-256("abc"), the FIPS 180-2 test vector.
        let v = value_for(&local, &peer, Some(b"abc"));
        assert_eq!(
            v,
            "By=spiffe://td/ns/a/sa/b;\
             Hash=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad;\
             URI=spiffe://td/ns/c/sa/d"
        );
    }

    #[test]
    fn values_with_separators_are_quoted_and_escaped() {
        let mut out = String::new();
        push_value(&mut out, "plain-value.ok/x");
        assert_eq!(out, "plain-value.ok/x");
        for (raw, written) in [
            ("a,b", r#""a,b""#),
            ("a;b", r#""a;b""#),
            ("a=b", r#""a=b""#),
            (r#"say "hi""#, r#""say \"hi\"""#),
            (r"back\slash", r#""back\\slash""#),
        ] {
            let mut out = String::new();
            push_value(&mut out, raw);
            assert_eq!(out, written, "{raw}");
        }
    }

    #[test]
    fn set_replaces_and_plaintext_removes() {
        let local = id("spiffe://td/ns/a/sa/b");
        let peer = id("spiffe://td/ns/c/sa/d");
        let mut h = HeaderMap::new();
        for spoof in ["URI=spoof", "URI=spoof2"] {
            h.append(X_FORWARDED_CLIENT_CERT, HeaderValue::from_static(spoof));
        }
        set_xfcc(
            &mut h,
            &local,
            Some(PeerCert {
                id: &peer,
                der: None,
            }),
        );
        let all: Vec<_> = h.get_all(X_FORWARDED_CLIENT_CERT).iter().collect();
        assert_eq!(all, ["By=spiffe://td/ns/a/sa/b;URI=spiffe://td/ns/c/sa/d"]);

        set_xfcc(&mut h, &local, None);
        assert!(!h.contains_key(X_FORWARDED_CLIENT_CERT));
    }

    #[test]
    fn hash_is_64_hex_digits_whatever_the_der_length() {
        let local = id("spiffe://cluster.local/ns/prod/sa/api");
        let peer = id("spiffe://cluster.local/ns/web/sa/frontend");
        let v = value_for(&local, &peer, Some(&[0u8; 900]));
        let expected = 3 + local.as_str().len() + 6 + 64 + 5 + peer.as_str().len();
        assert_eq!(v.len(), expected);
    }
}
