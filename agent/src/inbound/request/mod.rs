//! The per-request pipeline of the inbound proxy (DESIGN §4, §6), one
//! function per step, in order:
//!
//! 1. [`admit`]: the cap on requests in flight (503 beyond it);
//! 2. [`shape`]: strip spoofable and hop-by-hop headers, the request id,
//!    then refuse what is ambiguous (400) or too long (414);
//! 3. [`authenticate`]: JWT and API key;
//! 4. [`authorize`]: the policy engine (IP filter, identity, path
//!    normalization, deny and allow rules, sunset, local rate limits, the
//!    media type);
//! 5. [`rate_limit`]: `scope: global` limits in the shared store;
//! 6. [`validate`]: body rules that need the body (streamed size, JSON Schema);
//! 7. [`forward`]: the normalized request to the app (XFCC, forwarding
//!    headers), and for an upgrade the tunnel that stays under policy;
//! 8. [`mask`]: redaction and masking of the response;
//! 9. the audit event.
//!
//! Each step returns `Result<_, Refusal>`. [`Exchange::refuse`] is the one
//! place a refusal becomes a response (the fixed deny body, gRPC-shaped for
//! gRPC, or a reset HTTP/2 stream when the client broke its own framing) and
//! an audit event; [`Exchange::admitted`] records an allowed one.

mod admit;
mod authenticate;
mod authorize;
mod forward;
mod mask;
mod rate_limit;
mod refusal;
mod shape;
mod validate;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use serde_json::Value;

pub(crate) use authorize::AdmittedRequest;
pub(crate) use refusal::Refusal;

use super::body::{ClientBody, ClientFailure};
use super::limits::HeadVerdict;
use super::policy::PolicyUpdates;
use super::{ConnInfo, LoadedPolicy, Shared};
use crate::audit::{self, AuditEvent, RateLimitSeen};
use crate::pipeline::deny::{Denied, deny_response, grpc_deny, is_grpc};
use crate::pipeline::request_id::ensure_request_id;
use crate::pipeline::strip::strip_inbound;

/// Any error a body may end with: the app's, the client's, or a limit the
/// agent enforces while streaming.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on: streamed from the
/// peer, or a fixed one.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Reason codes for decisions the agent makes itself (the engine's are
/// `palisade_policy::Reason::as_str`).
pub mod reason {
    pub const NO_POLICY: &str = "policy.none";
    /// A `Connection` header nominates a framing or routing field.
    pub const CONNECTION_NOMINATES_FRAMING: &str = "request.ambiguous";
    pub const TARGET_TOO_LONG: &str = "request.target_too_long";
    pub const IN_FLIGHT: &str = "overload.in_flight";
    pub const APP_UNREACHABLE: &str = "upstream.unreachable";
    /// The client broke its own body's framing (a bad chunk, a DATA length
    /// that contradicts `Content-Length`, a body cut off).
    pub const BODY_MALFORMED: &str = "request.body_malformed";
    pub const TUNNEL_REVOKED: &str = "tunnel.revoked";
}

pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The service's error: reset this HTTP/2 stream (hyper sends `RST_STREAM`
/// with the reason of the h2 error inside).
#[derive(Debug, thiserror::Error)]
#[error("resetting the stream: {0}")]
pub struct ResetStream(#[source] hyper::Error);

/// Most body an HTTP/2 refusal waits for, so that a DATA length which
/// contradicts `Content-Length` resets the stream before any answer, every
/// time, rather than racing the answer.
const REFUSAL_DRAIN_MAX: u64 = 64 * 1024;

/// What the pipeline knows about one request, filled in as the steps learn
/// it; the audit event is built from it.
pub(crate) struct Exchange<'a> {
    shared: &'a Shared,
    conn: &'a ConnInfo,
    policy: Option<&'a LoadedPolicy>,
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    version: Version,
    grpc: bool,
    /// An HTTP/1 `Upgrade` (or CONNECT) was asked for: unless it is switched,
    /// no further request is read from the connection.
    upgrade_asked: bool,
    traceparent: Option<HeaderValue>,
    claims: Option<Arc<Value>>,
    api_key_client: Option<&'a str>,
    route: Option<&'a str>,
    rule: Option<&'a str>,
    path: Option<String>,
    shadow_reason: Option<&'static str>,
    /// The engine's reason for admitting the request.
    allowed_reason: &'static str,
    rate_limit: Option<RateLimitSeen<'a>>,
    /// The client's body until a step takes it.
    body: Option<ClientBody>,
    client_failure: ClientFailure,
    /// For an upgrade: policy versions since the request arrived, so the
    /// tunnel is re-authorized on any that came after its admission.
    updates: Option<PolicyUpdates>,
}

/// Serves one request: the steps, then the exit.
pub(crate) async fn serve(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
    framing: HeadVerdict,
) -> Result<Response<ProxyBody>, ResetStream> {
    let started = Instant::now();
    let upgrade_asked = req.version() != Version::HTTP_2
        && (req.headers().contains_key(UPGRADE) || req.method() == Method::CONNECT);
    // Subscribed before the policy is read: a version that replaces it
    // while the request is on its way is seen by the tunnel.
    let updates = upgrade_asked.then(|| shared.config.policy.subscribe());
    let policy = shared.config.policy.current();
    let grpc = is_grpc(req.headers());
    let (mut head, body) = req.into_parts();
    // Strip before anything reads a header; its refusal comes in `shape`.
    let stripped = strip_inbound(&mut head.headers);
    let request_id = ensure_request_id(&mut head.headers, conn.peer.is_some());
    let (body, client_failure) = ClientBody::new(body);
    let mut ex = Exchange {
        shared,
        conn,
        policy: policy.as_deref(),
        started,
        request_id,
        method: head.method.clone(),
        version: head.version,
        grpc,
        upgrade_asked,
        traceparent: head.headers.get("traceparent").cloned(),
        claims: None,
        api_key_client: None,
        route: None,
        rule: None,
        path: None,
        shadow_reason: None,
        allowed_reason: "authz.allowed",
        rate_limit: None,
        body: Some(body),
        client_failure,
        updates,
    };
    let result = steps(&mut ex, head, stripped.is_ok(), framing).await;
    match result {
        Ok(resp) => Ok(ex.admitted(resp)),
        Err(refusal) => ex.refuse(refusal).await,
    }
}

