//! The shape step: requests whose meaning is ambiguous, or that a lenient
//! back end would read differently from the policy, are refused with 400
//! before anything else looks at them (DESIGN §4: "refused, not guessed at").
//!
//! This is the one place these checks live. The agent calls [`check`] right
//! after stripping hop-by-hop and identity headers, before authentication;
//! `palisadectl policy simulate` calls it before `decide`. What only the
//! wire shows (HTTP/1 framing that hyper resolves silently) is detected by
//! the agent's framing guard and passed in as [`Head::ambiguous_framing`].
//!
//! | refused | why |
//! |---|---|
//! | an unknown or lower-case method | `get` is a different method to some servers, the same to others |
//! | two `Host` fields | servers pick the first or the last |
//! | HTTP/1.1 without `Host` | RFC 9112 §3.2: 400 |
//! | an authority (absolute-form target or `:authority`) that `Host` disagrees with | the authority is the host (RFC 9112 §3.2.2); a proxy and an app could each pick one |
//! | userinfo in the authority | RFC 9110 §4.2.4 |
//! | `Content-Length` twice, or with `Transfer-Encoding`; ambiguous HTTP/1 framing | request smuggling |
//! | `Content-Type` twice | the body rules and the app could read different media types |
//! | a header name with `_` | CGI-style back ends read `x_user` as `X-User` (opt-out: drop them) |
//! | an `Upgrade` to a protocol not on the allow-list, and always `h2c` | an upgraded connection leaves per-request policy behind |

use http::{HeaderMap, Method, Version, header};

/// Why a request was refused; every variant is a 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("unknown or lower-case method")]
    UnknownMethod,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("the Host header disagrees with the request's authority")]
    HostMismatch,
    #[error("userinfo in the request's authority")]
    Userinfo,
    #[error("ambiguous message framing (Content-Length twice, or with Transfer-Encoding)")]
    AmbiguousFraming,
    #[error("more than one Content-Type header")]
    DuplicateContentType,
    #[error("a header name contains '_'")]
    UnderscoreHeader,
    #[error("upgrade to a protocol that is not allowed")]
    UpgradeRefused,
}

impl ShapeError {
    /// The stable reason code of the audit record.
    pub fn code(self) -> &'static str {
        match self {
            ShapeError::UnknownMethod => "request.method",
            ShapeError::DuplicateHost => "request.duplicate_host",
            ShapeError::MissingHost => "request.missing_host",
            ShapeError::HostMismatch => "request.host_mismatch",
            ShapeError::Userinfo => "request.userinfo",
            ShapeError::AmbiguousFraming => "request.ambiguous_framing",
            ShapeError::DuplicateContentType => "request.duplicate_content_type",
            ShapeError::UnderscoreHeader => "request.underscore_header",
            ShapeError::UpgradeRefused => "request.upgrade_refused",
        }
    }
}

/// What the shape step looks at.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub version: Version,
    /// The authority of an absolute-form target, or HTTP/2's `:authority`.
    pub authority: Option<&'a str>,
    /// HTTP/1 framing the agent's guard found ambiguous on the wire.
    pub ambiguous_framing: bool,
}

/// How strict the shape step is where real apps need a choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShapeOptions<'a> {
    /// Remove header fields whose name has `_` instead of refusing.
    pub drop_underscore_headers: bool,
    /// `Upgrade` protocols allowed (lower case, without version), e.g.
    /// `websocket`. `h2c` is refused even when listed.
    pub upgrade_protocols: &'a [String],
}

