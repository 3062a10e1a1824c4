//! The mask step: redaction and masking of JSON responses.

use http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderMap, HeaderName,
    HeaderValue, IF_RANGE, RANGE, TRANSFER_ENCODING,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Bytes};
use palisade_policy::body::{is_json_media_type as is_json, media_type};
use palisade_policy::masking::ResponseMask;

use super::{CollectError, collect_capped, reason};
use crate::inbound::request::{BoxError, ProxyBody, full};

/// The largest JSON response the agent buffers to mask. The document must be
/// parsed whole, so a bigger one is withheld (502) rather than buffered
/// without bound or forwarded unmasked.
pub const MAX_MASKED_RESPONSE_BYTES: u64 = 4 << 20;

/// Headers describing the app's exact bytes. Once the body is rewritten they
/// are wrong, and a digest of the unmasked body would let a client confirm
/// guesses of a masked value (a 4-digit PIN is 10 000 hashes away).
const DIGEST_HEADERS: [&str; 4] = ["content-digest", "repr-digest", "digest", "content-md5"];

/// A response mask that applies to this request, from [`prepare_mask`].
#[derive(Debug, Clone, Copy)]
pub struct MaskPlan<'p> {
    mask: &'p ResponseMask,
    /// A HEAD response has no body to mask.
    head: bool,
}

/// Why a response on a masked route was withheld (502). Never carries body
/// content.
#[derive(Debug, thiserror::Error)]
pub enum Unmaskable {
    #[error("response has a Content-Encoding other than identity")]
    Encoded,
    #[error("JSON response exceeds the {limit}-byte masking cap")]
    TooLarge { limit: u64 },
    #[error("partial content (206) cannot be masked")]
    Partial,
    #[error("response body is not JSON")]
    NotJson,
    #[error("response body could not be read: {0}")]
    Read(#[source] BoxError),
}

impl Unmaskable {
    /// The audit reason code.
    pub fn reason(&self) -> &'static str {
        reason::UNMASKABLE
    }
}

/// Call before forwarding. `None` when the route masks nothing; otherwise
/// the request is changed so the app's answer can be inspected:
/// - `Accept-Encoding: identity`: the agent does not decompress (a
///   decompression bomb would defeat the buffer cap, and re-compressing
///   costs CPU on every response), so it asks for the plain JSON; an app
///   that encodes anyway gets a 502, never a pass-through.
/// - `Range` and `If-Range` removed: a byte range of a JSON document is not
///   JSON the mask can walk, and a fragment such as `"123-45-6789"` parses
///   on its own, so the app must send the whole document.
pub fn prepare_mask<'p, B>(
    mask: Option<&'p ResponseMask>,
    req: &mut Request<B>,
) -> Option<MaskPlan<'p>> {
    let mask = mask.filter(|m| !m.is_empty())?;
    let head = req.method() == Method::HEAD;
    let headers = req.headers_mut();
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    headers.remove(RANGE);
    headers.remove(IF_RANGE);
    Some(MaskPlan { mask, head })
}

/// Whether the response may be JSON. An absent, repeated or unparsable
/// `Content-Type` counts as JSON: a client may sniff it as such, so it is
/// masked (or withheld) rather than passed unchecked.
fn maybe_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return true;
    };
    match value.to_str().ok().and_then(media_type) {
        Some(m) => is_json(&m),
        None => true,
    }
}

/// Any `Content-Encoding` but `identity`.
fn encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
}

/// Applies the mask to the app's response, in place. Left as it came when
/// there is no plan, no body (HEAD, 1xx, 204, 304, an empty body) or the
/// body is not JSON. A JSON body is buffered (at most
/// [`MAX_MASKED_RESPONSE_BYTES`]), masked, and replaced, with its new
/// `Content-Length`. `Err` means the response must be replaced by a 502: it
/// may hold masked data the agent could not remove.
pub async fn mask_response(
    plan: Option<MaskPlan<'_>>,
    resp: &mut Response<ProxyBody>,
) -> Result<(), Unmaskable> {
    let Some(plan) = plan else {
        return Ok(());
    };
    let status = resp.status();
    if plan.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || resp.body().is_end_stream()
    {
        return Ok(());
    }
    if status == StatusCode::PARTIAL_CONTENT {
        // `prepare_mask` removed `Range`; an app that answers with a range
        // (or a multipart/byteranges of JSON parts) anyway is not guessed at.
        return Err(Unmaskable::Partial);
    }
    if !maybe_json(resp.headers()) {
        return Ok(());
    }
    if encoded(resp.headers()) {
        return Err(Unmaskable::Encoded);
    }
    // An empty body is a zero-sized box: no allocation.
    let body = std::mem::take(resp.body_mut());
    let bytes = collect_capped(body, MAX_MASKED_RESPONSE_BYTES)
        .await
        .map_err(|e| match e {
            CollectError::TooLarge => Unmaskable::TooLarge {
                limit: MAX_MASKED_RESPONSE_BYTES,
            },
            CollectError::Read(e) => Unmaskable::Read(e),
        })?;
    let headers = resp.headers_mut();
    let bytes = match plan.mask.apply(&bytes) {
        Ok(None) => bytes,
        Ok(Some(masked)) => {
            for name in DIGEST_HEADERS {
                headers.remove(HeaderName::from_static(name));
            }
            weaken_etag(headers);
            Bytes::from(masked)
        }
        Err(_) => return Err(Unmaskable::NotJson),
    };
    headers.remove(TRANSFER_ENCODING);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    *resp.body_mut() = full(bytes);
    Ok(())
}

/// A strong `ETag` promises byte-identical content; the masked body is
/// only semantically equivalent to what the app tagged (RFC 9110 §8.8.1),
/// so it is sent as a weak validator. Conditional GETs keep working:
/// `If-None-Match` compares weakly.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(ETAG) else {
        return;
    };
    if etag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = Vec::with_capacity(etag.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(etag.as_bytes());
    match HeaderValue::from_bytes(&weak) {
        Ok(v) => {
            headers.insert(ETAG, v);
        }
        Err(_) => {
            headers.remove(ETAG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn json_detection_fails_towards_masking() {
        assert!(maybe_json(&headers(&[(
            "content-type",
            "application/json"
        )])));
        assert!(maybe_json(&headers(&[(
            "content-type",
            "Application/Problem+JSON; charset=utf-8"
        )])));
        assert!(maybe_json(&headers(&[])));
        assert!(maybe_json(&headers(&[("content-type", "not a type")])));
        assert!(maybe_json(&headers(&[
            ("content-type", "text/plain"),
            ("content-type", "application/json"),
        ])));
        assert!(!maybe_json(&headers(&[("content-type", "text/plain")])));
        assert!(!maybe_json(&headers(&[("content-type", "image/png")])));
    }

    #[test]
    fn only_identity_counts_as_unencoded() {
        assert!(!encoded(&headers(&[])));
        assert!(!encoded(&headers(&[("content-encoding", "identity")])));
        assert!(!encoded(&headers(&[("content-encoding", " Identity ")])));
        assert!(encoded(&headers(&[("content-encoding", "gzip")])));
        assert!(encoded(&headers(&[("content-encoding", "identity, br")])));
    }

    #[test]
    fn strong_etags_become_weak() {
        let mut h = headers(&[("etag", "\"abc\"")]);
        weaken_etag(&mut h);
        assert_eq!(h.get(ETAG).unwrap(), "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h.get(ETAG).unwrap(), "W/\"abc\"");
    }
}
