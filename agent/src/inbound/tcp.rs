//! Opaque TCP (DESIGN §6): after mTLS, authorize the peer identity for the
//! port, then copy bytes both ways between the client and the app.
//!
//! There is no request, so the policy engine's per-request `decide` does not
//! apply; the connection is admitted when **all** of these hold:
//!
//! 1. a policy is loaded (fail closed otherwise);
//! 2. the peer presented a verified mesh identity: opaque traffic carries
//!    nothing else to authorize, so plaintext is refused even on a
//!    `permissive` port;
//! 3. no enforced IP filter that applies to the port refuses the peer's
//!    address (the peer's own address: there is no `X-Forwarded-For`);
//! 4. the mesh default admits authenticated peers (`all-authenticated`; a
//!    `deny` default refuses every opaque connection);
//! 5. the *identity-level* rules of the port's catch-all routes: a route
//!    (not `auditOnly`) that applies to the port and matches every request
//!    (no path or path prefix `/`, no methods, headers or hosts). A deny rule
//!    of such a route that names the peer (principals and/or namespaces, and
//!    nothing else) refuses it; if such a route has allow rules, the peer
//!    must match one that uses principals/namespaces only (rules that need a
//!    request — roles, claims, API keys, conditions, source CIDRs — cannot
//!    match, so they never admit: fail closed).
//!
//! Audit-only policies are not evaluated for opaque connections.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use palisade_policy::identity::{SpiffeId, principal_matches};
use palisade_policy::wire;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{ConnInfo, Shared};

/// Why an opaque connection was refused (for the log; the peer just sees the
/// connection close).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpaqueDenied {
    #[error("no policy loaded")]
    NoPolicy,
    #[error("no verified peer identity")]
    NoIdentity,
    #[error("refused by an IP filter")]
    IpFilter,
    #[error("the mesh default denies")]
    DefaultDeny,
    #[error("refused by an identity rule")]
    Rule,
}

impl OpaqueDenied {
    /// The stable reason code of the audit record.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoPolicy => "policy.none",
            Self::NoIdentity => "opaque.no_identity",
            Self::IpFilter => "opaque.ip_filter",
            Self::DefaultDeny => "opaque.default_deny",
            Self::Rule => "opaque.rule",
        }
    }
}

/// The audit record of one opaque connection (DESIGN §7: every decision).
fn audit(
    policy: Option<&crate::inbound::LoadedPolicy>,
    info: &ConnInfo,
    allowed: bool,
    reason: &str,
    started: std::time::Instant,
) {
    let connection_id = crate::pipeline::request_id::generate();
    let (workload, version, sample) = policy.map_or(("", "", 0), |p| {
        let wp = p.engine.policy();
        (
            wp.workload.as_str(),
            p.engine.version(),
            wp.audit.as_ref().map_or(0, |a| a.sample_percent),
        )
    });
    crate::audit::AuditEvent {
        request_id: connection_id.to_str().unwrap_or_default(),
        source_identity: info.peer.as_ref().map(|(id, _)| id.as_str()),
        source_ip: Some(info.peer_addr),
        destination_workload: workload,
        policy_version: version,
        method: "TCP",
        allowed,
        reason,
        latency: started.elapsed(),
        ..Default::default()
    }
    .record(sample);
}

/// The identity-level decision for an opaque connection on `port`.
pub fn authorize(
    policy: Option<&wire::WorkloadPolicy>,
    port: u16,
    peer_addr: IpAddr,
    peer: Option<&SpiffeId>,
) -> Result<(), OpaqueDenied> {
    let policy = policy.ok_or(OpaqueDenied::NoPolicy)?;
    let peer = peer.ok_or(OpaqueDenied::NoIdentity)?;
    let port32 = u32::from(port);
    for f in policy.ip_filters.iter().filter(|f| !f.audit_only) {
        if !f.ports.is_empty() && !f.ports.contains(&port32) {
            continue;
        }
        let within = |nets: &[String]| nets.iter().any(|n| cidr_contains(n, peer_addr));
        if within(&f.deny) || (!f.allow.is_empty() && !within(&f.allow)) {
            return Err(OpaqueDenied::IpFilter);
        }
    }
    if wire::DefaultAction::try_from(policy.default_action) == Ok(wire::DefaultAction::Deny) {
        return Err(OpaqueDenied::DefaultDeny);
    }
    for route in policy
        .routes
        .iter()
        .filter(|r| !r.audit_only && is_catch_all(r, port32))
    {
        if route
            .deny
            .iter()
            .any(|rule| identity_rule_matches(rule, peer))
        {
            return Err(OpaqueDenied::Rule);
        }
        if !route.allow.is_empty()
            && !route
                .allow
                .iter()
                .any(|rule| identity_rule_matches(rule, peer))
        {
            return Err(OpaqueDenied::Rule);
        }
    }
    Ok(())
}

/// A CIDR (or a bare address) containing `ip`; the engine refused to load
/// policies with invalid ones, so a parse failure simply does not match.
fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    match IpNet::from_str(cidr) {
        Ok(net) => net.contains(&ip),
        Err(_) => IpAddr::from_str(cidr).is_ok_and(|a| a == ip),
    }
}

