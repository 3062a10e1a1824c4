//! Step 1 of the inbound path: remove what a client must not be able to send
//! through the agent, before anything else reads the headers (DESIGN §4).
//!
//! Removed:
//!
//! - **Identity headers** the agent itself sets for the app:
//!   `x-forwarded-client-cert` and every `x-palisade-*` header, all values.
//!   Identity comes only from the verified certificate or a verified token.
//! - **Connection options** (RFC 9110 §7.6.1): every field named in any
//!   `Connection` header (repeated headers and comma-joined lists alike,
//!   names compared case-insensitively), then `Connection` itself. So
//!   `Connection: x-palisade-foo` cannot make a later hop drop a header the
//!   agent sets: the nomination never leaves the agent.
//! - **Hop-by-hop fields** whether nominated or not: `keep-alive`,
//!   `proxy-connection`, and `te` except its `trailers` member (gRPC needs
//!   `te: trailers` end to end; any other transfer coding is the agent's
//!   business with the client only).
//! - **Method overrides**: `x-http-method-override`, `x-http-method` and
//!   `x-method-override`. Policy judged the request's own method; an app
//!   framework that honours an override would run another one.
//! - **`upgrade`**, unless the request is an upgrade request (`Connection`
//!   lists `upgrade` and an `Upgrade` header is present). Then `upgrade` is
//!   kept and `Connection` is set back to exactly `upgrade`, so the forwarder
//!   can pass the upgrade on and nothing else rides along.
//!
//! Left to the HTTP layer (hyper): `transfer-encoding`. Hyper's HTTP/1 codec
//! decodes the client's framing on the way in and frames the forwarded message
//! itself; HTTP/2 forbids connection-specific fields and hyper/h2 refuses or
//! drops them. This step neither removes nor reinterprets it. The ambiguity
//! check (both `Content-Length` and `Transfer-Encoding` → 400) is the shape
//! step's (`palisade_policy::request_shape`).
//!
//! Refused (an [`Ambiguous`] error, answered with 400 `bad_request`): a
//! `Connection` header that nominates `host`, `content-length` or
//! `transfer-encoding`. Removing those after hyper has framed and routed the
//! request would change what the request means between the agent and the app,
//! so the request is refused rather than guessed at.
//!
//! Allocation: none in the common case (no identity header, no nominated
//! field beyond the fixed hop-by-hop set). Otherwise one `Vec` of the names
//! to remove (cloning a `HeaderName` is a reference-count increment).

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue, TE};
use http::header::{TRANSFER_ENCODING, UPGRADE};

/// `x-forwarded-client-cert`, set by [`super::xfcc`] only.
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// Prefix of the headers the agent reserves for itself.
pub const IDENTITY_PREFIX: &str = "x-palisade-";

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Headers some frameworks read as "the real method".
pub const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a header is one of the agent's identity headers. `HeaderName`s
/// are always lower case, so this is a case-insensitive test of what the
/// client wrote.
pub fn is_identity_header(name: &HeaderName) -> bool {
    *name == X_FORWARDED_CLIENT_CERT || name.as_str().starts_with(IDENTITY_PREFIX)
}

/// What stripping found, for metrics and audit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stripped {
    /// Distinct identity header names the client sent (a spoofing attempt,
    /// or a misbehaving client).
    pub identity_headers: usize,
    /// The request is an upgrade request; `upgrade` and `connection: upgrade`
    /// were kept.
    pub upgrade: bool,
}

/// A `Connection` header nominated a field the request's framing or routing
/// depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the Connection header nominates a framing or routing field")]
pub struct Ambiguous;

