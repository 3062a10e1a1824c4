//! Property-based robustness tests of the per-request header steps (DESIGN
//! §6: each inbound step has its tests and a fuzz target beside it; on the
//! stable toolchain the fuzz target is a proptest). Every input here is
//! what a peer controls: header names, values, how many of each.
//!
//! - [`super::strip::strip_inbound`]: against a model of what it must remove.
//! - [`super::xfcc::xfcc_value`]: a valid header value that parses back to the
//!   identities and the certificate hash.
//! - [`super::request_id::ensure_request_id`]: always exactly one well-formed id.
//! - [`super::deny`]: the body is valid JSON carrying the id, whatever the id.
//! - [`crate::audit::trace_id`]: only ever a slice of the input, 32 hex digits.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use palisade_policy::identity::SpiffeId;
use proptest::prelude::*;
use proptest::sample::select;
use sha2::{Digest, Sha256};

use super::deny::{Denied, deny_response, error_word, grpc_deny};
use super::request_id::{MAX_LEN, X_REQUEST_ID, ensure_request_id, is_well_formed};
use super::strip::{Ambiguous, is_identity_header, strip_inbound};
use super::xfcc::{PeerCert, xfcc_value};
use crate::audit::trace_id;

// ---------------------------------------------------------------------------
// Strategies.

/// Any bytes a header value may hold (no CR, LF, NUL or other controls but
/// tab; obs-text included).
fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
        0..48,
    )
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    value_bytes().prop_map(|b| HeaderValue::from_bytes(&b).expect("valid by construction"))
}

/// Names a `Connection` header may nominate, and that the map may carry.
const NAMES: &[&str] = &[
    "x-forwarded-client-cert",
    "x-palisade-peer",
    "x-palisade-claims",
    "x-palisade-",
    "x-palisade",
    "x-palisadex",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "host",
    "content-length",
    "transfer-encoding",
    "accept",
    "authorization",
    "x-trace",
    "foo-bar",
    "cookie",
];

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        4 => select(NAMES).prop_map(HeaderName::from_static),
        1 => "x-palisade-[a-z0-9-]{0,10}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
        1 => "[a-z0-9!#$%&'*+.^_`|~-]{1,16}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ]
}

/// One member of a `Connection` list, as a client may write it.
fn connection_token() -> impl Strategy<Value = String> {
    let case = |s: &str, upper: Vec<bool>| -> String {
        s.chars()
            .zip(upper.into_iter().chain(std::iter::repeat(false)))
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    };
    prop_oneof![
        4 => (select(NAMES), proptest::collection::vec(any::<bool>(), 24))
            .prop_map(move |(n, up)| case(n, up)),
        1 => select(vec!["close", "Upgrade", "UPGRADE", "TE", "", "a b", "\"q\"", "x-palisade-foo"])
            .prop_map(str::to_owned),
        1 => value_bytes().prop_map(|b| String::from_utf8_lossy(&b).replace(',', "")),
    ]
}

fn connection_value() -> impl Strategy<Value = HeaderValue> {
    (
        proptest::collection::vec(connection_token(), 0..5),
        select(vec![",", ", ", " ,\t", ",,"]),
    )
        .prop_map(|(tokens, sep)| {
            // Tokens may hold obs-text that `from_utf8_lossy` widened; the
            // lossy text is still a valid value (no controls).
            HeaderValue::from_bytes(tokens.join(sep).as_bytes())
                .unwrap_or(HeaderValue::from_static("close"))
        })
}

fn te_value() -> impl Strategy<Value = HeaderValue> {
    proptest::collection::vec(
        select(vec![
            "trailers",
            "Trailers",
            "gzip",
            "deflate;q=0.5",
            "trailers;q=1",
            " trailers ",
        ]),
        0..3,
    )
    .prop_map(|v| HeaderValue::from_bytes(v.join(",").as_bytes()).unwrap())
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec(
        prop_oneof![
            4 => (header_name(), header_value()),
            2 => connection_value().prop_map(|v| (http::header::CONNECTION, v)),
            1 => te_value().prop_map(|v| (http::header::TE, v)),
            1 => header_value().prop_map(|v| (http::header::UPGRADE, v)),
        ],
        0..16,
    )
    .prop_map(|pairs| {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(n, v);
        }
        h
    })
}

// ---------------------------------------------------------------------------
// The model of `strip_inbound`, written from its documentation.

