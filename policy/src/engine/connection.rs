//! Authorization of an opaque TCP connection: the same IP filters, mesh
//! default and rules as a request, restricted to what a connection carries
//! (a verified peer identity and an address). A port is opaque only when
//! every enforced rule that applies to it is identity-level
//! (`PolicyEngine::port_protocol`), so nothing a request would be checked
//! against is skipped.

use std::net::IpAddr;

use palisade_proto::policy::v1 as pb;

use super::authz::Polarity;
use super::request::{Reason, Verdict};
use super::{Layer, PolicyEngine};
use crate::identity::SpiffeId;

/// An accepted connection, as the agent knows it after the TLS handshake.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The application port.
    pub port: u16,
    /// The TCP peer's address (there is no `X-Forwarded-For`).
    pub peer_addr: IpAddr,
    /// The verified mTLS identity; `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
}

/// The enforced verdict, and what audit-mode policies would have decided
/// when any select the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionDecision<'e> {
    pub verdict: Verdict<'e>,
    pub shadow: Option<Verdict<'e>>,
}

impl PolicyEngine {
    /// Decides an opaque connection: IP filter → a verified identity →
    /// deny rules of the port's catch-all routes → the allow rules of the
    /// most specific one that has any, else the mesh default.
    pub fn authorize_connection(&self, conn: &Connection<'_>) -> ConnectionDecision<'_> {
        let verdict = self.connection_layer(conn, Layer::Enforced);
        let shadow = self
            .has_audit_layer
            .then(|| self.connection_layer(conn, Layer::WithAudit));
        ConnectionDecision { verdict, shadow }
    }

    fn connection_layer(&self, conn: &Connection<'_>, layer: Layer) -> Verdict<'_> {
        if let Some(v) = self.ip_filter(conn.port, conn.peer_addr, layer) {
            return v;
        }
        // Opaque bytes carry no other credential: plaintext is refused even
        // on a permissive port.
        let Some(peer) = conn.peer else {
            return Verdict::deny(401, Reason::MtlsRequired, None);
        };
        let matched = self.routes.matching_connection(conn.port);
        let routes = || {
            matched
                .iter()
                .map(|m| self.routes.get(m.slot))
                .filter(|r| layer.includes(r.audit_only))
        };
        for route in routes() {
            if let Some(rule) = route.deny.iter().find(|rule| {
                rule.matches_connection(Some(peer), conn.peer_addr, &self.roles, Polarity::Deny)
            }) {
                return Verdict::deny(403, Reason::DenyRule, Some(&*rule.id));
            }
        }
        if self
            .routes
            .has_allow_rules(conn.port, layer == Layer::WithAudit)
        {
            let Some(route) = routes().find(|r| !r.allow.is_empty()) else {
                return Verdict::deny(403, Reason::NoAllowMatch, None);
            };
            return match route.allow.iter().find(|rule| {
                rule.matches_connection(Some(peer), conn.peer_addr, &self.roles, Polarity::Allow)
            }) {
                Some(rule) => Verdict::allow(Reason::Allowed, Some(&*rule.id)),
                None => Verdict::deny(403, Reason::NoAllowMatch, Some(&*route.id)),
            };
        }
        match self.default_action {
            pb::DefaultAction::Deny => Verdict::deny(403, Reason::DefaultDeny, None),
            _ => Verdict::allow(Reason::DefaultAllAuthenticated, None),
        }
    }
}