/// Strips identity, connection-nominated and hop-by-hop headers from an
/// incoming request's headers, in place.
pub fn strip_inbound(headers: &mut HeaderMap) -> Result<Stripped, Ambiguous> {
    let mut upgrade_listed = false;
    let mut remove: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in list_members(value) {
            if token.eq_ignore_ascii_case(b"upgrade") {
                upgrade_listed = true;
                continue;
            }
            // Not a field name (e.g. `close` is, harmlessly; garbage is not):
            // nothing can be named by it.
            let Ok(name) = HeaderName::from_bytes(token) else {
                continue;
            };
            if name == HOST || name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
                return Err(Ambiguous);
            }
            // Handled below by fixed rules; identity headers are collected
            // from the keys so each is listed once.
            let fixed = name == TE
                || name == KEEP_ALIVE
                || name == PROXY_CONNECTION
                || is_identity_header(&name);
            if !fixed && headers.contains_key(&name) && !remove.contains(&name) {
                remove.push(name);
            }
        }
    }

    let mut stripped = Stripped::default();
    for name in headers.keys() {
        if is_identity_header(name) {
            stripped.identity_headers += 1;
            remove.push(name.clone());
        }
    }
    for name in &remove {
        headers.remove(name);
    }

    headers.remove(CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    for name in &METHOD_OVERRIDES {
        headers.remove(name);
    }
    strip_te(headers);

    if upgrade_listed && headers.contains_key(UPGRADE) {
        stripped.upgrade = true;
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    Ok(stripped)
}

/// `te`: keeps only `trailers`, the one member meant for the origin.
fn strip_te(headers: &mut HeaderMap) {
    if !headers.contains_key(TE) {
        return;
    }
    let trailers = headers.get_all(TE).iter().any(|v| {
        list_members(v).any(|m| {
            let coding = m.split(|b| *b == b';').next().unwrap_or_default();
            trim_ows(coding).eq_ignore_ascii_case(b"trailers")
        })
    });
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    } else {
        headers.remove(TE);
    }
}

/// The non-empty members of a comma-separated list, without optional
/// whitespace.
fn list_members(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(trim_ows)
        .filter(|m| !m.is_empty())
}

