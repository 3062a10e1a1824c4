//! Step 4, authorize: the policy engine's decision (IP filter, identity, path
//! normalization, deny and allow rules, sunset, local rate limits and the
//! media type), and [`AdmittedRequest`], which asks the engine again for a
//! tunnel the request opened whenever a new policy arrives.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use http::header::HOST;
use palisade_policy::engine::{BodyRules, CompiledRateLimit};
use palisade_policy::identity::SpiffeId;
use palisade_policy::masking::ResponseMask;
use palisade_policy::ratelimit::RateLimitOutcome;
use palisade_policy::{Request as EngineRequest, RequestTime};

use super::authenticate::{Credentials, authenticate};
use super::{Exchange, Refusal, reason, unix_seconds};
use crate::audit::{AuditEvent, AuditSink, RateLimitSeen};
use crate::inbound::LoadedPolicy;
use crate::inbound::tunnel::Revocation;
use crate::pipeline::response_headers::apply_response_headers;
use crate::ratelimit::headers::insert_rate_limit_headers;

/// What the engine decided for an admitted request, owned where the request
/// is changed afterwards, borrowed from the policy otherwise.
pub(crate) struct Outcome<'p> {
    /// The untouched query (the normalized path is the exchange's).
    pub query: Option<String>,
    /// The absolute-form target's or HTTP/2's authority: the host.
    pub authority: Option<String>,
    pub rate_limit: Option<RateLimitOutcome>,
    /// `scope: global` limits that matched, with this request's key.
    pub global: Vec<(&'p CompiledRateLimit, Vec<u8>)>,
    pub response_headers: Vec<(&'static str, String)>,
    /// Body rules for the validate step (`None`: the body streams through).
    pub body: Option<&'p BodyRules>,
    /// Redaction and masking for the mask step.
    pub response_mask: Option<&'p ResponseMask>,
}

fn engine_time(started: Instant) -> RequestTime {
    RequestTime {
        unix_seconds: unix_seconds(),
        monotonic: started.elapsed(),
    }
}

pub(super) fn authorize<'a>(
    ex: &mut Exchange<'a>,
    policy: &'a LoadedPolicy,
    head: &http::request::Parts,
    credentials: &Credentials<'a>,
    has_body: bool,
) -> Result<Outcome<'a>, Refusal<'a>> {
    let authority = head.uri.authority().map(|a| a.as_str().to_owned());
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // The shape step made sure a Host header agrees with the authority.
    let host = match head.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => head.headers.get(HOST).and_then(|h| h.to_str().ok()),
    };
    let request = EngineRequest {
        method: &head.method,
        target,
        host,
        headers: &head.headers,
        port: ex.conn.app.port(),
        peer_addr: ex.conn.peer_addr,
        peer: ex.conn.peer.as_ref(),
        jwt_claims: credentials.claims.as_deref(),
        api_key_client: credentials.api_key_client,
        credential_error: credentials.error,
        has_body,
        time: engine_time(ex.shared.started),
    };
    let mut d = policy.engine.decide(&request);
    ex.route = d.route;
    ex.rule = d.verdict.rule;
    ex.path = d.normalized_path.as_deref().map(str::to_owned);
    ex.shadow_reason = d
        .shadow
        .filter(|s| s.allowed != d.verdict.allowed)
        .map(|s| s.reason.as_str());
    ex.rate_limit = d.rate_limit.map(|r| RateLimitSeen {
        limit_id: r.limit_id,
        limit: r.outcome.limit,
        remaining: r.outcome.remaining,
        reset_after: r.outcome.reset_after,
    });
    if !d.verdict.allowed {
        let mut refusal = Refusal::new(d.verdict.status, d.verdict.reason.as_str())
            .rule(d.verdict.rule)
            .challenge(policy.accepts_jwt());
        if d.verdict.status == 429
            && let Some(rl) = &d.rate_limit
        {
            insert_rate_limit_headers(refusal.headers_mut(), &rl.outcome);
        }
        apply_response_headers(
            refusal.headers_mut(),
            std::mem::take(&mut d.response_headers),
        );
        return Err(refusal);
    }
    ex.allowed_reason = d.verdict.reason.as_str();
    if ex.path.is_none() {
        // An allowed request always has a normalized path; fail closed.
        return Err(Refusal::new(400, "request.invalid_path"));
    }
    let mut key_buf = [0u8; 16];
    let global = d
        .global_limits
        .iter()
        .map(|l| {
            (
                *l,
                l.key_bytes(&request, d.client_ip, &mut key_buf).to_vec(),
            )
        })
        .collect();
    Ok(Outcome {
        query: d.query.map(str::to_owned),
        authority,
        rate_limit: d.rate_limit.map(|r| r.outcome),
        global,
        response_headers: std::mem::take(&mut d.response_headers),
        body: d.body,
        response_mask: d.response_mask,
    })
}

