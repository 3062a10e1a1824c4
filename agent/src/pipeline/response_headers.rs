//! The decision's response headers (`Deprecation`, RFC 9745; `Sunset`,
//! RFC 8594; `Link` to the deprecation notice) on the response to the client.
//!
//! The app's own headers take precedence:
//!
//! - `Deprecation` and `Sunset` are single-valued. When the app's response
//!   already has one, it is kept and the policy's value is dropped: the app
//!   knows its API better than a policy written about it, and two values
//!   would be invalid. Each is decided on its own, so the policy's `Sunset`
//!   is still added when the app sent only `Deprecation`.
//! - `Link` is a list: the policy's link is appended to the app's links,
//!   unless the app already sent exactly the same value.
//!
//! A header whose name or value is not a valid field (the engine never
//! produces one) is skipped rather than panicking. Applies equally to an
//! agent-built 410 after sunset.
//!
//! Allocation: the owned `String` values are moved into `HeaderValue`s
//! without copying; pass `std::mem::take(&mut decision.response_headers)`.

use http::header::{HeaderMap, HeaderName, HeaderValue, LINK};

pub const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
pub const SUNSET: HeaderName = HeaderName::from_static("sunset");

/// Adds the decision's response headers to `headers` (the response's).
pub fn apply_response_headers(
    headers: &mut HeaderMap,
    decision_headers: impl IntoIterator<Item = (&'static str, String)>,
) {
    for (name, value) in decision_headers {
        let name = match name {
            "deprecation" => DEPRECATION,
            "sunset" => SUNSET,
            "link" => LINK,
            other => match HeaderName::from_bytes(other.as_bytes()) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let Ok(value) = HeaderValue::try_from(value) else {
            continue;
        };
        if name == LINK {
            if !headers.get_all(LINK).iter().any(|v| *v == value) {
                headers.append(LINK, value);
            }
        } else if !headers.contains_key(&name) {
            headers.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_headers() -> Vec<(&'static str, String)> {
        vec![
            ("deprecation", "@1735689600".to_owned()),
            ("sunset", "Wed, 31 Dec 2025 00:00:00 GMT".to_owned()),
            (
                "link",
                r#"<https://docs.example/v1>; rel="deprecation"; type="text/html""#.to_owned(),
            ),
        ]
    }

    #[test]
    fn adds_all_to_a_plain_response() {
        let mut h = HeaderMap::new();
        apply_response_headers(&mut h, policy_headers());
        assert_eq!(h[DEPRECATION], "@1735689600");
        assert_eq!(h[SUNSET], "Wed, 31 Dec 2025 00:00:00 GMT");
        assert_eq!(
            h[LINK],
            r#"<https://docs.example/v1>; rel="deprecation"; type="text/html""#
        );
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn the_apps_own_deprecation_and_sunset_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(DEPRECATION, HeaderValue::from_static("@1700000000"));
        apply_response_headers(&mut h, policy_headers());
        assert_eq!(
            h.get_all(DEPRECATION).iter().collect::<Vec<_>>(),
            ["@1700000000"]
        );
        // Sunset is decided on its own: the app sent none.
        assert_eq!(h[SUNSET], "Wed, 31 Dec 2025 00:00:00 GMT");

        let mut h = HeaderMap::new();
        h.insert(
            SUNSET,
            HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"),
        );
        apply_response_headers(&mut h, policy_headers());
        assert_eq!(
            h.get_all(SUNSET).iter().collect::<Vec<_>>(),
            ["Thu, 01 Jan 2026 00:00:00 GMT"]
        );
    }

    #[test]
    fn link_is_appended_once() {
        let mut h = HeaderMap::new();
        h.insert(LINK, HeaderValue::from_static(r#"</next>; rel="next""#));
        apply_response_headers(&mut h, policy_headers());
        apply_response_headers(&mut h, policy_headers());
        let links: Vec<_> = h.get_all(LINK).iter().collect();
        assert_eq!(
            links,
            [
                r#"</next>; rel="next""#,
                r#"<https://docs.example/v1>; rel="deprecation"; type="text/html""#
            ]
        );
    }

    #[test]
    fn invalid_names_or_values_are_skipped() {
        let mut h = HeaderMap::new();
        apply_response_headers(
            &mut h,
            [
                ("bad name", "x".to_owned()),
                ("deprecation", "bad\r\nvalue".to_owned()),
                ("sunset", "Wed, 31 Dec 2025 00:00:00 GMT".to_owned()),
            ],
        );
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(SUNSET));
    }

    #[test]
    fn nothing_to_apply_changes_nothing() {
        let mut h = HeaderMap::new();
        h.insert(DEPRECATION, HeaderValue::from_static("@1"));
        let before = h.clone();
        apply_response_headers(&mut h, Vec::new());
        assert_eq!(h, before);
    }
}
