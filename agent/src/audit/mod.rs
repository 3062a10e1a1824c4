//! Audit events (DESIGN §7): one record per decision, never a secret or a
//! body. Denials are always recorded, and so is any decision an audit-mode
//! policy would have made differently (what audit mode is for); other
//! allowed requests are sampled per the policy's `audit.samplePercent`.
//! [`AuditEvent::under`] is the one builder: requests, opaque connections,
//! connections that never spoke HTTP and revoked tunnels all start from it.
//!
//! A recorded event is always written as a structured log record on the
//! `palisade::audit` target (one JSON object per line with
//! `RUST_LOG_FORMAT=json`). When an [`AuditSink`] is attached (the agent
//! runs with `--collector`), it is also converted to the wire form and put
//! on a bounded in-memory queue without ever waiting ([`sink`]); the
//! [`AuditReporter`] drains that queue into batches and streams them to the
//! collector over mTLS (`Audit.Report`), keeping what is not acknowledged
//! yet in memory and in a disk spool ([`reporter`], [`spool`]).

use std::net::IpAddr;
use std::time::Duration;

use palisade_policy::PolicyEngine;

mod backlog;
mod metrics;
pub mod reporter;
mod sampling;
pub mod sink;
pub mod spool;
mod wire;

pub use metrics::AuditMetrics;
pub use reporter::{AuditReporter, ReporterConfig, ReporterError, ReporterHandle};
pub use sampling::AllowedSampler;
pub use sink::{AuditQueue, AuditSink, channel};
pub use spool::SpoolError;

/// The `tracing` target audit records are written under, so they can be
/// filtered (`RUST_LOG=palisade::audit=info`) or shipped separately.
pub const TARGET: &str = "palisade::audit";

/// One decision, borrowed from the request it describes.
#[derive(Debug, Default)]
pub struct AuditEvent<'a> {
    pub request_id: &'a str,
    /// The W3C trace id from `traceparent`, when the request carried one.
    pub trace_id: Option<&'a str>,
    pub source_identity: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_workload: &'a str,
    /// The application port the connection was for (0: unknown).
    pub destination_port: u16,
    pub policy_version: &'a str,
    pub route: Option<&'a str>,
    pub method: &'a str,
    /// The normalized path (never the query: it may carry secrets).
    pub path: Option<&'a str>,
    pub allowed: bool,
    /// The stable reason code (`authz.allowed`, `ratelimit.exceeded`, …).
    pub reason: &'a str,
    /// The rule, limit or filter that decided.
    pub rule: Option<&'a str>,
    pub status: u16,
    pub latency: Duration,
    /// The rate limit that applied, and where it stood.
    pub rate_limit: Option<RateLimitSeen<'a>>,
    pub jwt_subject: Option<&'a str>,
    pub api_key_client: Option<&'a str>,
    /// What audit-mode policies would have decided, when they differ.
    pub shadow_reason: Option<&'a str>,
}

/// The state of the rate limit that applied to a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitSeen<'a> {
    pub limit_id: &'a str,
    pub limit: u64,
    pub remaining: u64,
    /// Until the key is as good as new.
    pub reset_after: Duration,
}

impl<'a> AuditEvent<'a> {
    /// An event about a decision made under `engine` (`None`: no policy was
    /// loaded): the destination workload and policy version filled in.
    pub fn under(engine: Option<&'a PolicyEngine>) -> Self {
        Self {
            destination_workload: engine.map_or("", |e| e.policy().workload.as_str()),
            policy_version: engine.map_or("", |e| e.version()),
            ..Default::default()
        }
    }

    /// Records the event if it is to be recorded under `engine`'s sampling:
    /// always for a denial or a decision audit mode disagrees with (a
    /// `shadow_reason`), for other allowed ones `samplePercent` of every
    /// 100 ([`AllowedSampler`]). See [`write`](Self::write) for where it goes.
    pub fn record(&self, sink: &AuditSink, engine: Option<&PolicyEngine>) {
        let sample_percent = engine.map_or(0, |e| e.audit_config().sample_percent);
        if self.allowed && self.shadow_reason.is_none() && !sink.sample_allowed(sample_percent) {
            return;
        }
        self.write(sink);
    }

    /// Records the event unconditionally (the caller sampled already): the
    /// log line, and the collector's queue when `sink` is attached to one
    /// (never waiting: a full queue drops and counts the event).
    pub fn write(&self, sink: &AuditSink) {
        self.log();
        sink.submit(self);
    }

    /// The structured log record on [`TARGET`].
    fn log(&self) {
        let (remaining, limit) = self.rate_limit.map(|r| (r.remaining, r.limit)).unzip();
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            trace_id = self.trace_id,
            source_identity = self.source_identity,
            source_ip = self.source_ip.map(tracing::field::display),
            destination = self.destination_workload,
            policy_version = self.policy_version,
            route = self.route,
            method = self.method,
            path = self.path,
            decision = if self.allowed { "allow" } else { "deny" },
            reason = self.reason,
            rule = self.rule,
            status = self.status,
            latency_us = u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
            ratelimit_remaining = remaining,
            ratelimit_limit = limit,
            jwt_subject = self.jwt_subject,
            api_key_client = self.api_key_client,
            shadow_reason = self.shadow_reason,
            "audit"
        );
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`);
/// `None` when absent or malformed.
pub fn trace_id(traceparent: Option<&str>) -> Option<&str> {
    let mut parts = traceparent?.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32))
        .then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_comes_only_from_a_well_formed_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(Some(tp)), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id(Some("00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(
            trace_id(Some(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )),
            None
        );
        assert_eq!(trace_id(None), None);
    }

    #[test]
    fn audit_mode_findings_are_recorded_whatever_the_sampling() {
        // `write` goes to tracing; count what reaches a subscriber.
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Count(Arc<Mutex<usize>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(
                &self,
                e: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if e.metadata().target() == TARGET {
                    *self.0.lock().unwrap() += 1;
                }
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        let count = Count::default();
        let subscriber = tracing_subscriber::registry().with(count.clone());
        let sink = AuditSink::disabled();
        tracing::subscriber::with_default(subscriber, || {
            let allowed = AuditEvent {
                allowed: true,
                ..AuditEvent::under(None)
            };
            allowed.record(&sink, None);
            let would_deny = AuditEvent {
                shadow_reason: Some("authz.deny_rule"),
                ..AuditEvent::under(None)
            };
            let would_deny = AuditEvent {
                allowed: true,
                ..would_deny
            };
            would_deny.record(&sink, None);
            AuditEvent::under(None).record(&sink, None);
        });
        // Sampling 0 %: the plain allowed request is dropped, the audit-mode
        // finding and the denial are not.
        assert_eq!(*count.0.lock().unwrap(), 2);
    }
}