/// Refuses an ambiguous request. Underscore headers are removed from
/// `headers` when the options say to drop them.
pub fn check(
    head: &Head<'_>,
    headers: &mut HeaderMap,
    options: &ShapeOptions<'_>,
) -> Result<(), ShapeError> {
    if !is_known_method(head.method) {
        return Err(ShapeError::UnknownMethod);
    }
    if head.ambiguous_framing
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .nth(1)
            .is_some()
        || (headers.contains_key(header::CONTENT_LENGTH)
            && headers.contains_key(header::TRANSFER_ENCODING))
    {
        return Err(ShapeError::AmbiguousFraming);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ShapeError::DuplicateHost);
    }
    match (head.authority, host) {
        (Some(authority), _) if authority.contains('@') => return Err(ShapeError::Userinfo),
        (Some(authority), Some(host))
            if !host.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) =>
        {
            return Err(ShapeError::HostMismatch);
        }
        (None, None) if head.version == Version::HTTP_11 => return Err(ShapeError::MissingHost),
        _ => {}
    }
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ShapeError::DuplicateContentType);
    }
    underscore_headers(headers, options.drop_underscore_headers)?;
    upgrade(headers, options.upgrade_protocols)
}

/// The methods of RFC 9110 and PATCH, exactly as registered (upper case).
pub fn is_known_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::DELETE
            | Method::PATCH
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    )
}

fn underscore_headers(headers: &mut HeaderMap, drop: bool) -> Result<(), ShapeError> {
    // No allocation unless such a header is there.
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return Ok(());
    }
    if !drop {
        return Err(ShapeError::UnderscoreHeader);
    }
    let names: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
    Ok(())
}

