//! The borrowed [`AuditEvent`] in its wire form
//! (`palisade.audit.v1.AuditEvent`), built on the request path: only what
//! the event holds is copied, nothing is looked up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade_proto::audit::v1 as pb;

use super::AuditEvent;

/// `event` as sent to the collector, stamped `time`. `reporter` is left
/// empty: the reporter fills it in per batch from the certificate it
/// connects with, off the request path.
pub(super) fn to_wire(event: &AuditEvent<'_>, time: SystemTime) -> pb::AuditEvent {
    let owned = |s: Option<&str>| s.map(str::to_owned).unwrap_or_default();
    pb::AuditEvent {
        time: Some(timestamp(time)),
        request_id: event.request_id.to_owned(),
        trace_id: owned(event.trace_id),
        source_principal: owned(event.source_identity),
        source_ip: event.source_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        destination_workload: event.destination_workload.to_owned(),
        destination_port: u32::from(event.destination_port),
        route: owned(event.route),
        method: event.method.to_owned(),
        path: owned(event.path),
        verdict: if event.allowed {
            pb::Verdict::Allow
        } else {
            pb::Verdict::Deny
        } as i32,
        rule: owned(event.rule),
        reason: event.reason.to_owned(),
        status: u32::from(event.status),
        latency_us: saturating_micros(event.latency),
        rate_limit: event.rate_limit.map(|r| pb::RateLimitState {
            limit_id: r.limit_id.to_owned(),
            limit: r.limit,
            remaining: r.remaining,
            reset_after_ms: u64::try_from(r.reset_after.as_millis()).unwrap_or(u64::MAX),
        }),
        jwt_subject: owned(event.jwt_subject),
        api_key_client: owned(event.api_key_client),
        // The event always describes the enforced decision; what audit mode
        // would have done differently is `shadow_reason`.
        audit_only: false,
        headers: Default::default(),
        policy_version: event.policy_version.to_owned(),
        shadow_reason: owned(event.shadow_reason),
        reporter: String::new(),
    }
}

fn saturating_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    // A clock before 1970 is a broken clock: report the epoch.
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        // Below 10^9 by construction.
        nanos: since.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::RateLimitSeen;

    #[test]
    fn every_field_the_event_holds_reaches_the_wire() {
        let event = AuditEvent {
            request_id: "r-1",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            source_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
            source_ip: Some("10.0.0.7".parse().unwrap()),
            destination_workload: "shop/orders",
            destination_port: 8080,
            policy_version: "v7",
            route: Some("orders"),
            method: "POST",
            path: Some("/orders/1"),
            allowed: false,
            reason: "authz.denied",
            rule: Some("shop/orders routes[0].deny[0]"),
            status: 403,
            latency: Duration::from_micros(1234),
            rate_limit: Some(RateLimitSeen {
                limit_id: "per-client",
                limit: 10,
                remaining: 0,
                reset_after: Duration::from_millis(1500),
            }),
            jwt_subject: Some("alice"),
            api_key_client: Some("batch-job"),
            shadow_reason: Some("authz.allowed"),
        };
        let time = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let w = to_wire(&event, time);
        assert_eq!(
            w.time,
            Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            })
        );
        assert_eq!(w.request_id, "r-1");
        assert_eq!(w.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(w.source_principal, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(w.source_ip, "10.0.0.7");
        assert_eq!(w.destination_workload, "shop/orders");
        assert_eq!(w.destination_port, 8080);
        assert_eq!(w.policy_version, "v7");
        assert_eq!(w.route, "orders");
        assert_eq!(w.method, "POST");
        assert_eq!(w.path, "/orders/1");
        assert_eq!(w.verdict, pb::Verdict::Deny as i32);
        assert_eq!(w.reason, "authz.denied");
        assert_eq!(w.rule, "shop/orders routes[0].deny[0]");
        assert_eq!(w.status, 403);
        assert_eq!(w.latency_us, 1234);
        assert_eq!(
            w.rate_limit,
            Some(pb::RateLimitState {
                limit_id: "per-client".into(),
                limit: 10,
                remaining: 0,
                reset_after_ms: 1500
            })
        );
        assert_eq!(w.jwt_subject, "alice");
        assert_eq!(w.api_key_client, "batch-job");
        assert_eq!(w.shadow_reason, "authz.allowed");
        assert!(!w.audit_only);
        assert_eq!(w.reporter, "");
    }

    #[test]
    fn absent_fields_are_empty_and_allow_is_allow() {
        let event = AuditEvent {
            allowed: true,
            ..AuditEvent::under(None)
        };
        let w = to_wire(&event, UNIX_EPOCH);
        assert_eq!(w.verdict, pb::Verdict::Allow as i32);
        assert_eq!((w.source_ip.as_str(), w.route.as_str()), ("", ""));
        assert_eq!(w.rate_limit, None);
        assert_eq!(
            w.time,
            Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0
            })
        );
    }
}
