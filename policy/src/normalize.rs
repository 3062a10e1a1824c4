//! Request-target normalization.
//!
//! Route matching is only as strong as the path it sees: if `/admin` is
//! denied, `/%61dmin`, `/x/../admin` and `//admin` must all be recognised as
//! the same resource. This module turns an origin-form request target into a
//! single canonical spelling (or refuses it) so that policy matching never has
//! to think about encodings. See `docs/path-normalization.md` for the rules.

use std::borrow::Cow;

/// Knobs for [`normalize_target`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    /// Keep %2F / %5C (upper-cased) instead of rejecting them. Default false: rejected.
    pub allow_encoded_slash: bool,
    /// Accept `;` in the path, as part of its segment. Default false: a `;`
    /// is refused, because servlet containers strip `;` parameters before
    /// routing and would serve another path than the one policy matched.
    /// Even when allowed, a segment that is `.` or `..` before its first `;`
    /// (`/..;/`) is refused.
    pub allow_path_parameters: bool,
}

/// A request target split into its canonical path and its untouched query.
#[derive(Debug, PartialEq, Eq)]
pub struct NormalizedTarget<'a> {
    /// Borrowed when the input path was already normal (no allocation on the common path).
    pub path: Cow<'a, str>,
    /// Text after the first '?', untouched, never used for matching.
    pub query: Option<&'a str>,
}

/// Why a request target was refused. Every variant maps to HTTP 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("request target is empty")]
    Empty,
    #[error("request target is not in origin form (must start with '/')")]
    NotOriginForm,
    #[error("request target contains a fragment ('#')")]
    Fragment,
    #[error("request target contains invalid byte 0x{byte:02X} at offset {offset}")]
    InvalidByte { byte: u8, offset: usize },
    #[error(
        "malformed percent-encoding at offset {offset} ('%' must be followed by two hex digits)"
    )]
    BadPercentEncoding { offset: usize },
    #[error("request path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("request path contains an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("request path contains an encoded control character (%00-%1F or %7F)")]
    EncodedControl,
    #[error("request path contains a ';' path parameter")]
    PathParameter,
    #[error("request path contains a dot segment with a ';' parameter ('.;' or '..;')")]
    DotSegmentParameter,
    #[error("percent-encoded bytes of the request path are not valid UTF-8")]
    InvalidUtf8,
}

/// Normalizes an origin-form request target (`/path?query`).
///
/// The path is validated, percent-decoded exactly once for unreserved
/// characters, slash-merged and stripped of dot segments; the query is only
/// validated. Returns the input path borrowed when it was already normal.
pub fn normalize_target<'a>(
    target: &'a str,
    options: &NormalizeOptions,
) -> Result<NormalizedTarget<'a>, PathError> {
    let bytes = target.as_bytes();
    match bytes.first() {
        None => return Err(PathError::Empty),
        Some(b'/') => {}
        Some(_) => return Err(PathError::NotOriginForm),
    }
    // Common case: one pass finds the path already normal and where it ends.
    if let Some((path_len, high_escapes)) = normal_path_scan(bytes, options) {
        let (path, rest) = target.split_at(path_len);
        if high_escapes && !escapes_are_utf8(path.as_bytes()) {
            return Err(PathError::InvalidUtf8);
        }
        // `rest` is empty or starts with the '?' that stopped the scan.
        let query = match rest.strip_prefix('?') {
            Some(query) => Some(validate_query(query, path_len + 1)?),
            None => None,
        };
        return Ok(NormalizedTarget {
            path: Cow::Borrowed(path),
            query,
        });
    }
    // A fragment is never sent by a conforming client; refuse it wherever it
    // appears rather than guess which part of the target it belongs to.
    if bytes.contains(&b'#') {
        return Err(PathError::Fragment);
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(validate_query(query, path.len() + 1)?)),
        None => (target, None),
    };
    let path = normalize_path_slow(path, options)?;
    if !escapes_are_utf8(path.as_bytes()) {
        return Err(PathError::InvalidUtf8);
    }
    Ok(NormalizedTarget {
        path: Cow::Owned(path),
        query,
    })
}

/// True when `path` is already in normal form under the default options
/// (normalize would return it unchanged and borrowed).
pub fn is_normalized(path: &str) -> bool {
    is_normalized_with(path, &NormalizeOptions::default())
}

