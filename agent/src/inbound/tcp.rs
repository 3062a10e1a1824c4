//! Opaque TCP (DESIGN §6): after mTLS, the policy engine authorizes the
//! connection (`PolicyEngine::authorize_connection`: IP filter, a verified
//! identity, the identity-level rules of the port's catch-all routes, the
//! mesh default), then bytes are copied both ways until either side closes,
//! or until a new policy no longer allows the peer ([`super::tunnel`]).
//!
//! A port is served this way only when the policy (or `--opaque-ports`, for
//! a port the policy says nothing about) declares it `tcp` and no enforced
//! route gives it HTTP rules; see [`super::serves_opaque`].

use std::sync::Arc;
use std::time::Instant;

use palisade_policy::engine::{Connection, ConnectionDecision};
use palisade_policy::identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::tunnel::{self, Revocation, TunnelEnd};
use super::{ConnInfo, LoadedPolicy, Shared};
use crate::audit::AuditEvent;

/// Reason codes of opaque connections beyond the engine's.
pub mod reason {
    pub const NO_POLICY: &str = "policy.none";
    pub const APP_UNREACHABLE: &str = "upstream.unreachable";
}

/// The audit event of an opaque connection (method `TCP`).
fn audit(
    shared: &Shared,
    policy: Option<&LoadedPolicy>,
    info: &ConnInfo,
    connection_id: &str,
    decision: (bool, u16, &str, Option<&str>),
    shadow_reason: Option<&'static str>,
    started: Instant,
) {
    let (allowed, status, reason, rule) = decision;
    let engine = policy.map(|p| &p.engine);
    AuditEvent {
        request_id: connection_id,
        source_identity: info.peer.as_ref().map(SpiffeId::as_str),
        source_ip: Some(info.peer_addr),
        destination_port: info.app.port(),
        method: "TCP",
        allowed,
        reason,
        rule,
        status,
        latency: started.elapsed(),
        shadow_reason,
        ..AuditEvent::under(engine)
    }
    .record(&shared.config.audit, engine);
}

fn connection<'a>(info: &'a ConnInfo) -> Connection<'a> {
    Connection {
        port: info.app.port(),
        peer_addr: info.peer_addr,
        peer: info.peer.as_ref(),
    }
}

/// Authorizes and proxies one opaque connection until either side closes.
pub(crate) async fn proxy<IO>(shared: Arc<Shared>, client: IO, info: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let connection_id = crate::pipeline::request_id::generate();
    let connection_id = connection_id.to_str().unwrap_or_default();
    // Subscribed first: a version replacing this one re-checks the tunnel.
    let updates = shared.config.policy.subscribe();
    let policy = shared.config.policy.current();
    let peer = info.peer.as_ref();
    let refused = |reason: &str| {
        tracing::info!(
            peer = %info.peer_addr,
            identity = peer.map(SpiffeId::as_str),
            port = info.app.port(),
            reason,
            "opaque connection refused"
        );
    };
    let Some(loaded) = policy.as_deref() else {
        refused(reason::NO_POLICY);
        audit(
            &shared,
            None,
            &info,
            connection_id,
            (false, 403, reason::NO_POLICY, None),
            None,
            started,
        );
        return;
    };
    let ConnectionDecision { verdict, shadow } =
        loaded.engine.authorize_connection(&connection(&info));
    let shadow_reason = shadow
        .filter(|s| s.allowed != verdict.allowed)
        .map(|s| s.reason.as_str());
    let decided = (
        verdict.allowed,
        verdict.status,
        verdict.reason.as_str(),
        verdict.rule,
    );
    if !verdict.allowed {
        refused(verdict.reason.as_str());
        audit(
            &shared,
            policy.as_deref(),
            &info,
            connection_id,
            decided,
            shadow_reason,
            started,
        );
        return;
    }
    let connect = TcpStream::connect(info.app);
    let connected = tokio::time::timeout(shared.config.app_connect_timeout, connect)
        .await
        .map_err(|_| "connecting timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let app = match connected {
        Ok(app) => app,
        Err(error) => {
            tracing::warn!(app = %info.app, %error, "app unreachable (opaque)");
            let unreachable = (false, 502, reason::APP_UNREACHABLE, None);
            audit(
                &shared,
                policy.as_deref(),
                &info,
                connection_id,
                unreachable,
                None,
                started,
            );
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let conn = connection(&info);
    let end = tunnel::run(client, app, updates, |p: Arc<LoadedPolicy>| async move {
        let d = p.engine.authorize_connection(&conn);
        if d.verdict.allowed {
            Ok(())
        } else {
            Err(Revocation::of(&d.verdict))
        }
    })
    .await;
    match end {
        TunnelEnd::Closed(Ok((up, down))) => tracing::debug!(up, down, "opaque connection closed"),
        TunnelEnd::Closed(Err(e)) => {
            tracing::debug!(error = %e, "opaque connection ended with an error")
        }
        TunnelEnd::Revoked(revoked, new_policy) => {
            refused(revoked.reason);
            let why = (
                false,
                revoked.status,
                super::request::reason::TUNNEL_REVOKED,
                revoked.rule.as_deref(),
            );
            audit(
                &shared,
                Some(&new_policy),
                &info,
                connection_id,
                why,
                None,
                started,
            );
            return;
        }
    }
    audit(
        &shared,
        policy.as_deref(),
        &info,
        connection_id,
        decided,
        shadow_reason,
        started,
    );
}