/// A request that opened a tunnel (an upgrade), kept to ask the policy
/// again: its headers (credentials included), target and connection.
pub(crate) struct AdmittedRequest {
    method: http::Method,
    target: String,
    host: Option<String>,
    headers: HeaderMap,
    port: u16,
    peer_addr: IpAddr,
    peer: Option<SpiffeId>,
    request_id: String,
    path: Option<String>,
    /// The proxy's clock origin (rate-limit time base).
    started: Instant,
    /// Where the revocation's audit event goes.
    audit: AuditSink,
}

impl AdmittedRequest {
    pub(super) fn new(
        ex: &Exchange<'_>,
        req: &http::Request<super::ProxyBody>,
        host: Option<&str>,
    ) -> Self {
        Self {
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
            host: host.map(str::to_owned),
            headers: req.headers().clone(),
            port: ex.conn.app.port(),
            peer_addr: ex.conn.peer_addr,
            peer: ex.conn.peer.as_ref().cloned(),
            request_id: ex.request_id().to_owned(),
            path: ex.path.clone(),
            started: ex.shared.started,
            audit: ex.shared.config.audit.clone(),
        }
    }

    /// Whether `policy` still admits the request: its credentials verified
    /// anew, then the engine's authorization (no rate limit is charged).
    pub(crate) async fn still_allowed(&self, policy: Arc<LoadedPolicy>) -> Result<(), Revocation> {
        let credentials = authenticate(&policy, &self.headers).await;
        let request = EngineRequest {
            method: &self.method,
            target: &self.target,
            host: self.host.as_deref(),
            headers: &self.headers,
            port: self.port,
            peer_addr: self.peer_addr,
            peer: self.peer.as_ref(),
            jwt_claims: credentials.claims.as_deref(),
            api_key_client: credentials.api_key_client,
            credential_error: credentials.error,
            has_body: false,
            time: engine_time(self.started),
        };
        let verdict = policy.engine.reauthorize(&request);
        if verdict.allowed {
            Ok(())
        } else {
            Err(Revocation::of(&verdict))
        }
    }

    /// Logs and audits a tunnel closed because `policy` no longer admits it.
    pub(crate) fn revoked(&self, revoked: &Revocation, policy: &LoadedPolicy) {
        tracing::info!(
            request_id = self.request_id,
            identity = self.peer.as_ref().map(SpiffeId::as_str),
            reason = revoked.reason,
            "upgraded connection closed: the new policy no longer allows it"
        );
        let engine = Some(&policy.engine);
        AuditEvent {
            request_id: &self.request_id,
            source_identity: self.peer.as_ref().map(SpiffeId::as_str),
            source_ip: Some(self.peer_addr),
            destination_port: self.port,
            method: self.method.as_str(),
            path: self.path.as_deref(),
            allowed: false,
            reason: reason::TUNNEL_REVOKED,
            rule: revoked.rule.as_deref(),
            status: revoked.status,
            ..AuditEvent::under(engine)
        }
        .record(&self.audit, engine);
    }
}