/// Like [`is_normalized`] but under explicit options: with
/// `allow_encoded_slash`, `%2F` and `%5C` are acceptable.
pub fn is_normalized_with(path: &str, options: &NormalizeOptions) -> bool {
    normal_path_scan(path.as_bytes(), options).is_some_and(|(len, high)| {
        len == path.len() && (!high || escapes_are_utf8(path.as_bytes()))
    })
}

/// Whether the bytes the path's escapes stand for are valid UTF-8 (no
/// overlong forms such as `%C0%AE` for `.`, no lone continuation bytes):
/// a lenient decoder behind the agent must not read a character the policy
/// never saw. Raw bytes are ASCII here (anything else was refused).
fn escapes_are_utf8(path: &[u8]) -> bool {
    if !path.contains(&b'%') {
        return true;
    }
    let mut decoded: smallvec::SmallVec<[u8; 128]> = smallvec::SmallVec::new();
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%'
            && let (Some(hi), Some(lo)) = (
                path.get(i + 1).copied().and_then(hex_value),
                path.get(i + 2).copied().and_then(hex_value),
            )
        {
            decoded.push((hi << 4) | lo);
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

// ---------------------------------------------------------------------------
// Byte classes

const UNRESERVED: u8 = 1;
const PATH_RAW: u8 = 2;
const QUERY_RAW: u8 = 4;
/// Allowed raw in a path and needing no further thought by the fast check.
const PATH_PLAIN: u8 = 8;

/// One lookup per byte keeps the hot loop branch-light.
static CLASS: [u8; 256] = build_classes();

const fn build_classes() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut flags = 0;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            flags |= UNRESERVED | PATH_RAW;
        }
        if matches!(
            c,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'%'
        ) {
            flags |= PATH_RAW;
        }
        // The query is opaque to matching; only bytes that can smuggle
        // framing or encoding ambiguity (controls, space, non-ASCII, '#')
        // are refused there.
        if c > 0x20 && c < 0x7F && c != b'#' {
            flags |= QUERY_RAW;
        }
        if flags & PATH_RAW != 0 && c != b'/' && c != b'%' && c != b';' {
            flags |= PATH_PLAIN;
        }
        table[i] = flags;
        i += 1;
    }
    table
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

const fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Returns the query unchanged when every byte is acceptable.
fn validate_query(query: &str, base: usize) -> Result<&str, PathError> {
    let bytes = query.as_bytes();
    match bytes
        .iter()
        .position(|&b| CLASS[usize::from(b)] & QUERY_RAW == 0)
    {
        None => Ok(query),
        // "A '#' anywhere is a fragment" wins over any other bad byte.
        Some(_) if bytes.contains(&b'#') => Err(PathError::Fragment),
        Some(i) => Err(PathError::InvalidByte {
            byte: bytes[i],
            offset: base + i,
        }),
    }
}

// ---------------------------------------------------------------------------
// Percent escapes

/// What a `%XX` escape becomes in the normal form.
enum Escape {
    /// An unreserved character: written raw.
    Decode(u8),
    /// Anything else that is allowed: kept as an escape with upper-case hex.
    Keep(u8),
}

/// Classifies the escape starting at `bytes[at] == b'%'`.
fn classify_escape(
    bytes: &[u8],
    at: usize,
    options: &NormalizeOptions,
) -> Result<Escape, PathError> {
    let bad = PathError::BadPercentEncoding { offset: at };
    let hi = bytes.get(at + 1).copied().and_then(hex_value).ok_or(bad)?;
    let lo = bytes
        .get(at + 2)
        .copied()
        .and_then(hex_value)
        .ok_or(PathError::BadPercentEncoding { offset: at })?;
    let value = (hi << 4) | lo;
    match value {
        b'/' if !options.allow_encoded_slash => Err(PathError::EncodedSlash),
        b'\\' if !options.allow_encoded_slash => Err(PathError::EncodedBackslash),
        0x00..=0x1F | 0x7F => Err(PathError::EncodedControl),
        _ if CLASS[usize::from(value)] & UNRESERVED != 0 => Ok(Escape::Decode(value)),
        _ => Ok(Escape::Keep(value)),
    }
}

// ---------------------------------------------------------------------------
// Fast check

fn is_empty_or_dot(segment: &[u8]) -> bool {
    matches!(segment, b"" | b"." | b"..")
}

