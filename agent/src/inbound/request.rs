//! The per-request pipeline of the inbound proxy, in DESIGN §4 order:
//! strip → request id → authenticate → decide (IP filter, identity, path
//! normalization, authorization, local rate limits, header-level
//! validation) → global rate limits → forward → response headers → audit.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::{HOST, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use palisade_policy::engine::CompiledRateLimit;
use palisade_policy::ratelimit::RateLimitOutcome;
use palisade_policy::wire;
use palisade_policy::{Request as EngineRequest, RequestTime};

use super::body;
use super::forward::strip_hop_by_hop;
use super::{ConnInfo, LoadedPolicy, Shared};
use crate::audit::{self, AuditEvent};
use crate::pipeline::deny::deny_response;
use crate::pipeline::request_id::ensure_request_id;
use crate::pipeline::response_headers::apply_response_headers;
use crate::pipeline::strip::strip_inbound;
use crate::pipeline::xfcc::{PeerCert, set_xfcc};
use crate::ratelimit::GlobalOutcome;
use crate::ratelimit::headers::{insert_global_headers, insert_rate_limit_headers};

/// Any error a body may end with: the app's, or a limit the agent enforces
/// while streaming.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on: streamed from the
/// peer, or a fixed one.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Reason codes for decisions the engine does not make itself.
mod reason {
    pub const NO_POLICY: &str = "policy.none";
    pub const AMBIGUOUS: &str = "request.ambiguous";
    pub const APP_UNREACHABLE: &str = "upstream.unreachable";
}

pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn deny(status: u16, request_id: &str, www_authenticate: bool) -> Response<ProxyBody> {
    deny_response(status, request_id, www_authenticate).map(full)
}

/// What the engine decided, owned (but for what borrows the policy), so the
/// request can be changed and awaited on afterwards.
struct Outcome<'p> {
    allowed: bool,
    status: u16,
    reason: &'static str,
    rule: Option<&'p str>,
    route: Option<&'p str>,
    shadow_reason: Option<&'static str>,
    path: Option<String>,
    query: Option<String>,
    rate_limit: Option<RateLimitOutcome>,
    /// `scope: global` limits that matched, with this request's key.
    global: Vec<(&'p CompiledRateLimit, Vec<u8>)>,
    response_headers: Vec<(&'static str, String)>,
    /// Body rules for the validate step (`None`: the body streams through).
    body: Option<&'p palisade_policy::engine::BodyRules>,
    /// Redaction and masking for the mask step.
    response_mask: Option<&'p palisade_policy::masking::ResponseMask>,
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Everything known about a request for its audit event. Kept cheap to
/// fill (no allocation: refcounted or inline values), since most allowed
/// requests are never recorded.
struct Audit<'a> {
    started: Instant,
    request_id: &'a str,
    traceparent: Option<HeaderValue>,
    method: http::Method,
    source: Option<&'a str>,
    source_ip: std::net::IpAddr,
    claims: Option<std::sync::Arc<serde_json::Value>>,
    api_key_client: Option<String>,
}

impl Audit<'_> {
    fn record(
        &self,
        policy: Option<&LoadedPolicy>,
        outcome: Option<&Outcome<'_>>,
        allowed: bool,
        status: u16,
        reason: &str,
    ) {
        let (workload, version, sample) = policy.map_or(("", "", 0), |p| {
            let wp = p.engine.policy();
            (
                wp.workload.as_str(),
                p.engine.version(),
                wp.audit.as_ref().map_or(0, |a| a.sample_percent),
            )
        });
        if allowed && !audit::sampled(sample) {
            return;
        }
        AuditEvent {
            request_id: self.request_id,
            trace_id: audit::trace_id(self.traceparent.as_ref().and_then(|v| v.to_str().ok())),
            source_identity: self.source,
            source_ip: Some(self.source_ip),
            destination_workload: workload,
            policy_version: version,
            route: outcome.and_then(|o| o.route),
            method: self.method.as_str(),
            path: outcome.and_then(|o| o.path.as_deref()),
            allowed,
            reason,
            rule: outcome.and_then(|o| o.rule),
            status,
            latency: self.started.elapsed(),
            rate_limit: outcome
                .and_then(|o| o.rate_limit.as_ref())
                .map(|r| (r.remaining, r.limit)),
            jwt_subject: self
                .claims
                .as_deref()
                .and_then(|c| c.get("sub"))
                .and_then(|s| s.as_str()),
            api_key_client: self.api_key_client.as_deref(),
            shadow_reason: outcome.and_then(|o| o.shadow_reason),
        }
        .write();
    }
}