fn members(v: &HeaderValue) -> Vec<&[u8]> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    v.as_bytes()
        .split(|b| *b == b',')
        .map(|m| {
            let start = m.iter().position(|b| !is_ows(b)).unwrap_or(m.len());
            let end = m.iter().rposition(|b| !is_ows(b)).map_or(start, |e| e + 1);
            &m[start..end]
        })
        .filter(|m| !m.is_empty())
        .collect()
}

struct Expected {
    ambiguous: bool,
    removed: Vec<HeaderName>,
    upgrade: bool,
    te_trailers: bool,
}

fn expected(h: &HeaderMap) -> Expected {
    let mut e = Expected {
        ambiguous: false,
        removed: [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ]
        .map(HeaderName::from_static)
        .to_vec(),
        upgrade: false,
        te_trailers: false,
    };
    let mut upgrade_listed = false;
    for v in h.get_all(http::header::CONNECTION) {
        for m in members(v) {
            if m.eq_ignore_ascii_case(b"upgrade") {
                upgrade_listed = true;
            } else if let Ok(n) = HeaderName::from_bytes(m) {
                if ["host", "content-length", "transfer-encoding"].contains(&n.as_str()) {
                    e.ambiguous = true;
                }
                e.removed.push(n);
            }
        }
    }
    e.removed
        .extend(h.keys().filter(|n| is_identity_header(n)).cloned());
    e.upgrade = upgrade_listed && h.contains_key(http::header::UPGRADE);
    e.te_trailers = h.get_all(http::header::TE).iter().any(|v| {
        members(v).iter().any(|m| {
            let coding = m.split(|b| *b == b';').next().unwrap_or_default();
            members(&HeaderValue::from_bytes(coding).unwrap())
                .first()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"trailers"))
        })
    });
    e
}

// ---------------------------------------------------------------------------
// SPIFFE IDs, valid by construction.

fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
    ("[a-z0-9._-]{1,40}", "[a-z0-9.-]{1,40}", "[a-z0-9.-]{1,40}").prop_map(|(td, ns, sa)| {
        SpiffeId::parse(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")).expect("valid by construction")
    })
}