/// Single pass answering "is the path part of this target exactly what the
/// slow path would produce?". Returns the path's length (the scan stops at
/// '?') when it is, and whether it holds escapes of non-ASCII bytes (to be
/// checked for UTF-8); any doubt, including an error, answers `None` and lets
/// the slow path decide.
fn normal_path_scan(bytes: &[u8], options: &NormalizeOptions) -> Option<(usize, bool)> {
    if bytes.first() != Some(&b'/') {
        return None;
    }
    let mut segment_start = 1;
    let mut i = 1;
    let mut high_escapes = false;
    loop {
        while bytes
            .get(i)
            .is_some_and(|&b| CLASS[usize::from(b)] & PATH_PLAIN != 0)
        {
            i += 1;
        }
        match bytes.get(i) {
            None | Some(b'?') => break,
            Some(b'/') => {
                if is_empty_or_dot(&bytes[segment_start..i]) {
                    return None;
                }
                i += 1;
                segment_start = i;
            }
            Some(b'%') => {
                match classify_escape(bytes, i, options) {
                    Ok(Escape::Keep(value))
                        if bytes[i + 1] == UPPER_HEX[usize::from(value >> 4)]
                            && bytes[i + 2] == UPPER_HEX[usize::from(value & 0xF)] =>
                    {
                        high_escapes |= value >= 0x80;
                    }
                    _ => return None,
                }
                i += 3;
            }
            Some(b';')
                if options.allow_path_parameters && !is_empty_or_dot(&bytes[segment_start..i]) =>
            {
                i += 1;
            }
            // A refused parameter, or any other doubt: the slow path decides.
            Some(_) => return None,
        }
    }
    // An empty final segment is a preserved trailing slash; dots are not.
    match &bytes[segment_start..i] {
        b"." | b".." => None,
        _ => Some((i, high_escapes)),
    }
}

// ---------------------------------------------------------------------------
// Slow path

