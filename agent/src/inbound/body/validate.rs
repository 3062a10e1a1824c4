//! The validate step: request body rules that need the body itself.

use http::header::{
    CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HeaderMap, HeaderValue, TRANSFER_ENCODING,
};
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use palisade_policy::body::{BodyError, BodySchema, content_type_allowed, media_type};
use palisade_policy::engine::BodyRules;

use super::{CollectError, LimitSignal, LimitedBody, collect_capped, reason};
use crate::inbound::request::{BoxError, ProxyBody, full};

/// How much of a body is read for JSON Schema validation when the route sets
/// no `maxBodyBytes`: the body must be held whole to be validated, and an
/// unbounded buffer would let any client exhaust the sidecar's memory. A
/// larger schema-checked body needs an explicit `maxBodyBytes`.
pub const DEFAULT_SCHEMA_BODY_CAP: u64 = 1 << 20;

/// Why the validate step refused a request. The `Display` text goes to the
/// debug log only; the client gets the fixed deny body for [`status`].
///
/// [`status`]: Refusal::status
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("request body exceeds the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("request content type is not accepted on this route")]
    UnsupportedMediaType,
    /// Holds a pointer and a schema keyword, never body values.
    #[error(transparent)]
    Schema(#[from] BodyError),
    #[error("request body could not be read: {0}")]
    Unreadable(#[source] BoxError),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::TooLarge { .. } => 413,
            Refusal::UnsupportedMediaType => 415,
            Refusal::Schema(_) | Refusal::Unreadable(_) => 400,
        }
    }

    /// The audit reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => reason::BODY_TOO_LARGE,
            Refusal::UnsupportedMediaType => reason::CONTENT_TYPE,
            Refusal::Schema(_) => reason::SCHEMA,
            Refusal::Unreadable(_) => reason::BODY_UNREADABLE,
        }
    }
}

/// A request ready to forward.
#[derive(Debug)]
pub struct Validated {
    pub request: Request<ProxyBody>,
    /// Present when the body is counted while it streams: tells the forward
    /// step that a failed exchange was the limit tripping (413), not the app.
    pub limit: Option<LimitSignal>,
}

impl Validated {
    fn unlimited(request: Request<ProxyBody>) -> Self {
        Self {
            request,
            limit: None,
        }
    }
}

fn boxed(body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed()
}

/// `application/json` or any `+json` structured syntax suffix (RFC 6839).
pub(super) fn is_json(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}

/// The `Content-Type` as `content_type_allowed` expects it: a value that is
/// not visible ASCII becomes one no media type can match.
fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("\u{0}"))
}

/// Applies the route's body rules to `req` and returns it ready to forward.
///
/// `decide` has already refused a declared `Content-Length` over
/// `maxBodyBytes` (413) and, for an HTTP/1.1 request with a body, a media
/// type not in `contentTypes` (415). This step adds:
/// - the media type again when the body is real but was not announced by
///   `Content-Length` or `Transfer-Encoding` (an HTTP/2 DATA stream);
/// - with a JSON Schema: 415 unless the body is JSON, the body read whole
///   (at most `maxBodyBytes`, or [`DEFAULT_SCHEMA_BODY_CAP`]; 413 above),
///   400 when it does not validate or cannot be read, and otherwise the
///   buffered bytes forwarded with an exact `Content-Length`;
/// - without a schema but with `maxBodyBytes`: a body of unknown length is
///   counted while it streams ([`LimitedBody`]).
///
/// Without rules the body is only boxed, as the forward step needs it.
pub async fn validate_request(
    rules: Option<&BodyRules>,
    req: Request<Incoming>,
) -> Result<Validated, Refusal> {
    let Some(rules) = rules else {
        return Ok(Validated::unlimited(req.map(boxed)));
    };
    let has_body = !req.body().is_end_stream();
    if has_body && !content_type_allowed(content_type(req.headers()), &rules.content_types) {
        return Err(Refusal::UnsupportedMediaType);
    }
    if let Some(schema) = &rules.schema {
        let request = validate_schema(rules, schema, req, has_body).await?;
        return Ok(Validated::unlimited(request));
    }
    let limit = rules.max_body_bytes;
    // A declared length at or under the limit is enforced by hyper's framing
    // (it never yields more than declared), so only bodies of unknown or
    // larger length need counting.
    let uncounted = req.body().size_hint().exact().is_none_or(|len| len > limit);
    if limit > 0 && has_body && uncounted {
        let signal = LimitSignal::default();
        let request = req.map(|b| LimitedBody::with_signal(b, limit, signal.clone()).boxed());
        return Ok(Validated {
            request,
            limit: Some(signal),
        });
    }
    Ok(Validated::unlimited(req.map(boxed)))
}

async fn validate_schema(
    rules: &BodyRules,
    schema: &BodySchema,
    req: Request<Incoming>,
    has_body: bool,
) -> Result<Request<ProxyBody>, Refusal> {
    if has_body {
        let json = content_type(req.headers())
            .and_then(media_type)
            .is_some_and(|m| is_json(&m));
        if !json {
            return Err(Refusal::UnsupportedMediaType);
        }
    } else if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        // A read (GET, HEAD, DELETE, OPTIONS) without a body: nothing to
        // validate, so a schema route can serve reads too. A POST, PUT or
        // PATCH without one is validated as the empty body, which is not
        // JSON (400): frameworks that read a missing body as `{}` would
        // otherwise receive something the schema never checked.
        return Ok(req.map(boxed));
    }
    let cap = if rules.max_body_bytes > 0 {
        rules.max_body_bytes
    } else {
        DEFAULT_SCHEMA_BODY_CAP
    };
    let (mut parts, body) = req.into_parts();
    let bytes = collect_capped(body, cap).await.map_err(|e| match e {
        CollectError::TooLarge => Refusal::TooLarge { limit: cap },
        CollectError::Read(e) => Refusal::Unreadable(e),
    })?;
    schema.validate(&bytes)?;
    // The app gets exactly the validated bytes, framed by length; hyper's
    // chunked framing of the client's body does not carry over.
    parts.headers.remove(TRANSFER_ENCODING);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    // The whole body is already here: the app has nothing to agree to.
    parts.headers.remove(EXPECT);
    Ok(Request::from_parts(parts, full(bytes)))
}
