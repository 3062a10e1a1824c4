//! The fixed, small error responses the agent answers with itself
//! (DESIGN §4).
//!
//! Body, exactly: `{"error":"<word>","request_id":"<id>"}`. Headers:
//! `content-type: application/json`, `content-length`, `cache-control:
//! no-store`, and on 401 `www-authenticate: Bearer` when the workload
//! accepts JWTs. Nothing else: never a policy name, rule id, reason code or
//! internal address — those go to the audit event only. The response is
//! built from the status alone, so nothing else in a [`Verdict`] can leak.
//!
//! | status | word |
//! |---|---|
//! | 400 | `bad_request` |
//! | 401 | `unauthorized` |
//! | 403 | `forbidden` |
//! | 410 | `gone` |
//! | 413 | `payload_too_large` |
//! | 414 | `uri_too_long` |
//! | 415 | `unsupported_media_type` |
//! | 429 | `too_many_requests` |
//! | 431 | `request_header_fields_too_large` |
//! | 502 | `bad_gateway` |
//! | 503 | `unavailable` (the agent is shedding load) |
//!
//! Any other status (a bug upstream: the engine only produces those above)
//! fails closed as 403 `forbidden`, status and body alike.
//!
//! A 401 without `www-authenticate` (an mTLS-only workload refusing a
//! plaintext peer) departs from RFC 9110 §15.5.2 on purpose: there is no
//! HTTP authentication scheme a client could answer with.
//!
//! Every deny response carries a [`Denied`] extension (never sent) so the
//! inbound proxy can answer a gRPC client in gRPC's shape instead
//! ([`grpc_deny`]): HTTP 200, `content-type: application/grpc`, no body, and
//! `grpc-status` / `grpc-message` in the headers (a trailers-only response).
//!
//! Headers the response needs beyond these (`Retry-After`, `RateLimit-*`,
//! `Deprecation` on 410) are the caller's to add. For `HEAD` the HTTP layer
//! sends no body.

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use palisade_policy::Verdict;

/// The `error` word of a status, or `None` for a status the agent never
/// answers with itself.
pub fn error_word(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        410 => "gone",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        429 => "too_many_requests",
        431 => "request_header_fields_too_large",
        502 => "bad_gateway",
        503 => "unavailable",
        _ => return None,
    })
}

/// The error response for `status`. `request_id` is the request's
/// `x-request-id` (see [`super::request_id`]); it is JSON-escaped all the
/// same. `www_authenticate` adds `WWW-Authenticate: Bearer` to a 401.
pub fn deny_response(status: u16, request_id: &str, www_authenticate: bool) -> Response<Vec<u8>> {
    let (status, word) = match error_word(status) {
        Some(word) => (status, word),
        None => (403, "forbidden"),
    };
    const OPEN: &str = r#"{"error":""#;
    const MID: &str = r#"","request_id":""#;
    const CLOSE: &str = r#""}"#;
    let mut body =
        Vec::with_capacity(OPEN.len() + word.len() + MID.len() + request_id.len() + CLOSE.len());
    body.extend_from_slice(OPEN.as_bytes());
    body.extend_from_slice(word.as_bytes());
    body.extend_from_slice(MID.as_bytes());
    push_json_string_content(&mut body, request_id);
    body.extend_from_slice(CLOSE.as_bytes());

    let mut response = Response::new(Vec::new());
    *response.status_mut() = StatusCode::from_u16(status).expect("mapped statuses are valid");
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == 401 && www_authenticate {
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    *response.body_mut() = body;
    response.extensions_mut().insert(Denied {
        status,
        request_id: request_id.into(),
    });
    response
}

/// Marks a response as one of the agent's own denials (a response
/// extension, never on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The HTTP status answered (after fail-closed mapping).
    pub status: u16,
    pub request_id: Box<str>,
}

/// Whether a request is gRPC: `content-type: application/grpc` or
/// `application/grpc+<codec>` / `application/grpc;…` (gRPC over HTTP/2
/// spec). `application/grpc-web` is not.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        .is_some_and(|ct| {
            ct.len() >= 16
                && ct[..16].eq_ignore_ascii_case(b"application/grpc")
                && matches!(ct.get(16), None | Some(b'+' | b';'))
        })
}