/// Decodes, merges slashes and removes dot segments in one pass.
///
/// Each segment is decoded straight into `out` and then inspected, so a dot
/// produced by `%2E` is treated exactly like a raw one. Decoded characters are
/// unreserved, so they can never introduce a new `/` or `%`: decoding happens
/// once and the result is a fixed point.
fn normalize_path_slow(path: &str, options: &NormalizeOptions) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    // bytes[0] is '/', checked by the caller.
    let mut i = 1;
    let trailing_slash = loop {
        let segment_start = out.len();
        out.push('/');
        while let Some(&b) = bytes.get(i) {
            if CLASS[usize::from(b)] & PATH_PLAIN != 0 {
                // Copy the whole run of plain bytes at once.
                let run = bytes[i..]
                    .iter()
                    .position(|&b| CLASS[usize::from(b)] & PATH_PLAIN == 0)
                    .map_or(bytes.len(), |n| i + n);
                // Plain bytes are ASCII, so both ends are char boundaries.
                out.push_str(path.get(i..run).unwrap_or_default());
                i = run;
            } else if b == b'/' {
                break;
            } else if b == b';' {
                if !options.allow_path_parameters {
                    return Err(PathError::PathParameter);
                }
                // `.;x` and `..;x` are dot segments to a servlet container.
                if matches!(&out.as_bytes()[segment_start + 1..], b"." | b"..") {
                    return Err(PathError::DotSegmentParameter);
                }
                out.push(';');
                i += 1;
            } else if b == b'%' {
                match classify_escape(bytes, i, options)? {
                    Escape::Decode(c) => out.push(char::from(c)),
                    Escape::Keep(value) => {
                        out.push('%');
                        out.push(char::from(UPPER_HEX[usize::from(value >> 4)]));
                        out.push(char::from(UPPER_HEX[usize::from(value & 0xF)]));
                    }
                }
                i += 3;
            } else {
                return Err(PathError::InvalidByte { byte: b, offset: i });
            }
        }
        let at_end = i >= bytes.len();
        // `out` is pure ASCII, so every index is a char boundary.
        let removed = match &out.as_bytes()[segment_start + 1..] {
            // Empty segments come from `//` (merged) or a trailing slash.
            b"" | b"." => {
                out.truncate(segment_start);
                true
            }
            b".." => {
                out.truncate(segment_start);
                // Drop the parent segment; at the root there is none to drop.
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
                true
            }
            _ => false,
        };
        if at_end {
            // A final `/`, `/.` or `/..` leaves the path ending in a slash.
            break removed;
        }
        i += 1; // the '/'
    };
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path_index::{PathIndex, PathPattern};
    use proptest::prelude::*;

    const STRICT: NormalizeOptions = NormalizeOptions {
        allow_encoded_slash: false,
        allow_path_parameters: false,
    };
    const LENIENT: NormalizeOptions = NormalizeOptions {
        allow_encoded_slash: true,
        allow_path_parameters: false,
    };
    const PARAMS: NormalizeOptions = NormalizeOptions {
        allow_encoded_slash: false,
        allow_path_parameters: true,
    };

    fn norm(target: &str) -> Result<String, PathError> {
        normalize_target(target, &STRICT).map(|t| t.path.into_owned())
    }

    fn ok(target: &str) -> String {
        match norm(target) {
            Ok(p) => p,
            Err(e) => panic!("{target:?} failed: {e}"),
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/../c"), "/a/c");
        assert_eq!(ok("/a/b/c/../../d"), "/a/d");
        assert_eq!(ok("/../a"), "/a");
        assert_eq!(ok("/../../a/.."), "/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/.."), "/");
        assert_eq!(ok("/a/.b/..c/...d"), "/a/.b/..c/...d");
        assert_eq!(ok("/a/..."), "/a/...");
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(ok("/a/%2e%2e/b"), "/b");
        assert_eq!(ok("/a/%2E%2E/b"), "/b");
        assert_eq!(ok("/a/.%2E/b"), "/b");
        assert_eq!(ok("/a/%2e./b"), "/b");
        assert_eq!(ok("/a/%2e/b"), "/a/b");
        assert_eq!(ok("/admin/%2e%2e/%2e%2e/admin/x"), "/admin/x");
        assert_eq!(ok("/a/%2e%2e"), "/");
        assert_eq!(ok("/a/b/%2E"), "/a/b/");
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/%41%7e%7E%2D%5f%30"), "/A~~-_0");
    }

    #[test]
    fn other_escapes_are_kept_with_upper_hex() {
        assert_eq!(ok("/a%3ab"), "/a%3Ab");
        assert_eq!(ok("/a%3Ab"), "/a%3Ab");
        assert_eq!(ok("/%c3%a9t%C3%A9"), "/%C3%A9t%C3%A9");
        assert_eq!(ok("/%20%3f%23"), "/%20%3F%23");
    }

    #[test]
    fn decoding_happens_exactly_once() {
        // `%25` is '%', not unreserved: it stays encoded and the following
        // `2e` is literal text, not an escape. Letter case outside escapes is
        // never changed.
        assert_eq!(ok("/%252e"), "/%252e");
        assert_eq!(ok("/%252E%252E/admin"), "/%252E%252E/admin");
        assert_eq!(ok("/a/%252e%252e/b"), "/a/%252e%252e/b");
        assert_eq!(ok("/%2525"), "/%2525");
        assert_eq!(ok(&ok("/%252e")), "/%252e");
    }

    #[test]
    fn encoded_slash_and_backslash_are_refused_by_default() {
        assert_eq!(norm("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/a%5cb"), Err(PathError::EncodedBackslash));
        assert_eq!(norm("/a%5Cb"), Err(PathError::EncodedBackslash));
        assert_eq!(norm("/a/..%2f..%2fadmin"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn encoded_slash_and_backslash_kept_when_allowed() {
        let n = |t| normalize_target(t, &LENIENT).map(|t| t.path.into_owned());
        assert_eq!(n("/a%2fb"), Ok("/a%2Fb".to_owned()));
        assert_eq!(n("/a%5cb"), Ok("/a%5Cb".to_owned()));
        assert!(matches!(
            normalize_target("/a%2Fb", &LENIENT).map(|t| t.path),
            Ok(Cow::Borrowed(_))
        ));
        assert!(is_normalized_with("/a%2Fb", &LENIENT));
        assert!(!is_normalized("/a%2Fb"));
    }

    #[test]
    fn raw_backslash_is_refused() {
        assert_eq!(
            norm("/a\\..\\admin"),
            Err(PathError::InvalidByte {
                byte: b'\\',
                offset: 2
            })
        );
    }

    #[test]
    fn slash_runs_are_merged() {
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("//a///b//"), "/a/b/");
        assert_eq!(ok("/a//../b"), "/b");
        assert_eq!(ok("/a/b//"), "/a/b/");
    }

    #[test]
    fn fragments_are_refused() {
        assert_eq!(norm("/a#b"), Err(PathError::Fragment));
        assert_eq!(norm("/a?b#c"), Err(PathError::Fragment));
        assert_eq!(norm("/#"), Err(PathError::Fragment));
        assert_eq!(norm("/a%23b"), Ok("/a%23b".to_owned()));
        // Fragment wins over any other bad byte, in path or query.
        assert_eq!(norm("/a b#"), Err(PathError::Fragment));
        assert_eq!(norm("/a?\x01#"), Err(PathError::Fragment));
        assert_eq!(norm("/a/../b?x#"), Err(PathError::Fragment));
    }

    #[test]
    fn bad_percent_encoding_is_refused() {
        assert_eq!(
            norm("/a%"),
            Err(PathError::BadPercentEncoding { offset: 2 })
        );
        assert_eq!(
            norm("/a%4"),
            Err(PathError::BadPercentEncoding { offset: 2 })
        );
        assert_eq!(
            norm("/a%zz"),
            Err(PathError::BadPercentEncoding { offset: 2 })
        );
        assert_eq!(
            norm("/a%4g/"),
            Err(PathError::BadPercentEncoding { offset: 2 })
        );
        assert_eq!(
            norm("/%%41"),
            Err(PathError::BadPercentEncoding { offset: 1 })
        );
    }

    #[test]
    fn controls_are_refused() {
        assert_eq!(norm("/a%00"), Err(PathError::EncodedControl));
        assert_eq!(norm("/a%0a"), Err(PathError::EncodedControl));
        assert_eq!(norm("/a%1F"), Err(PathError::EncodedControl));
        assert_eq!(norm("/a%7f"), Err(PathError::EncodedControl));
        assert_eq!(
            norm("/a\nb"),
            Err(PathError::InvalidByte {
                byte: b'\n',
                offset: 2
            })
        );
        assert_eq!(
            norm("/a\x7f"),
            Err(PathError::InvalidByte {
                byte: 0x7F,
                offset: 2
            })
        );
        assert_eq!(
            norm("/a?b\0"),
            Err(PathError::InvalidByte { byte: 0, offset: 4 })
        );
    }

    #[test]
    fn disallowed_raw_bytes_are_refused() {
        for (i, c) in [' ', '"', '<', '>', '\\', '^', '`', '{', '|', '}', '[', ']']
            .into_iter()
            .enumerate()
        {
            let target = format!("/x{c}");
            assert_eq!(
                norm(&target),
                Err(PathError::InvalidByte {
                    byte: c as u8,
                    offset: 2
                }),
                "case {i}: {target:?}"
            );
        }
        assert_eq!(
            norm("/ab/é"),
            Err(PathError::InvalidByte {
                byte: 0xC3,
                offset: 4
            })
        );
    }

    #[test]
    fn all_allowed_raw_bytes_pass_untouched() {
        let p = "/azAZ09-._~!$&'()*+,=:@/x";
        assert_eq!(ok(p), p);
        let with_params = "/azAZ09-._~!$&'()*+,;=:@/x";
        let n = normalize_target(with_params, &PARAMS).map(|t| t.path.into_owned());
        assert_eq!(n, Ok(with_params.to_owned()));
    }

    #[test]
    fn path_parameters_are_refused_by_default() {
        // A servlet container strips `;…` per segment before routing: these
        // are `/admin/secret` and `/admin` to it, so policy must not see
        // `admin;x` or `public/..;` as other paths.
        assert_eq!(norm("/admin;x/secret"), Err(PathError::PathParameter));
        assert_eq!(norm("/public/..;/admin"), Err(PathError::PathParameter));
        assert_eq!(norm("/a;jsessionid=1"), Err(PathError::PathParameter));
        assert_eq!(norm("/;"), Err(PathError::PathParameter));
        // An encoded `;` is data, not a parameter, to every back end.
        assert_eq!(ok("/a%3Bb"), "/a%3Bb");
        assert_eq!(ok("/a%3bb"), "/a%3Bb");
        assert_eq!(ok("/a?x=1;y=2"), "/a");
        assert!(!is_normalized("/a;b"));
    }

    #[test]
    fn allowed_path_parameters_keep_their_segment_but_never_a_dot_segment() {
        let n = |t| normalize_target(t, &PARAMS).map(|t| t.path.into_owned());
        assert_eq!(
            n("/app;jsessionid=1/x"),
            Ok("/app;jsessionid=1/x".to_owned())
        );
        assert_eq!(n("/a;b;c"), Ok("/a;b;c".to_owned()));
        assert_eq!(n("/a;x/../b"), Ok("/b".to_owned()));
        assert_eq!(n("/public/..;/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/public/.;/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(
            n("/public/%2e%2e;x/admin"),
            Err(PathError::DotSegmentParameter)
        );
        assert_eq!(n("/public/..;"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/a/.x;/b"), Ok("/a/.x;/b".to_owned()));
        assert!(is_normalized_with("/a;b", &PARAMS));
        assert!(!is_normalized_with("/..;b", &PARAMS));
        assert!(matches!(
            normalize_target("/a;b/c", &PARAMS).map(|t| t.path),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn escapes_must_decode_to_utf8() {
        // Overlong forms of `.` and `/` that lenient decoders accept.
        assert_eq!(norm("/%C0%AE%C0%AE/admin"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/a/%c0%af/b"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/%E0%80%AE"), Err(PathError::InvalidUtf8));
        // A lone continuation byte, a truncated sequence, a surrogate.
        assert_eq!(norm("/%80"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/%C3"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/%C3x%A9"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/%ED%A0%80"), Err(PathError::InvalidUtf8));
        assert_eq!(norm("/x/../%FF"), Err(PathError::InvalidUtf8));
        // Real UTF-8 passes, on the fast and the slow path.
        assert_eq!(ok("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(ok("/x/../caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/%F0%9F%98%80"), "/%F0%9F%98%80");
        assert!(!is_normalized("/%C0%AE"));
        assert!(is_normalized("/caf%C3%A9"));
        // The query takes no part in matching and is not decoded.
        assert_eq!(ok("/a?x=%C0%AE"), "/a");
    }

    #[test]
    fn origin_form_is_required() {
        assert_eq!(norm(""), Err(PathError::Empty));
        assert_eq!(norm("a/b"), Err(PathError::NotOriginForm));
        assert_eq!(norm("*"), Err(PathError::NotOriginForm));
        assert_eq!(norm("http://h/a"), Err(PathError::NotOriginForm));
        assert_eq!(norm("?a"), Err(PathError::NotOriginForm));
    }

    #[test]
    fn query_is_split_and_untouched() {
        let t = normalize_target("/a/../b?x=%2e%2F&y=/..?z|{}", &STRICT);
        assert_eq!(
            t,
            Ok(NormalizedTarget {
                path: Cow::Owned("/b".to_owned()),
                query: Some("x=%2e%2F&y=/..?z|{}"),
            })
        );
        let t = normalize_target("/a?", &STRICT);
        assert_eq!(t.map(|t| t.query), Ok(Some("")));
        assert_eq!(
            norm("/a?b c"),
            Err(PathError::InvalidByte {
                byte: b' ',
                offset: 4
            })
        );
        assert_eq!(
            norm("/a?é"),
            Err(PathError::InvalidByte {
                byte: 0xC3,
                offset: 3
            })
        );
    }

    #[test]
    fn already_normal_path_is_borrowed() {
        for p in ["/", "/a", "/a/", "/api/v1/orders/42", "/a%3Ab", "/.a/..b/"] {
            let t = normalize_target(p, &STRICT);
            assert!(
                matches!(&t, Ok(t) if matches!(t.path, Cow::Borrowed(_))),
                "{p:?}"
            );
            assert!(is_normalized(p), "{p:?}");
        }
        let t = normalize_target("/a/b?q=1", &STRICT);
        assert!(matches!(
            t,
            Ok(NormalizedTarget {
                path: Cow::Borrowed("/a/b"),
                query: Some("q=1")
            })
        ));
    }

    #[test]
    fn paths_needing_work_are_not_normalized() {
        for p in [
            "", "a", "//", "/a//b", "/.", "/..", "/a/./b", "/a/..", "/%41", "/%3a", "/a?b", "/a#b",
            "/a b", "/%2F",
        ] {
            assert!(!is_normalized(p), "{p:?}");
        }
    }

    // -----------------------------------------------------------------------
    // Property tests

    /// Independent reference: decode unreserved escapes, merge slashes, then
    /// RFC 3986 §5.2.4 remove_dot_segments written literally with an input
    /// and output buffer. Only used on inputs the normalizer accepted.
    fn reference_resolve(path: &str) -> String {
        let b = path.as_bytes();
        let mut decoded = String::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let v = u8::from_str_radix(&path[i + 1..i + 3], 16).unwrap();
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(v as char);
                } else {
                    decoded.push_str(&path[i..i + 3].to_ascii_uppercase());
                }
                i += 3;
            } else {
                decoded.push(b[i] as char);
                i += 1;
            }
        }
        let mut merged = String::new();
        for c in decoded.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        let mut input = merged.as_str().to_owned();
        let mut output = String::new();
        while !input.is_empty() {
            if input.starts_with("../") {
                input.drain(..3);
            } else if input.starts_with("./") {
                input.drain(..2);
            } else if input.starts_with("/./") {
                input.replace_range(..3, "/");
            } else if input == "/." {
                input = "/".to_owned();
            } else if input.starts_with("/../") || input == "/.." {
                let n = if input == "/.." { 3 } else { 4 };
                input.replace_range(..n, "/");
                let cut = output.rfind('/').unwrap_or(0);
                output.truncate(cut);
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |p| p + start);
                output.push_str(&input[..end]);
                input.drain(..end);
            }
        }
        output
    }

    fn admin_index() -> PathIndex<&'static str> {
        let mut index = PathIndex::new();
        index
            .insert(PathPattern::Prefix("/admin".to_owned()), "deny")
            .unwrap();
        index
    }

    fn matched(index: &PathIndex<&'static str>, path: &str) -> bool {
        let mut hit = false;
        index.for_each_match(path, |_, _| hit = true);
        hit
    }

    fn segment() -> impl Strategy<Value = String> {
        // Unreserved plus a few sub-delims; never a bare dot segment.
        "[a-zA-Z0-9._~!$&'()*+,=:@-]{1,8}"
            .prop_filter("not a dot segment", |s| s != "." && s != "..")
    }

    /// One equivalent spelling of `segments` rooted at `/admin`.
    fn spelling(segments: Vec<String>) -> impl Strategy<Value = (String, String)> {
        let plain = format!(
            "/admin{}",
            segments.iter().map(|s| format!("/{s}")).collect::<String>()
        );
        let mut all = vec!["admin".to_owned()];
        all.extend(segments);
        let n = all.len();
        (
            proptest::collection::vec(proptest::collection::vec(any::<(bool, bool)>(), 8), n),
            proptest::collection::vec(0u8..6, n),
            proptest::collection::vec("[a-z.]{1,3}", n),
        )
            .prop_map(move |(encodings, detours, junk)| {
                let mut out = String::new();
                for (k, seg) in all.iter().enumerate() {
                    out.push_str(&detour(detours[k], &junk[k]));
                    out.push('/');
                    for (j, ch) in seg.chars().enumerate() {
                        let (encode, lower) = encodings[k][j % 8];
                        let unreserved = ch.is_ascii_alphanumeric() || "-._~".contains(ch);
                        if encode && unreserved {
                            let hex = format!("%{:02X}", ch as u32);
                            out.push_str(&if lower { hex.to_ascii_lowercase() } else { hex });
                        } else {
                            out.push(ch);
                        }
                    }
                }
                (plain.clone(), out)
            })
    }

    /// A detour that resolves to nothing: `/.`, `/x/..`, `//`, `/%2e`, ...
    fn detour(kind: u8, junk: &str) -> String {
        let junk = if junk.chars().all(|c| c == '.') {
            "j"
        } else {
            junk
        };
        match kind {
            1 => "/.".to_owned(),
            2 => format!("/{junk}/.."),
            3 => "/".to_owned(),
            4 => "/%2e".to_owned(),
            5 => format!("/{junk}/%2E%2e"),
            _ => String::new(),
        }
    }

    /// Random strings over tricky characters, with whole `admin` words mixed
    /// in often enough that a good share of inputs land under `/admin`.
    fn tricky_target() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            8 => proptest::sample::select(&['/', '.', '%', '2', 'e', 'E', 'f', 'F', '5', 'c', 'C', '\\', '#', '?', 'a', 'd', 'm', 'i', 'n'][..])
                .prop_map(String::from),
            2 => Just("admin".to_owned()),
            2 => Just("/".to_owned()),
            1 => Just("%2e".to_owned()),
            1 => Just("%2E".to_owned()),
        ];
        proptest::collection::vec(token, 1..24).prop_map(|t| format!("/{}", t.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalization_is_idempotent(target in "[/a-cA-C0-9.%~:?#\\\\ _-]{0,24}") {
            if let Ok(once) = normalize_target(&target, &LENIENT) {
                let twice = normalize_target(&once.path, &LENIENT);
                prop_assert!(matches!(&twice, Ok(t) if matches!(t.path, Cow::Borrowed(_))));
                prop_assert_eq!(twice.map(|t| t.path.into_owned()), Ok(once.path.clone().into_owned()));
                prop_assert!(is_normalized_with(&once.path, &LENIENT));
            }
        }

        #[test]
        fn escape_heavy_input_is_idempotent(
            target in "/([a-zA-Z.]|%[0-9a-fA-F]{2}|/){0,20}"
        ) {
            if let Ok(once) = norm(&target) {
                prop_assert_eq!(norm(&once), Ok(once.clone()));
                prop_assert!(is_normalized(&once));
            }
        }

        #[test]
        fn output_has_no_dot_segment_or_double_slash(
            target in "/([a.]|%2[eE]|%2[fF]|%41|/){0,24}"
        ) {
            if let Ok(t) = normalize_target(&target, &LENIENT) {
                let p = t.path;
                prop_assert!(p.starts_with('/'));
                prop_assert!(!p.contains("//"), "{}", p);
                for seg in p.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{}", p);
                }
            }
        }

        #[test]
        fn query_is_returned_verbatim(target in "/[a./%2eE?=&|{}]{0,24}") {
            if let Ok(t) = normalize_target(&target, &STRICT) {
                prop_assert_eq!(t.query, target.split_once('?').map(|(_, q)| q));
            }
        }

        #[test]
        fn never_panics_on_arbitrary_input(
            target in any::<String>(),
            lenient in any::<bool>(),
            params in any::<bool>(),
        ) {
            let options = NormalizeOptions {
                allow_encoded_slash: lenient,
                allow_path_parameters: params,
            };
            let _ = normalize_target(&target, &options);
            let _ = is_normalized(&target);
        }

        #[test]
        fn deny_prefix_cannot_be_bypassed_by_equivalent_spellings(
            (plain, spelled) in proptest::collection::vec(segment(), 0..5).prop_flat_map(spelling)
        ) {
            let index = admin_index();
            let normalized = norm(&spelled);
            prop_assert_eq!(&normalized, &Ok(plain.clone()), "spelling {}", spelled);
            prop_assert!(matched(&index, &plain));
        }

        #[test]
        fn tricky_strings_resolving_under_admin_are_matched(
            target in tricky_target()
        ) {
            let index = admin_index();
            if let Ok(path) = norm(&target) {
                let path_only = target.split('?').next().unwrap_or_default();
                let resolved = reference_resolve(path_only);
                prop_assert_eq!(path.as_str(), resolved.as_str());
                let under_admin = resolved == "/admin" || resolved.starts_with("/admin/");
                prop_assert_eq!(matched(&index, &path), under_admin, "{} -> {}", target, path);
            }
        }

        #[test]
        fn admin_words_with_random_escapes_are_matched(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("/".to_owned()), Just("admin".to_owned()), Just(".".to_owned()),
                    Just("%2e".to_owned()), Just("%2E".to_owned()), Just("%61".to_owned()),
                    Just("%64min".to_owned()), Just("adm%69n".to_owned()), Just("x".to_owned()),
                ],
                1..14,
            )
        ) {
            let index = admin_index();
            let target = format!("/{}", parts.concat());
            if let Ok(path) = norm(&target) {
                let resolved = reference_resolve(&target);
                prop_assert_eq!(path.as_str(), resolved.as_str());
                let under_admin = resolved == "/admin" || resolved.starts_with("/admin/");
                prop_assert_eq!(matched(&index, &path), under_admin, "{} -> {}", target, path);
            }
        }
    }
}
