//! Binds reported events to the peer that reported them (DESIGN §7): an
//! agent may only report decisions its own workload made, so one
//! compromised workload cannot forge or bury another's audit trail.
//!
//! The peer's identity is the SPIFFE ID of its verified client certificate.
//! An event is the peer's when its `reporter` is empty or the peer's ID
//! (what is stored as the reporter is always the peer's ID), and its
//! `destination_workload` (the workload the policy was compiled for) is in
//! the peer's namespace — a SPIFFE ID or a `namespace/name` — or empty. The
//! workload is bound by namespace only: a policy file compiled for
//! `…/sa/default` may be run by an agent of another service account of the
//! same namespace, but never reported by a workload of another namespace.

use palisade_policy::identity::SpiffeId;
use palisade_proto::audit::v1::AuditEvent;

/// Why an event is not the reporting peer's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("event {request_id:?} claims reporter {claimed} but the peer is {peer}")]
    Reporter {
        request_id: String,
        claimed: String,
        peer: String,
    },
    #[error("event {request_id:?} claims workload {claimed:?}, which is not the peer {peer}")]
    Workload {
        request_id: String,
        claimed: String,
        peer: String,
    },
}

impl Mismatch {
    /// The identity the event claimed.
    pub fn claimed(&self) -> &str {
        match self {
            Mismatch::Reporter { claimed, .. } | Mismatch::Workload { claimed, .. } => claimed,
        }
    }

    pub fn request_id(&self) -> &str {
        match self {
            Mismatch::Reporter { request_id, .. } | Mismatch::Workload { request_id, .. } => {
                request_id
            }
        }
    }
}

/// Checks that `event` is `peer`'s to report.
pub fn check_event(peer: &SpiffeId, event: &AuditEvent) -> Result<(), Mismatch> {
    if !event.reporter.is_empty() && event.reporter != peer.as_str() {
        return Err(Mismatch::Reporter {
            request_id: event.request_id.clone(),
            claimed: event.reporter.clone(),
            peer: peer.as_str().to_owned(),
        });
    }
    let workload = event.destination_workload.as_str();
    let own = if workload.is_empty() {
        true
    } else if workload.starts_with("spiffe://") {
        SpiffeId::parse(workload).is_ok_and(|id| {
            id.trust_domain() == peer.trust_domain() && id.namespace() == peer.namespace()
        })
    } else {
        // `namespace/name`: the name is a policy's workload selector, not
        // the service account, so only the namespace can be bound.
        workload
            .split_once('/')
            .is_some_and(|(namespace, _)| namespace == peer.namespace())
    };
    if own {
        Ok(())
    } else {
        Err(Mismatch::Workload {
            request_id: event.request_id.clone(),
            claimed: workload.to_owned(),
            peer: peer.as_str().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap()
    }

    fn event(reporter: &str, workload: &str) -> AuditEvent {
        AuditEvent {
            request_id: "r1".into(),
            reporter: reporter.into(),
            destination_workload: workload.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_peers_own_events_pass() {
        let id = "spiffe://cluster.local/ns/shop/sa/orders";
        let same_namespace = "spiffe://cluster.local/ns/shop/sa/default";
        for (reporter, workload) in [
            ("", ""),
            (id, ""),
            (id, id),
            (id, same_namespace),
            ("", "shop/orders-api"),
        ] {
            assert_eq!(check_event(&peer(), &event(reporter, workload)), Ok(()));
        }
    }

    #[test]
    fn another_reporter_is_refused() {
        let e = event("spiffe://cluster.local/ns/bank/sa/ledger", "");
        let err = check_event(&peer(), &e).unwrap_err();
        assert_eq!(err.claimed(), "spiffe://cluster.local/ns/bank/sa/ledger");
        assert!(matches!(err, Mismatch::Reporter { .. }));
    }

    #[test]
    fn another_workload_is_refused() {
        for workload in [
            "bank/ledger",
            "spiffe://cluster.local/ns/bank/sa/ledger",
            "spiffe://elsewhere.local/ns/shop/sa/orders",
            "no-namespace",
        ] {
            let err = check_event(&peer(), &event("", workload)).unwrap_err();
            assert_eq!(err.claimed(), workload);
            assert!(matches!(err, Mismatch::Workload { .. }), "{workload}");
        }
    }
}