/// `bytes` without the optional whitespace (spaces and tabs, RFC 9110
/// `OWS`) around it.
pub(crate) fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn spoofed_xfcc_claiming_another_identity_is_gone() {
        let mut h = map(&[
            (
                "X-Forwarded-Client-Cert",
                "By=spiffe://cluster.local/ns/prod/sa/api;URI=spiffe://cluster.local/ns/prod/sa/admin",
            ),
            ("x-forwarded-client-cert", "URI=spiffe://evil/ns/a/sa/b"),
            ("accept", "*/*"),
        ]);
        let s = strip_inbound(&mut h).unwrap();
        assert!(!h.contains_key(X_FORWARDED_CLIENT_CERT));
        assert_eq!(s.identity_headers, 1);
        assert_eq!(names(&h), ["accept"]);
    }

    #[test]
    fn every_palisade_header_is_removed_case_insensitively_with_all_values() {
        let mut h = map(&[
            ("X-Palisade-Peer", "spiffe://cluster.local/ns/prod/sa/admin"),
            ("x-palisade-peer", "second"),
            ("x-PALISADE-claims", "{}"),
            ("x-palisade", "not reserved: no trailing dash"),
            ("x-palisadex", "not reserved"),
        ]);
        let s = strip_inbound(&mut h).unwrap();
        assert_eq!(s.identity_headers, 2);
        assert_eq!(names(&h), ["x-palisade", "x-palisadex"]);
    }

    #[test]
    fn connection_cannot_smuggle_identity_headers() {
        // Nominating a header the agent sets later: the nomination must not
        // survive to a hop that would then drop the agent's header.
        let mut h = map(&[
            ("connection", "x-palisade-foo"),
            ("Connection", "keep-alive, X-Forwarded-Client-Cert"),
            ("x-palisade-foo", "spoof"),
        ]);
        strip_inbound(&mut h).unwrap();
        assert!(h.is_empty(), "{h:?}");

        // And the agent's own header, set after stripping, reaches the app.
        h.insert(
            X_FORWARDED_CLIENT_CERT,
            HeaderValue::from_static("By=a;URI=b"),
        );
        assert!(!h.contains_key(CONNECTION));
        assert_eq!(h[X_FORWARDED_CLIENT_CERT], "By=a;URI=b");
    }

    #[test]
    fn connection_nominated_fields_are_removed() {
        let mut h = map(&[
            ("connection", " X-Trace ,,\tfoo-bar , close"),
            ("connection", "x-other"),
            ("x-trace", "1"),
            ("foo-bar", "2"),
            ("x-other", "3"),
            ("x-kept", "4"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
        ]);
        let s = strip_inbound(&mut h).unwrap();
        assert_eq!(s, Stripped::default());
        assert_eq!(names(&h), ["x-kept"]);
    }

    #[test]
    fn nominating_framing_or_routing_fields_is_ambiguous() {
        for field in ["Host", "content-length", "Transfer-Encoding"] {
            let mut h = map(&[("connection", &format!("close, {field}"))]);
            assert_eq!(strip_inbound(&mut h), Err(Ambiguous), "{field}");
        }
    }

    #[test]
    fn te_keeps_only_trailers() {
        let mut h = map(&[("te", "gzip;q=0.5, Trailers"), ("connection", "TE")]);
        strip_inbound(&mut h).unwrap();
        assert_eq!(h.get_all(TE).iter().collect::<Vec<_>>(), ["trailers"]);

        let mut h = map(&[("te", "trailers")]);
        strip_inbound(&mut h).unwrap();
        assert_eq!(h[TE], "trailers");

        let mut h = map(&[("te", "gzip"), ("te", "deflate")]);
        strip_inbound(&mut h).unwrap();
        assert!(!h.contains_key(TE));
    }

    #[test]
    fn upgrade_is_kept_only_for_upgrade_requests() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade, x-spoof"),
            ("upgrade", "websocket"),
            ("x-spoof", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let s = strip_inbound(&mut h).unwrap();
        assert!(s.upgrade);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);

        // `Upgrade` without the connection option is not an upgrade request.
        let mut h = map(&[("upgrade", "websocket")]);
        let s = strip_inbound(&mut h).unwrap();
        assert!(!s.upgrade);
        assert!(h.is_empty());

        // Nor is the option without the header.
        let mut h = map(&[("connection", "upgrade")]);
        assert!(!strip_inbound(&mut h).unwrap().upgrade);
        assert!(h.is_empty());
    }

    #[test]
    fn method_overrides_never_reach_the_app() {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(b"X-HTTP-Method-Override").unwrap(),
            HeaderValue::from_static("DELETE"),
        );
        h.insert("x-http-method", HeaderValue::from_static("PUT"));
        h.append("x-method-override", HeaderValue::from_static("PATCH"));
        h.append("x-method-override", HeaderValue::from_static("DELETE"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_inbound(&mut h).unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-other"));
    }

    #[test]
    fn transfer_encoding_is_left_to_the_http_layer() {
        let mut h = map(&[("transfer-encoding", "chunked")]);
        strip_inbound(&mut h).unwrap();
        assert_eq!(h[TRANSFER_ENCODING], "chunked");
    }

    #[test]
    fn ordinary_requests_are_untouched() {
        let pairs = [
            ("host", "api.example"),
            ("authorization", "Bearer x"),
            ("accept", "a"),
            ("accept", "b"),
        ];
        let mut h = map(&pairs);
        let before = h.clone();
        assert_eq!(strip_inbound(&mut h), Ok(Stripped::default()));
        assert_eq!(h, before);
    }

    #[test]
    fn invalid_connection_tokens_are_ignored() {
        let mut h = map(&[("connection", "a b, \"quoted\", x-y"), ("x-y", "1")]);
        strip_inbound(&mut h).unwrap();
        assert!(h.is_empty());
    }
}