pub(crate) async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    // 1. strip, before anything reads a header.
    let stripped = strip_inbound(req.headers_mut());
    // 2. request id.
    let request_id = ensure_request_id(req.headers_mut(), conn.peer.is_some());
    let rid = request_id.to_str().unwrap_or_default();
    let mut audit = Audit {
        started,
        request_id: rid,
        traceparent: req.headers().get("traceparent").cloned(),
        method: req.method().clone(),
        source: conn.peer.as_ref().map(|(id, _)| id.as_str()),
        source_ip: conn.peer_addr,
        claims: None,
        api_key_client: None,
    };
    let Some(policy) = shared.config.policy.current() else {
        // No policy yet: fail closed.
        audit.record(None, None, false, 403, reason::NO_POLICY);
        return deny(403, rid, false);
    };
    if stripped.is_err() {
        audit.record(Some(&policy), None, false, 400, reason::AMBIGUOUS);
        return deny(400, rid, false);
    }
    let www = policy.accepts_jwt();

    // 3. authenticate.
    let mut credential_error: Option<&'static str> = None;
    let mut claims = None;
    if let Some(jwt) = &policy.jwt {
        match jwt.verify(req.headers()).await {
            Ok(v) => claims = Some(v.claims),
            Err(e) if e.is_missing() => {}
            Err(e) => credential_error = Some(e.code()),
        }
    }
    let mut api_key_client = None;
    if let Some(keys) = &policy.api_keys {
        match keys.verify(req.headers()) {
            Ok(client) => api_key_client = Some(client),
            Err(e) if e.is_missing() => {}
            Err(e) => {
                credential_error.get_or_insert(e.code());
            }
        }
    }
    audit.claims = claims.clone();
    audit.api_key_client = api_key_client.map(str::to_owned);

    // 4. decide (normalizes the path).
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let outcome = {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let host = match req.headers().get(HOST) {
            Some(h) => h.to_str().ok(),
            None => authority.as_deref(),
        };
        let request = EngineRequest {
            method: req.method(),
            target,
            host,
            headers: req.headers(),
            port: conn.app.port(),
            peer_addr: conn.peer_addr,
            peer: conn.peer.as_ref().map(|(id, _)| id),
            jwt_claims: claims.as_deref(),
            api_key_client,
            credential_error,
            time: RequestTime {
                unix_seconds: unix_seconds(),
                monotonic: shared.started.elapsed(),
            },
        };
        let mut d = policy.engine.decide(&request);
        let mut key_buf = [0u8; 16];
        let global = d
            .global_limits
            .iter()
            .map(|l| {
                let key = l.key_bytes(&request, d.client_ip, &mut key_buf).to_vec();
                (*l, key)
            })
            .collect();
        Outcome {
            allowed: d.verdict.allowed,
            status: d.verdict.status,
            reason: d.verdict.reason.as_str(),
            rule: d.verdict.rule,
            route: d.route,
            shadow_reason: d
                .shadow
                .filter(|s| s.allowed != d.verdict.allowed)
                .map(|s| s.reason.as_str()),
            path: d.normalized_path.as_deref().map(str::to_owned),
            query: d.query.map(str::to_owned),
            rate_limit: d.rate_limit.map(|r| r.outcome),
            global,
            response_headers: std::mem::take(&mut d.response_headers),
            body: d.body,
            response_mask: d.response_mask,
        }
    };
    let mut outcome = outcome;
    if !outcome.allowed {
        let mut resp = deny(outcome.status, rid, www);
        if outcome.status == 429
            && let Some(rl) = &outcome.rate_limit
        {
            insert_rate_limit_headers(resp.headers_mut(), rl);
        }
        apply_response_headers(
            resp.headers_mut(),
            std::mem::take(&mut outcome.response_headers),
        );
        audit.record(
            Some(&policy),
            Some(&outcome),
            false,
            outcome.status,
            outcome.reason,
        );
        return resp;
    }

    // 5. global rate limits: every matching one must admit.
    let mut global_admitted: Option<GlobalOutcome> = None;
    for (limit, key) in &outcome.global {
        let checked = match &shared.config.global_limits {
            Some(store) => {
                store
                    .check(limit, key, crate::ratelimit::global::unix_now_ms())
                    .await
            }
            // No store configured: the limit cannot be checked.
            None => GlobalOutcome::StoreUnavailable {
                allowed: limit.failure_mode == wire::rate_limit::FailureMode::Open,
            },
        };
        if !checked.allowed() {
            let mut resp = deny(429, rid, www);
            insert_global_headers(resp.headers_mut(), &checked);
            let why = checked.deny_reason().unwrap_or("ratelimit.exceeded");
            outcome.rule = Some(&limit.id);
            audit.record(Some(&policy), Some(&outcome), false, 429, why);
            return resp;
        }
        global_admitted = Some(checked);
    }

    // 5b. validate: the body rules `decide` cannot check from headers (a
    // streamed size, JSON Schema). Without rules the body is only boxed for
    // the forward step. The mask plan asks the app for what can be masked.
    let (mut req, body_limit) = match body::validate_request(outcome.body, req).await {
        Ok(v) => (v.request, v.limit),
        Err(refusal) => {
            // The message names a pointer and a keyword, never body values;
            // the client only gets the fixed deny body.
            tracing::debug!(request_id = rid, error = %refusal, "request body refused");
            let (status, why) = (refusal.status(), refusal.reason());
            audit.record(Some(&policy), Some(&outcome), false, status, why);
            return deny(status, rid, www);
        }
    };
    let mask_plan = body::prepare_mask(outcome.response_mask, &mut req);

    // 6. forward: the normalized path and the original query, XFCC.
    let Some(path) = outcome.path.clone() else {
        audit.record(Some(&policy), Some(&outcome), false, 400, reason::AMBIGUOUS);
        return deny(400, rid, false);
    };
    let target = match &outcome.query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(pq) = PathAndQuery::try_from(target) else {
        audit.record(Some(&policy), Some(&outcome), false, 400, reason::AMBIGUOUS);
        return deny(400, rid, false);
    };
    *req.uri_mut() = Uri::from(pq);
    // The version stays the client's: the forward step picks the app's
    // protocol from it (HTTP/2 → h2c unless the port says http1).
    if !req.headers().contains_key(HOST)
        && let Some(value) = authority.and_then(|a| HeaderValue::try_from(a).ok())
    {
        req.headers_mut().insert(HOST, value);
    }
    match (&conn.peer, shared.config.certs.current()) {
        (Some((id, der)), Some(local)) => set_xfcc(
            req.headers_mut(),
            local.spiffe_id(),
            Some(PeerCert {
                id,
                der: der.as_deref(),
            }),
        ),
        // Plaintext (or no local certificate): no XFCC; strip removed any.
        _ => {
            req.headers_mut()
                .remove(crate::pipeline::strip::X_FORWARDED_CLIENT_CERT);
        }
    }
    // A verified API key has done its job; the app (and its logs) never
    // see the secret. The client id is in the audit record.
    if let Some(header) = policy.api_keys.as_ref().and_then(|k| k.header()) {
        req.headers_mut().remove(header);
    }

    let mut resp = match shared.forward(conn, req).await {
        Ok(resp) => resp.map(|b| b.map_err(BoxError::from).boxed()),
        // The body's `maxBodyBytes` tripped while it streamed, before the
        // app answered: the app saw an aborted request; the client gets 413.
        Err(e) if body::over_limit(&e, body_limit.as_ref()) => {
            tracing::debug!(request_id = rid, error = %e, "request body over the limit");
            let why = body::reason::BODY_TOO_LARGE;
            audit.record(Some(&policy), Some(&outcome), false, 413, why);
            return deny(413, rid, www);
        }
        Err(e) => {
            tracing::warn!(app = %conn.app, error = %e, "app unreachable");
            audit.record(
                Some(&policy),
                Some(&outcome),
                false,
                502,
                reason::APP_UNREACHABLE,
            );
            return deny(502, rid, false);
        }
    };

    // 6b. mask: redact and mask a JSON response; one that cannot be
    // inspected is withheld (502), never passed on unmasked.
    if let Err(e) = body::mask_response(mask_plan, &mut resp).await {
        tracing::warn!(request_id = rid, error = %e, "response cannot be masked; withholding it");
        audit.record(Some(&policy), Some(&outcome), false, 502, e.reason());
        return deny(502, rid, false);
    }

    // 7. response headers.
    strip_hop_by_hop(resp.headers_mut());
    if let Some(rl) = &outcome.rate_limit {
        insert_rate_limit_headers(resp.headers_mut(), rl);
    }
    if let Some(g) = &global_admitted {
        insert_global_headers(resp.headers_mut(), g);
    }
    apply_response_headers(
        resp.headers_mut(),
        std::mem::take(&mut outcome.response_headers),
    );

    // 8. audit.
    let status = resp.status().as_u16();
    audit.record(Some(&policy), Some(&outcome), true, status, outcome.reason);
    resp
}
