//! Step 7, forward: the request as policy judged it goes to the app, over the
//! pooled connections of `inbound::forward`.
//!
//! What the app receives: the normalized path with the original query;
//! `Host` set to the authority when the target was in absolute form (RFC
//! 9112 §3.2.2: the authority is the host); `x-forwarded-client-cert` from
//! the verified peer certificate only; `X-Forwarded-For` from the
//! connection's peer unless it is a trusted hop; no verified API key. An
//! upgrade answered 101 becomes a tunnel that each new policy re-authorizes.

use http::header::{HOST, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;

use super::authorize::{AdmittedRequest, Outcome};
use super::{BoxError, Exchange, ProxyBody, Refusal, reason};
use crate::inbound::LoadedPolicy;
use crate::inbound::body::{self, LimitSignal};
use crate::pipeline::forwarded::set_forwarded_for;
use crate::pipeline::response_headers::apply_response_headers;
use crate::pipeline::strip::X_FORWARDED_CLIENT_CERT;
use crate::ratelimit::GlobalOutcome;
use crate::ratelimit::headers::{insert_global_headers, insert_rate_limit_headers};

pub(super) async fn forward<'a>(
    ex: &mut Exchange<'a>,
    policy: &'a LoadedPolicy,
    outcome: &Outcome<'a>,
    mut req: Request<ProxyBody>,
    limit: Option<LimitSignal>,
) -> Result<Response<ProxyBody>, Refusal<'a>> {
    let host = outcome
        .authority
        .as_deref()
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
    // What re-authorizing an upgrade's tunnel needs, before any rewrite.
    let admitted = ex
        .updates
        .is_some()
        .then(|| AdmittedRequest::new(ex, &req, host));

    let path = ex.path.as_deref().unwrap_or("/");
    let pq = match &outcome.query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    };
    let Ok(pq) = pq else {
        return Err(Refusal::new(400, "request.invalid_path"));
    };
    *req.uri_mut() = Uri::from(pq);
    // The version stays the client's: the pool picks the app's protocol
    // from it (HTTP/2 → h2c unless the port says http1).
    if let Some(value) = outcome
        .authority
        .as_deref()
        .and_then(|a| HeaderValue::try_from(a).ok())
    {
        req.headers_mut().insert(HOST, value);
    }
    let conn = ex.conn;
    // Computed once per connection (`ConnInfo`).
    match &conn.xfcc {
        Some(xfcc) => {
            req.headers_mut()
                .insert(X_FORWARDED_CLIENT_CERT, xfcc.clone());
        }
        // Plaintext: no XFCC; strip removed any.
        None => {
            req.headers_mut().remove(X_FORWARDED_CLIENT_CERT);
        }
    }
    set_forwarded_for(
        req.headers_mut(),
        &conn.forwarded_for,
        policy.engine.is_trusted_proxy(conn.peer_addr),
    );
    // A verified API key has done its job; the app (and its logs) never see
    // the secret. The client id is in the audit record.
    if let Some(header) = policy.api_keys.as_ref().and_then(|k| k.header()) {
        req.headers_mut().remove(header);
    }

    let forwarded = match ex.shared.forward(conn, req).await {
        Ok(f) => f,
        // `maxBodyBytes` tripped while the body streamed, before the app
        // answered: the app saw an aborted request; the client gets 413.
        Err(e) if body::over_limit(&e, limit.as_ref()) => {
            tracing::debug!(request_id = ex.request_id(), error = %e, "request body over the limit");
            return Err(
                Refusal::new(413, body::reason::BODY_TOO_LARGE).rule(outcome.body.map(|b| &*b.id))
            );
        }
        Err(e) => {
            // The exit answers a client's own broken body as such.
            if !ex.client_failure.failed() {
                tracing::warn!(app = %conn.app, error = %e, "app unreachable");
            }
            return Err(Refusal::new(502, reason::APP_UNREACHABLE));
        }
    };
    if let (Some((client, app)), Some(admitted), Some(updates)) =
        (forwarded.upgrade, admitted, ex.updates.take())
    {
        crate::inbound::upgrade::join(client, app, updates, admitted);
    }
    Ok(forwarded
        .response
        .map(|b| b.map_err(BoxError::from).boxed()))
}

/// The decision's headers on the app's response: rate-limit state,
/// `Deprecation` / `Sunset` / `Link`; hop-by-hop fields removed.
pub(super) fn response_headers(
    resp: &mut Response<ProxyBody>,
    outcome: &mut Outcome<'_>,
    global: Option<&GlobalOutcome>,
) {
    crate::inbound::forward::strip_hop_by_hop(resp.headers_mut());
    if let Some(rl) = &outcome.rate_limit {
        insert_rate_limit_headers(resp.headers_mut(), rl);
    }
    if let Some(g) = global {
        insert_global_headers(resp.headers_mut(), g);
    }
    apply_response_headers(
        resp.headers_mut(),
        std::mem::take(&mut outcome.response_headers),
    );
}