/// Splits an XFCC element list (Envoy's format, values bare or quoted with
/// backslash escapes) into `(key, value)` pairs.
fn parse_xfcc(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => v.push(chars.next()?.1),
                    (i, '"') => break i + 1,
                    (_, c) => v.push(c),
                }
            };
            (v, &q[end..])
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        out.push((key.to_owned(), value));
        match after.strip_prefix(';') {
            Some(r) => rest = r,
            None if after.is_empty() => return Some(out),
            None => return None,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `strip_inbound` never panics; on `Ok` no identity header, no
    /// connection option and no hop-by-hop field is left (bar `te: trailers`
    /// and a kept upgrade), and everything else is exactly as it was; on
    /// `Err` the map is untouched and a framing field was nominated.
    #[test]
    fn strip_inbound_matches_its_model(mut h in header_map()) {
        let before = h.clone();
        let e = expected(&before);
        match strip_inbound(&mut h) {
            Err(Ambiguous) => {
                prop_assert!(e.ambiguous, "{:?}", before);
                prop_assert_eq!(&h, &before);
            }
            Ok(s) => {
                prop_assert!(!e.ambiguous, "{:?}", before);
                prop_assert!(h.keys().all(|n| !is_identity_header(n)), "{:?}", h);
                prop_assert_eq!(
                    s.identity_headers,
                    before.keys().filter(|n| is_identity_header(n)).count()
                );
                prop_assert_eq!(s.upgrade, e.upgrade);
                for name in before.keys() {
                    let after: Vec<_> = h.get_all(name).iter().collect();
                    if *name == http::header::TE {
                        let want: Vec<&str> =
                            if e.te_trailers { vec!["trailers"] } else { vec![] };
                        prop_assert_eq!(after, want);
                    } else if *name == http::header::UPGRADE && e.upgrade {
                        prop_assert_eq!(after, before.get_all(name).iter().collect::<Vec<_>>());
                    } else if *name == http::header::CONNECTION && e.upgrade {
                        prop_assert_eq!(after, vec!["upgrade"]);
                    } else if e.removed.contains(name) {
                        prop_assert!(after.is_empty(), "{} kept in {:?}", name, h);
                    } else {
                        prop_assert_eq!(after, before.get_all(name).iter().collect::<Vec<_>>());
                    }
                }
                // Nothing was added but `te: trailers` / `connection: upgrade`.
                for name in h.keys() {
                    prop_assert!(before.contains_key(name), "{} appeared", name);
                }
                // Stripping twice changes nothing more.
                let once = h.clone();
                let again = strip_inbound(&mut h);
                prop_assert!(again.is_ok());
                prop_assert_eq!(h, once);
            }
        }
    }

    /// XFCC is always a valid header value and parses back to `By`, `Hash`
    /// (SHA-256 of the DER, when given) and `URI`, in that order.
    #[test]
    fn xfcc_round_trips_the_identities(
        local in spiffe_id(),
        peer in spiffe_id(),
        der in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
    ) {
        let v = xfcc_value(&local, PeerCert { id: &peer, der: der.as_deref() });
        let text = v.to_str().expect("visible ASCII");
        let parsed = parse_xfcc(text).expect("parses");
        let mut want = vec![("By".to_owned(), local.as_str().to_owned())];
        if let Some(der) = &der {
            let hex: String = Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect();
            want.push(("Hash".to_owned(), hex));
        }
        want.push(("URI".to_owned(), peer.as_str().to_owned()));
        prop_assert_eq!(parsed, want);
    }

    /// Whatever `x-request-id` values came in, and from whom, exactly one
    /// well-formed id goes out; a mesh peer's single well-formed id is kept.
    #[test]
    fn request_id_is_always_one_well_formed_value(
        values in proptest::collection::vec(
            prop_oneof![
                header_value(),
                "[A-Za-z0-9._:-]{1,140}".prop_map(|s| HeaderValue::from_str(&s).unwrap()),
            ],
            0..3,
        ),
        from_mesh in any::<bool>(),
    ) {
        let mut h = HeaderMap::new();
        for v in &values {
            h.append(X_REQUEST_ID, v.clone());
        }
        let id = ensure_request_id(&mut h, from_mesh);
        prop_assert!(is_well_formed(&id), "{:?}", id);
        prop_assert!(id.len() <= MAX_LEN);
        prop_assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), vec![&id]);
        let kept = from_mesh && values.len() == 1 && is_well_formed(&values[0]);
        if kept {
            prop_assert_eq!(&id, &values[0]);
        } else {
            prop_assert_eq!(id.len(), 32);
        }
    }

    /// Any status, any request id (even one no header could carry): the deny
    /// body is JSON with exactly the id and a known error word, its length is
    /// the `content-length`; the gRPC form never panics either.
    #[test]
    fn deny_body_is_json_whatever_the_request_id(
        status in any::<u16>(),
        request_id in any::<String>(),
        www in any::<bool>(),
    ) {
        let mut r = deny_response(status, &request_id, www);
        let json: serde_json::Value = serde_json::from_slice(r.body()).expect("JSON");
        prop_assert_eq!(json["request_id"].as_str(), Some(request_id.as_str()));
        let answered = r.status().as_u16();
        prop_assert_eq!(json["error"].as_str(), error_word(answered));
        prop_assert!(error_word(answered).is_some());
        prop_assert_eq!(
            r.headers()[http::header::CONTENT_LENGTH].to_str().unwrap(),
            r.body().len().to_string()
        );
        let denied = r.extensions().get::<Denied>().cloned().expect("Denied");
        grpc_deny(&mut r, &denied);
        prop_assert_eq!(r.status(), http::StatusCode::OK);
        if let Some(v) = r.headers().get("x-request-id") {
            prop_assert_eq!(v.as_bytes(), request_id.as_bytes());
        }
    }

    /// `trace_id` of any text: `None`, or the second `-` field of it, which
    /// is 32 hex digits and not all zero.
    #[test]
    fn trace_id_is_a_checked_slice_of_the_input(
        text in proptest::option::of(prop_oneof![
            any::<String>(),
            "[0-9a-f]{2}-[0-9a-fA-FxX]{30,34}-[0-9a-f]{16}-[0-9a-f]{2}",
            "[0-9a-f-]{0,60}",
        ]),
    ) {
        match trace_id(text.as_deref()) {
            None => {}
            Some(id) => {
                let text = text.as_deref().unwrap();
                prop_assert_eq!(Some(id), text.split('-').nth(1));
                prop_assert_eq!(id.len(), 32);
                prop_assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
                prop_assert!(id.bytes().any(|b| b != b'0'));
            }
        }
    }

    /// A well-formed traceparent always yields its id.
    #[test]
    fn trace_id_of_a_valid_traceparent(id in "[0-9a-f]{32}", span in "[0-9a-f]{16}") {
        prop_assume!(id.bytes().any(|b| b != b'0'));
        let tp = format!("00-{id}-{span}-01");
        prop_assert_eq!(trace_id(Some(&tp)), Some(id.as_str()));
    }
}