/// The gRPC status for an HTTP status, as Envoy maps them
/// (`Grpc::Utility::httpToGrpcStatus`, after gRPC's
/// `http-grpc-status-mapping.md`): 400 → INTERNAL (13), 401 →
/// UNAUTHENTICATED (16), 403 → PERMISSION_DENIED (7), 404 → UNIMPLEMENTED
/// (12), 429 / 502 / 503 / 504 → UNAVAILABLE (14), anything else (410, 413,
/// 414, 415, 431) → UNKNOWN (2).
pub fn grpc_status(http_status: u16) -> u8 {
    match http_status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Rewrites a deny response for a gRPC client, in place: status 200,
/// `content-type: application/grpc`, `grpc-status`, `grpc-message` (the
/// fixed error word, nothing else), `x-request-id`, no body
/// (trailers-only). Other headers the caller added (`retry-after`,
/// `ratelimit-*`, `www-authenticate`, …) stay.
pub fn grpc_deny<B>(response: &mut Response<B>, denied: &Denied) {
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(
        GRPC_STATUS,
        HeaderValue::from(u16::from(grpc_status(denied.status))),
    );
    headers.insert(
        GRPC_MESSAGE,
        HeaderValue::from_static(error_word(denied.status).unwrap_or("forbidden")),
    );
    if let Ok(id) = HeaderValue::from_str(&denied.request_id) {
        headers.insert(X_REQUEST_ID, id);
    }
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// [`deny_response`] for an engine verdict; only its status is read.
pub fn deny_for_verdict(
    verdict: &Verdict<'_>,
    request_id: &str,
    www_authenticate: bool,
) -> Response<Vec<u8>> {
    deny_response(verdict.status, request_id, www_authenticate)
}

/// The content of a JSON string (RFC 8259 §7), without the quotes.
fn push_json_string_content(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(br#"\""#),
            b'\\' => out.extend_from_slice(br"\\"),
            0x00..=0x1f => {
                out.extend_from_slice(br"\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::Reason;

    const ALL: [(u16, &str); 9] = [
        (400, "bad_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (410, "gone"),
        (413, "payload_too_large"),
        (415, "unsupported_media_type"),
        (429, "too_many_requests"),
        (502, "bad_gateway"),
        (503, "unavailable"),
    ];

    fn verdict(status: u16, reason: Reason, rule: Option<&str>) -> Verdict<'_> {
        Verdict {
            allowed: false,
            status,
            reason,
            rule,
        }
    }

    #[test]
    fn every_status_maps_to_its_exact_body_and_headers() {
        for (status, word) in ALL {
            let r = deny_response(status, "0123abcd", false);
            let expected = format!(r#"{{"error":"{word}","request_id":"0123abcd"}}"#);
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(String::from_utf8(r.body().clone()).unwrap(), expected);
            let h = r.headers();
            assert_eq!(h[CONTENT_TYPE], "application/json");
            assert_eq!(h[CONTENT_LENGTH], expected.len().to_string().as_str());
            assert_eq!(h[CACHE_CONTROL], "no-store");
            assert!(!h.contains_key(WWW_AUTHENTICATE));
            assert_eq!(h.len(), 3, "{h:?}");
            let json: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
            assert_eq!(json["error"], word);
            assert_eq!(json["request_id"], "0123abcd");
        }
    }

    #[test]
    fn bearer_challenge_only_on_401_when_jwts_are_accepted() {
        let r = deny_response(401, "id", true);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer");
        assert!(
            !deny_response(401, "id", false)
                .headers()
                .contains_key(WWW_AUTHENTICATE)
        );
        for (status, _) in ALL.iter().filter(|(s, _)| *s != 401) {
            let r = deny_response(*status, "id", true);
            assert!(!r.headers().contains_key(WWW_AUTHENTICATE), "{status}");
        }
    }

    #[test]
    fn unmapped_statuses_fail_closed_as_forbidden() {
        for status in [200, 404, 500, 504, 999] {
            let r = deny_response(status, "id", true);
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
            assert_eq!(r.body(), br#"{"error":"forbidden","request_id":"id"}"#);
        }
    }

    #[test]
    fn no_rule_or_reason_text_leaks_from_a_verdict() {
        let rule = "deny-internal-admin-10.0.3.7";
        for (verdict, word) in [
            (verdict(403, Reason::DenyRule, Some(rule)), "forbidden"),
            (
                verdict(429, Reason::RateLimited, Some(rule)),
                "too_many_requests",
            ),
            (verdict(410, Reason::Sunset, Some(rule)), "gone"),
            (
                verdict(401, Reason::NoAllowMatch, Some(rule)),
                "unauthorized",
            ),
            (
                verdict(415, Reason::UnsupportedMediaType, Some(rule)),
                "unsupported_media_type",
            ),
        ] {
            let r = deny_for_verdict(&verdict, "req-1", true);
            assert_eq!(r.status().as_u16(), verdict.status);
            let body = String::from_utf8(r.body().clone()).unwrap();
            assert_eq!(
                body,
                format!(r#"{{"error":"{word}","request_id":"req-1"}}"#)
            );
            assert!(!body.contains(rule));
            assert!(!body.contains(verdict.reason.as_str()));
            for (_, v) in r.headers() {
                let v = v.to_str().unwrap();
                assert!(!v.contains(rule) && !v.contains(verdict.reason.as_str()));
            }
        }
    }

    #[test]
    fn grpc_denials_are_trailers_only_with_envoy_status_mapping() {
        for (http, grpc) in [
            (400, "13"),
            (401, "16"),
            (403, "7"),
            (429, "14"),
            (502, "14"),
            (413, "2"),
            (415, "2"),
        ] {
            let mut r = deny_response(http, "rid-1", true);
            let denied = r.extensions().get::<Denied>().unwrap().clone();
            assert_eq!(denied.status, http);
            grpc_deny(&mut r, &denied);
            assert_eq!(r.status(), StatusCode::OK);
            let h = r.headers();
            assert_eq!(h[CONTENT_TYPE], "application/grpc");
            assert_eq!(h["grpc-status"], grpc, "{http}");
            assert_eq!(h["grpc-message"], error_word(http).unwrap());
            assert_eq!(h["x-request-id"], "rid-1");
            assert!(!h.contains_key(CONTENT_LENGTH));
        }
    }

    #[test]
    fn grpc_content_types() {
        let ct = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            is_grpc(&h)
        };
        assert!(ct("application/grpc"));
        assert!(ct("application/grpc+proto"));
        assert!(ct("Application/GRPC;charset=x"));
        assert!(!ct("application/grpc-web"));
        assert!(!ct("application/json"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    #[test]
    fn request_id_is_json_escaped() {
        let r = deny_response(400, "a\"b\\c\n", false);
        assert_eq!(
            r.body(),
            br#"{"error":"bad_request","request_id":"a\"b\\c\u000a"}"#
        );
        let json: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(json["request_id"], "a\"b\\c\n");
        assert_eq!(
            r.headers()[CONTENT_LENGTH],
            r.body().len().to_string().as_str()
        );
    }
}
