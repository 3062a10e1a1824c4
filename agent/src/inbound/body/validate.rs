//! The validate step: request body rules that need the body itself.

use http::header::{CONTENT_LENGTH, EXPECT, HeaderValue, TRANSFER_ENCODING};
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Body;
use palisade_policy::body::{BodyError, BodySchema};
use palisade_policy::engine::BodyRules;

use super::{ClientBody, CollectError, LimitSignal, LimitedBody, collect_capped, reason};
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
            Refusal::Schema(_) | Refusal::Unreadable(_) => 400,
        }
    }

    /// The audit reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => reason::BODY_TOO_LARGE,
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

fn boxed(body: ClientBody) -> ProxyBody {
    body.boxed()
}

/// Applies the route's body rules to `req` and returns it ready to forward.
///
/// `decide` has already refused a declared `Content-Length` over
/// `maxBodyBytes` (413) and a body whose media type the route does not take
/// (415; the engine is the one place that checks it). This step adds:
/// - with a JSON Schema: the body read whole (at most `maxBodyBytes`, or
///   [`DEFAULT_SCHEMA_BODY_CAP`]; 413 above), 400 when it does not validate
///   or cannot be read, and otherwise the buffered bytes forwarded with an
///   exact `Content-Length`;
/// - without a schema but with `maxBodyBytes`: a body of unknown length is
///   counted while it streams ([`LimitedBody`]).
///
/// Without rules the body is only boxed, as the forward step needs it.
pub async fn validate_request(
    rules: Option<&BodyRules>,
    req: Request<ClientBody>,
) -> Result<Validated, Refusal> {
    let Some(rules) = rules else {
        return Ok(Validated::unlimited(req.map(boxed)));
    };
    let has_body = !req.body().is_end_stream();
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
    req: Request<ClientBody>,
    has_body: bool,
) -> Result<Request<ProxyBody>, Refusal> {
    if !has_body && !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
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