fn is_catch_all(route: &wire::Route, port: u32) -> bool {
    let every_path = match route.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => true,
        Some(wire::path_match::Kind::Prefix(p)) => p.is_empty() || p == "/",
        Some(_) => false,
    };
    every_path
        && (route.ports.is_empty() || route.ports.contains(&port))
        && route.methods.is_empty()
        && route.headers.is_empty()
        && route.hosts.is_empty()
}

/// A rule that can be judged on the identity alone, and names the peer.
fn identity_rule_matches(rule: &wire::Rule, peer: &SpiffeId) -> bool {
    let identity_only = rule.roles.is_empty()
        && rule.api_key_clients.is_empty()
        && rule.claims.is_empty()
        && rule.source_cidrs.is_empty()
        && rule.conditions.is_empty();
    identity_only
        && (rule.principals.is_empty()
            || rule
                .principals
                .iter()
                .any(|p| principal_matches(p, peer.as_str())))
        && (rule.namespaces.is_empty() || rule.namespaces.iter().any(|n| n == peer.namespace()))
}

/// Authorizes and proxies one opaque connection until either side closes.
pub(crate) async fn proxy<IO>(shared: Arc<Shared>, mut client: IO, info: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = std::time::Instant::now();
    let policy = shared.config.policy.current();
    let peer = info.peer.as_ref().map(|(id, _)| id);
    if let Err(why) = authorize(
        policy.as_ref().map(|p| p.engine.policy()),
        info.app.port(),
        info.peer_addr,
        peer,
    ) {
        tracing::info!(
            peer = %info.peer_addr,
            identity = peer.map(SpiffeId::as_str),
            port = info.app.port(),
            reason = %why,
            "opaque connection refused"
        );
        audit(policy.as_deref(), &info, false, why.code(), started);
        return;
    }
    let connect = TcpStream::connect(info.app);
    let connected = tokio::time::timeout(shared.config.app_connect_timeout, connect)
        .await
        .map_err(|_| "connecting timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let mut app = match connected {
        Ok(app) => app,
        Err(error) => {
            tracing::warn!(app = %info.app, %error, "app unreachable (opaque)");
            let reason = "upstream.unreachable";
            audit(policy.as_deref(), &info, false, reason, started);
            return;
        }
    };
    let _ = app.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut app).await {
        Ok((up, down)) => tracing::debug!(up, down, "opaque connection closed"),
        Err(e) => tracing::debug!(error = %e, "opaque connection ended with an error"),
    }
    audit(policy.as_deref(), &info, true, "opaque.allowed", started);
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

    fn policy() -> wire::WorkloadPolicy {
        wire::WorkloadPolicy {
            default_action: wire::DefaultAction::AllAuthenticated as i32,
            ..Default::default()
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn ip() -> IpAddr {
        "10.0.0.1".parse().unwrap()
    }

    #[test]
    fn needs_a_policy_and_an_identity() {
        assert_eq!(
            authorize(None, 5432, ip(), Some(&id(WEB))),
            Err(OpaqueDenied::NoPolicy)
        );
        assert_eq!(
            authorize(Some(&policy()), 5432, ip(), None),
            Err(OpaqueDenied::NoIdentity)
        );
        assert_eq!(
            authorize(Some(&policy()), 5432, ip(), Some(&id(WEB))),
            Ok(())
        );
        let mut deny = policy();
        deny.default_action = wire::DefaultAction::Deny as i32;
        assert_eq!(
            authorize(Some(&deny), 5432, ip(), Some(&id(WEB))),
            Err(OpaqueDenied::DefaultDeny)
        );
    }

    #[test]
    fn ip_filters_and_catch_all_identity_rules_apply() {
        let mut p = policy();
        p.ip_filters.push(wire::IpFilter {
            id: "f".into(),
            deny: vec!["10.0.0.0/8".into()],
            ports: vec![5432],
            ..Default::default()
        });
        assert_eq!(
            authorize(Some(&p), 5432, ip(), Some(&id(WEB))),
            Err(OpaqueDenied::IpFilter)
        );
        assert_eq!(authorize(Some(&p), 6379, ip(), Some(&id(WEB))), Ok(()));

        let mut p = policy();
        p.routes.push(wire::Route {
            id: "all".into(),
            deny: vec![wire::Rule {
                principals: vec![WEB.into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(
            authorize(Some(&p), 5432, ip(), Some(&id(WEB))),
            Err(OpaqueDenied::Rule)
        );
        assert_eq!(authorize(Some(&p), 5432, ip(), Some(&id(API))), Ok(()));

        // Allow rules: only identity-level ones can admit.
        p.routes[0].deny.clear();
        p.routes[0].allow = vec![
            wire::Rule {
                namespaces: vec!["shop".into()],
                claims: vec![wire::ClaimMatch::default()],
                ..Default::default()
            },
            wire::Rule {
                principals: vec![API.into()],
                ..Default::default()
            },
        ];
        assert_eq!(
            authorize(Some(&p), 5432, ip(), Some(&id(WEB))),
            Err(OpaqueDenied::Rule)
        );
        assert_eq!(authorize(Some(&p), 5432, ip(), Some(&id(API))), Ok(()));

        // A route on a path is not about opaque connections.
        p.routes[0].path = Some(wire::PathMatch {
            kind: Some(wire::path_match::Kind::Prefix("/admin".into())),
        });
        assert_eq!(authorize(Some(&p), 5432, ip(), Some(&id(WEB))), Ok(()));
    }
}
