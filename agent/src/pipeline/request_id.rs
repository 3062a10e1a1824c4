//! `x-request-id`: one id per request, for the app, the audit event and the
//! deny body.
//!
//! An id is kept only when it is trusted: the request came from a mesh peer
//! (a verified mTLS identity — another agent, which set or vetted it), and
//! it is a single, well-formed value ([`is_well_formed`]). Otherwise — a
//! plaintext client, several `x-request-id` headers, an oversized or odd
//! value — it is replaced by a fresh random 128-bit id written as 32 lower-case
//! hex digits. A client outside the mesh therefore cannot choose the id that
//! appears in audit events, and nothing that reaches the deny body needs
//! escaping.
//!
//! Allocation: generating formats into a stack buffer; the only allocation
//! is the `HeaderValue` itself. Keeping a trusted id allocates nothing.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id accepted from a mesh peer.
pub const MAX_LEN: usize = 128;

/// A fresh random 128-bit id, as 32 lower-case hex digits.
pub fn generate() -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        let nibble = (id >> (124 - 4 * i)) & 0xf;
        *b = DIGITS[nibble as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// 1 to [`MAX_LEN`] bytes of `A-Z a-z 0-9 - _ . :` — enough for UUIDs, hex
/// ids and trace-style ids, and safe to put in JSON and logs as is.
pub fn is_well_formed(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// Ensures the request carries exactly one `x-request-id` and returns it
/// (a cheap clone of the header value). `from_mesh_peer` is true only when
/// the connection's peer identity was verified by mTLS.
pub fn ensure_request_id(headers: &mut HeaderMap, from_mesh_peer: bool) -> HeaderValue {
    if from_mesh_peer {
        let mut values = headers.get_all(X_REQUEST_ID).iter();
        if let (Some(v), None) = (values.next(), values.next())
            && is_well_formed(v)
        {
            return v.clone();
        }
    }
    let id = generate();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_32_hex_digits_and_differ() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 32);
        assert!(
            a.as_bytes()
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        assert!(is_well_formed(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn a_mesh_peers_id_is_kept() {
        let mut h = HeaderMap::new();
        let id = HeaderValue::from_static("3f2504e0-4f89-11d3-9a0c-0305e82c3301");
        h.insert(X_REQUEST_ID, id.clone());
        assert_eq!(ensure_request_id(&mut h, true), id);
        assert_eq!(h[X_REQUEST_ID], id);
    }

    #[test]
    fn a_plaintext_clients_id_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("chosen-by-client"));
        let id = ensure_request_id(&mut h, false);
        assert_ne!(id, "chosen-by-client");
        assert_eq!(id.len(), 32);
        assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn a_missing_id_is_generated_for_anyone() {
        for mesh in [true, false] {
            let mut h = HeaderMap::new();
            let id = ensure_request_id(&mut h, mesh);
            assert_eq!(h[X_REQUEST_ID], id);
            assert_eq!(id.len(), 32);
        }
    }

    #[test]
    fn ambiguous_or_malformed_ids_are_replaced_even_from_the_mesh() {
        let too_long = "a".repeat(MAX_LEN + 1);
        let cases: [&[&str]; 5] = [
            &["one", "two"],
            &[""],
            &[r#"x","error":"forged"#],
            &["has space"],
            &[too_long.as_str()],
        ];
        for values in cases {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(X_REQUEST_ID, HeaderValue::from_str(v).unwrap());
            }
            let id = ensure_request_id(&mut h, true);
            assert_eq!(id.len(), 32, "{values:?}");
            assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
        }
        let longest = HeaderValue::from_str(&"a".repeat(MAX_LEN)).unwrap();
        assert!(is_well_formed(&longest));
    }
}