/// The steps, in order (see the module docs).
async fn steps<'a>(
    ex: &mut Exchange<'a>,
    mut head: http::request::Parts,
    stripped_cleanly: bool,
    framing: HeadVerdict,
) -> Result<Response<ProxyBody>, Refusal<'a>> {
    let _in_flight = admit::admit(ex)?;
    shape::check(ex, &mut head, stripped_cleanly, framing)?;
    let policy = ex
        .policy
        .ok_or_else(|| Refusal::new(403, reason::NO_POLICY))?;
    let credentials = authenticate::authenticate(policy, &head.headers).await;
    ex.claims = credentials.claims.clone();
    ex.api_key_client = credentials.api_key_client;
    let has_body = ex.body.as_ref().is_some_and(|b| !b.is_end_stream());
    let mut outcome = authorize::authorize(ex, policy, &head, &credentials, has_body)?;
    let global = rate_limit::check(ex, policy, &mut outcome).await?;
    let body = ex
        .body
        .take()
        .ok_or_else(|| Refusal::new(400, reason::BODY_MALFORMED))?;
    let validated = validate::validate(outcome.body, Request::from_parts(head, body)).await?;
    let mut req = validated.request;
    let mask_plan = super::body::prepare_mask(outcome.response_mask, &mut req);
    let resp = forward::forward(ex, policy, &outcome, req, validated.limit).await?;
    let mut resp = mask::mask(mask_plan, resp).await?;
    forward::response_headers(&mut resp, &mut outcome, global.as_ref());
    Ok(resp)
}

impl<'a> Exchange<'a> {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    /// The audit event of this request so far (the one builder).
    fn audit_event(&self, allowed: bool, status: u16, reason: &'a str) -> AuditEvent<'_> {
        AuditEvent {
            request_id: self.request_id(),
            trace_id: audit::trace_id(self.traceparent.as_ref().and_then(|v| v.to_str().ok())),
            source_identity: self.conn.peer.as_ref().map(|id| id.as_str()),
            source_ip: Some(self.conn.peer_addr),
            destination_port: self.conn.app.port(),
            route: self.route,
            method: self.method.as_str(),
            path: self.path.as_deref(),
            allowed,
            reason,
            rule: self.rule,
            status,
            latency: self.started.elapsed(),
            rate_limit: self.rate_limit,
            jwt_subject: self
                .claims
                .as_deref()
                .and_then(|c| c.get("sub"))
                .and_then(Value::as_str),
            api_key_client: self.api_key_client,
            shadow_reason: self.shadow_reason,
            ..AuditEvent::under(self.policy.map(|p| &p.engine))
        }
    }

    /// An allowed request's response, with its audit event.
    fn admitted(&mut self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        // A client refused an upgrade may already be sending the new
        // protocol: read no further request from it.
        if self.upgrade_asked && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        self.audit_event(true, resp.status().as_u16(), self.allowed_reason)
            .record(&self.shared.config.audit, self.policy.map(|p| &p.engine));
        resp
    }

    /// The one exit for a refusal: the client's answer and the audit event.
    async fn refuse(&mut self, refusal: Refusal<'a>) -> Result<Response<ProxyBody>, ResetStream> {
        let mut refusal = refusal;
        if self.version == Version::HTTP_2 && !self.client_failure.failed() {
            self.drain_small_body().await;
        }
        // Whichever step noticed, a client that broke its own body's framing
        // gets that answer: never "app unreachable" or a policy answer.
        if self.client_failure.failed() {
            refusal = Refusal::new(400, reason::BODY_MALFORMED).close();
            self.rule = None;
        }
        if refusal.rule.is_some() {
            self.rule = refusal.rule;
        }
        self.audit_event(false, refusal.status, refusal.reason)
            .record(&self.shared.config.audit, self.policy.map(|p| &p.engine));
        tracing::debug!(
            request_id = self.request_id(),
            status = refusal.status,
            reason = refusal.reason,
            "request refused"
        );
        if self.version == Version::HTTP_2
            && let Some(error) = self.client_failure.take()
        {
            return Err(ResetStream(error));
        }
        let mut resp =
            deny_response(refusal.status, self.request_id(), refusal.www_authenticate).map(full);
        if let Some(extra) = refusal.take_headers() {
            resp.headers_mut().extend(*extra);
        }
        if self.grpc
            && let Some(denied) = resp.extensions_mut().remove::<Denied>()
        {
            grpc_deny(&mut resp, &denied);
            *resp.body_mut() = full(Bytes::new());
        }
        if refusal.close || self.upgrade_asked {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    /// Reads what is left of a small HTTP/2 body before answering, so that
    /// its framing is judged first.
    async fn drain_small_body(&mut self) {
        let Some(body) = self.body.as_mut() else {
            return;
        };
        let declared = body.size_hint().exact();
        if body.is_end_stream() || declared.is_none_or(|n| n > REFUSAL_DRAIN_MAX) {
            return;
        }
        let drain = async {
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(self.shared.config.limits.header_read_timeout, drain).await;
    }
}

/// Wall-clock seconds, for time-of-day conditions and sunsets.
pub(crate) fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