/// Every protocol an `Upgrade` header offers must be allowed; `h2c` never
/// is (a connection upgraded to HTTP/2 would carry requests the agent never
/// sees one by one).
fn upgrade(headers: &HeaderMap, allowed: &[String]) -> Result<(), ShapeError> {
    for value in headers.get_all(header::UPGRADE) {
        let Ok(text) = value.to_str() else {
            return Err(ShapeError::UpgradeRefused);
        };
        for offer in text.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let name = offer.split('/').next().unwrap_or(offer).trim();
            let ok = !name.eq_ignore_ascii_case("h2c")
                && allowed.iter().any(|a| name.eq_ignore_ascii_case(a));
            if !ok {
                return Err(ShapeError::UpgradeRefused);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn websocket() -> Vec<String> {
        vec!["websocket".to_owned()]
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn run(
        method: &str,
        version: Version,
        authority: Option<&str>,
        pairs: &[(&'static str, &'static str)],
        options: &ShapeOptions<'_>,
    ) -> Result<HeaderMap, ShapeError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut h = headers(pairs);
        let head = Head {
            method: &method,
            version,
            authority,
            ambiguous_framing: false,
        };
        check(&head, &mut h, options).map(|()| h)
    }

    fn h1(pairs: &[(&'static str, &'static str)]) -> Result<HeaderMap, ShapeError> {
        run("GET", Version::HTTP_11, None, pairs, &ws(&websocket()))
    }

    fn ws(protocols: &[String]) -> ShapeOptions<'_> {
        ShapeOptions {
            drop_underscore_headers: false,
            upgrade_protocols: protocols,
        }
    }

    #[test]
    fn a_plain_request_passes() {
        assert!(h1(&[("host", "orders"), ("content-type", "application/json")]).is_ok());
        assert!(run("GET", Version::HTTP_10, None, &[], &ws(&websocket())).is_ok());
        assert!(
            run(
                "GET",
                Version::HTTP_2,
                Some("orders"),
                &[],
                &ws(&websocket())
            )
            .is_ok()
        );
    }

    #[test]
    fn methods_must_be_registered_and_upper_case() {
        for m in ["get", "Get", "FOO", "PROPFIND"] {
            assert_eq!(
                run(
                    m,
                    Version::HTTP_11,
                    None,
                    &[("host", "a")],
                    &ws(&websocket())
                )
                .unwrap_err(),
                ShapeError::UnknownMethod,
                "{m}"
            );
        }
    }

    #[test]
    fn host_must_be_single_present_and_agree_with_the_authority() {
        assert_eq!(
            h1(&[("host", "a"), ("host", "b")]).unwrap_err(),
            ShapeError::DuplicateHost
        );
        assert_eq!(h1(&[]).unwrap_err(), ShapeError::MissingHost);
        let abs = |host: &'static str| {
            run(
                "GET",
                Version::HTTP_11,
                Some("orders:8080"),
                &[("host", host)],
                &ws(&websocket()),
            )
        };
        assert!(abs("orders:8080").is_ok());
        assert!(abs("ORDERS:8080").is_ok());
        assert_eq!(abs("admin:8080").unwrap_err(), ShapeError::HostMismatch);
        assert_eq!(abs("orders").unwrap_err(), ShapeError::HostMismatch);
        // The authority alone is enough: it is the host.
        assert!(
            run(
                "GET",
                Version::HTTP_11,
                Some("orders"),
                &[],
                &ws(&websocket())
            )
            .is_ok()
        );
        assert_eq!(
            run(
                "GET",
                Version::HTTP_2,
                Some("orders"),
                &[("host", "admin")],
                &ws(&websocket())
            )
            .unwrap_err(),
            ShapeError::HostMismatch
        );
        assert_eq!(
            run(
                "GET",
                Version::HTTP_11,
                Some("u:p@orders"),
                &[],
                &ws(&websocket())
            )
            .unwrap_err(),
            ShapeError::Userinfo
        );
    }

    #[test]
    fn framing_and_content_type_must_be_unambiguous() {
        assert_eq!(
            h1(&[
                ("host", "a"),
                ("content-length", "1"),
                ("content-length", "1")
            ])
            .unwrap_err(),
            ShapeError::AmbiguousFraming
        );
        assert_eq!(
            h1(&[
                ("host", "a"),
                ("content-length", "1"),
                ("transfer-encoding", "chunked")
            ])
            .unwrap_err(),
            ShapeError::AmbiguousFraming
        );
        let method = Method::GET;
        let head = Head {
            method: &method,
            version: Version::HTTP_11,
            authority: None,
            ambiguous_framing: true,
        };
        assert_eq!(
            check(&head, &mut headers(&[("host", "a")]), &ws(&websocket())),
            Err(ShapeError::AmbiguousFraming)
        );
        assert_eq!(
            h1(&[
                ("host", "a"),
                ("content-type", "application/json"),
                ("content-type", "text/plain")
            ])
            .unwrap_err(),
            ShapeError::DuplicateContentType
        );
    }

    #[test]
    fn underscore_headers_are_refused_or_dropped() {
        assert_eq!(
            h1(&[("host", "a"), ("x_role", "admin")]).unwrap_err(),
            ShapeError::UnderscoreHeader
        );
        let protocols = websocket();
        let drop = ShapeOptions {
            drop_underscore_headers: true,
            ..ws(&protocols)
        };
        let h = run(
            "GET",
            Version::HTTP_11,
            None,
            &[("host", "a"), ("x_role", "admin"), ("x-role", "user")],
            &drop,
        )
        .unwrap();
        assert!(h.get("x_role").is_none());
        assert_eq!(h["x-role"], "user");
    }

    #[test]
    fn upgrades_only_to_allowed_protocols_and_never_h2c() {
        assert!(h1(&[("host", "a"), ("upgrade", "websocket")]).is_ok());
        assert!(h1(&[("host", "a"), ("upgrade", "WebSocket")]).is_ok());
        for bad in ["h2c", "websocket, h2c", "TLS/1.2", "foo"] {
            assert_eq!(
                h1(&[("host", "a"), ("upgrade", bad)]).unwrap_err(),
                ShapeError::UpgradeRefused,
                "{bad}"
            );
        }
        let listed = vec!["websocket".to_owned(), "h2c".to_owned()];
        let h2c_listed = ws(&listed);
        assert_eq!(
            run(
                "GET",
                Version::HTTP_11,
                None,
                &[("host", "a"), ("upgrade", "h2c")],
                &h2c_listed
            )
            .unwrap_err(),
            ShapeError::UpgradeRefused
        );
    }
}
