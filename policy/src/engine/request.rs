//! What the engine is asked about, and what it answers.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, Method};

use crate::identity::SpiffeId;
use crate::ratelimit::RateLimitOutcome;

/// A request as the agent has parsed and authenticated it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// The raw request target (origin form: path and query).
    pub target: &'a str,
    /// `Host` or `:authority`.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The application port the request arrived for.
    pub port: u16,
    /// The address of the TCP peer.
    pub peer_addr: IpAddr,
    /// Verified mTLS peer identity; `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
    /// Claims of a verified JWT.
    pub jwt_claims: Option<&'a serde_json::Value>,
    /// Client id of a verified API key.
    pub api_key_client: Option<&'a str>,
    /// Set when a credential was presented but failed verification (e.g.
    /// `jwt.expired`): the request is refused with 401.
    pub credential_error: Option<&'a str>,
    /// The request carries a body (a non-zero `Content-Length`, chunked
    /// framing, or HTTP/2 DATA to come): its media type is checked.
    pub has_body: bool,
    pub time: RequestTime,
}

impl Request<'_> {
    /// Whether headers announce a body: a `Content-Length` other than 0, or
    /// `Transfer-Encoding` (for callers that only have headers, such as
    /// `palisadectl policy simulate`; the agent knows from the stream).
    pub fn headers_announce_body(headers: &HeaderMap) -> bool {
        headers.contains_key(http::header::TRANSFER_ENCODING)
            || headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0")
    }
}

/// Time, supplied by the caller so the engine stays pure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTime {
    /// Seconds since the Unix epoch (time-of-day conditions, sunsets).
    pub unix_seconds: i64,
    /// A monotonic clock reading (rate limits).
    pub monotonic: Duration,
}

/// Why a request was decided the way it was. `as_str` is the stable code
/// written into audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An allow rule matched.
    Allowed,
    /// No allow rule exists and the request carried a verified identity.
    DefaultAllAuthenticated,
    /// The path could not be normalized.
    InvalidPath,
    /// The path has `;` parameters (refused by default) or a `.;`/`..;` segment.
    PathParameter,
    /// The path's percent-encoded bytes are not UTF-8.
    PathNotUtf8,
    IpFilter,
    MtlsRequired,
    AuthenticationFailed,
    DenyRule,
    /// Allow rules exist but none matched.
    NoAllowMatch,
    DefaultDeny,
    Unauthenticated,
    Sunset,
    RateLimited,
    UnsupportedMediaType,
    BodyTooLarge,
}

impl Reason {
    /// The reason for a path that normalization refused.
    pub fn invalid_path(error: &crate::normalize::PathError) -> Self {
        use crate::normalize::PathError;
        match error {
            PathError::PathParameter | PathError::DotSegmentParameter => Reason::PathParameter,
            PathError::InvalidUtf8 => Reason::PathNotUtf8,
            _ => Reason::InvalidPath,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "authz.allowed",
            Reason::DefaultAllAuthenticated => "default.all_authenticated",
            Reason::InvalidPath => "request.invalid_path",
            Reason::PathParameter => "request.path_parameter",
            Reason::PathNotUtf8 => "request.path_not_utf8",
            Reason::IpFilter => "ipfilter.denied",
            Reason::MtlsRequired => "mtls.required",
            Reason::AuthenticationFailed => "authn.failed",
            Reason::DenyRule => "authz.deny_rule",
            Reason::NoAllowMatch => "authz.no_allow_match",
            Reason::DefaultDeny => "default.deny",
            Reason::Unauthenticated => "authn.required",
            Reason::Sunset => "deprecation.sunset",
            Reason::RateLimited => "ratelimit.exceeded",
            Reason::UnsupportedMediaType => "validation.content_type",
            Reason::BodyTooLarge => "validation.body_too_large",
        }
    }
}

/// The outcome of one evaluation layer (enforced, or shadow for audit mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict<'e> {
    pub allowed: bool,
    /// HTTP status the agent sends: 200 when allowed.
    pub status: u16,
    pub reason: Reason,
    /// The rule (or limit, filter, route) that decided; `None` for defaults
    /// and malformed requests.
    pub rule: Option<&'e str>,
}

impl<'e> Verdict<'e> {
    pub(crate) fn allow(reason: Reason, rule: Option<&'e str>) -> Self {
        Self {
            allowed: true,
            status: 200,
            reason,
            rule,
        }
    }
    pub(crate) fn deny(status: u16, reason: Reason, rule: Option<&'e str>) -> Self {
        Self {
            allowed: false,
            status,
            reason,
            rule,
        }
    }
}

/// The state of the most constrained local rate limit a request passed or hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitReport<'e> {
    pub limit_id: &'e str,
    pub outcome: RateLimitOutcome,
}

/// Everything the agent needs to act on a request.
#[derive(Debug)]
pub struct Decision<'e, 'r> {
    /// What is enforced.
    pub verdict: Verdict<'e>,
    /// What the policy set including `mode: audit` policies would have done;
    /// present only when audit-mode policies select this workload.
    pub shadow: Option<Verdict<'e>>,
    /// The path the app receives; `None` when the path was invalid.
    pub normalized_path: Option<Cow<'r, str>>,
    pub query: Option<&'r str>,
    /// The most specific matching route.
    pub route: Option<&'e str>,
    /// The client address after trusted `X-Forwarded-For` hops.
    pub client_ip: IpAddr,
    pub rate_limit: Option<RateLimitReport<'e>>,
    /// `scope: global` limits the agent must still check in the shared store.
    pub global_limits: Vec<&'e super::CompiledRateLimit>,
    /// Headers to add to the response (`Deprecation`, `Sunset`, `Link`).
    pub response_headers: Vec<(&'static str, String)>,
    /// Body checks the agent applies while reading the request body.
    pub body: Option<&'e super::BodyRules>,
    /// Redaction and masking for a JSON response.
    pub response_mask: Option<&'e crate::masking::ResponseMask>,
}

impl Decision<'_, '_> {
    pub fn allowed(&self) -> bool {
        self.verdict.allowed
    }
}
