//! What the collector stores: one flat record per audit event, plus the
//! records the collector writes itself (gaps the agent reported, reports it
//! refused). Every field is a column the query API can filter on or return.

use palisade_proto::audit::v1 as wire;
use serde::{Deserialize, Serialize};

/// What a stored record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A decision an agent made.
    Decision,
    /// Events an agent lost (queue and spool full): `lost` says how many.
    Gap,
    /// A report the collector refused (a peer claiming another workload's
    /// events); `reason` says why, `source_principal` is the peer.
    RefusedReport,
    /// An alert the collector raised from its alert rules (`crate::alerts`):
    /// `rule` names the rule, `reason` is `alert.<kind>`.
    Alert,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Decision => "decision",
            RecordKind::Gap => "gap",
            RecordKind::RefusedReport => "refused_report",
            RecordKind::Alert => "alert",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "decision" => Some(RecordKind::Decision),
            "gap" => Some(RecordKind::Gap),
            "refused_report" => Some(RecordKind::RefusedReport),
            "alert" => Some(RecordKind::Alert),
            _ => None,
        }
    }
}

/// One stored audit record. Strings are empty and options `None` where the
/// agent had nothing to say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub kind: RecordKind,
    /// When the agent decided, microseconds since the Unix epoch.
    pub time_us: i64,
    pub request_id: String,
    pub trace_id: String,
    /// SPIFFE ID of the agent that reported it (the mTLS peer, checked).
    pub reporter: String,
    pub source_principal: String,
    pub source_ip: String,
    pub destination_workload: String,
    pub destination_port: u32,
    pub route: String,
    pub method: String,
    pub path: String,
    /// `allow` or `deny` (empty for gap and refusal records).
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub status: u32,
    pub latency_us: u64,
    pub ratelimit_id: String,
    pub ratelimit_limit: Option<u64>,
    pub ratelimit_remaining: Option<u64>,
    pub jwt_subject: String,
    pub api_key_client: String,
    pub audit_only: bool,
    pub shadow_reason: String,
    pub policy_version: String,
    /// Headers the policy kept, sorted by name.
    pub headers: Vec<(String, String)>,
    /// For a gap record: how many events were lost.
    pub lost: u64,
}

impl StoredEvent {
    /// An empty record of `kind` at `time_us`.
    pub fn new(kind: RecordKind, time_us: i64) -> Self {
        Self {
            kind,
            time_us,
            request_id: String::new(),
            trace_id: String::new(),
            reporter: String::new(),
            source_principal: String::new(),
            source_ip: String::new(),
            destination_workload: String::new(),
            destination_port: 0,
            route: String::new(),
            method: String::new(),
            path: String::new(),
            decision: String::new(),
            rule: String::new(),
            reason: String::new(),
            status: 0,
            latency_us: 0,
            ratelimit_id: String::new(),
            ratelimit_limit: None,
            ratelimit_remaining: None,
            jwt_subject: String::new(),
            api_key_client: String::new(),
            audit_only: false,
            shadow_reason: String::new(),
            policy_version: String::new(),
            headers: Vec::new(),
            lost: 0,
        }
    }

    /// A decision from the wire, reported by `reporter` (already checked).
    pub fn from_wire(event: wire::AuditEvent, reporter: &str) -> Self {
        let time_us = event.time.map_or(0, |t| {
            t.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos) / 1000)
        });
        let decision = match wire::Verdict::try_from(event.verdict) {
            Ok(wire::Verdict::Allow) => "allow",
            Ok(wire::Verdict::Deny) => "deny",
            _ => "",
        };
        let rate_limit = event.rate_limit.unwrap_or_default();
        let has_limit = !rate_limit.limit_id.is_empty() || rate_limit.limit > 0;
        Self {
            kind: RecordKind::Decision,
            time_us,
            request_id: event.request_id,
            trace_id: event.trace_id,
            reporter: reporter.to_owned(),
            source_principal: event.source_principal,
            source_ip: event.source_ip,
            destination_workload: event.destination_workload,
            destination_port: event.destination_port,
            route: event.route,
            method: event.method,
            path: event.path,
            decision: decision.to_owned(),
            rule: event.rule,
            reason: event.reason,
            status: event.status,
            latency_us: event.latency_us,
            ratelimit_id: rate_limit.limit_id,
            ratelimit_limit: has_limit.then_some(rate_limit.limit),
            ratelimit_remaining: has_limit.then_some(rate_limit.remaining),
            jwt_subject: event.jwt_subject,
            api_key_client: event.api_key_client,
            audit_only: event.audit_only,
            shadow_reason: event.shadow_reason,
            policy_version: event.policy_version,
            headers: event.headers.into_iter().collect(),
            lost: 0,
        }
    }

    /// The gap record for `lost` events an agent dropped before a batch.
    pub fn gap(reporter: &str, time_us: i64, lost: u64) -> Self {
        let mut gap = Self::new(RecordKind::Gap, time_us);
        gap.reporter = reporter.to_owned();
        gap.reason = "audit.events_dropped".to_owned();
        gap.lost = lost;
        gap
    }
}

/// One batch as the collector stores it: who sent it, where it sits in that
/// agent instance's sequence, and its records (a gap record first when the
/// agent reported losses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub agent_instance_id: String,
    pub sequence: u64,
    /// SPIFFE ID of the mTLS peer that sent it.
    pub reporter: String,
    /// When the collector received it, microseconds since the Unix epoch.
    pub received_us: i64,
    pub dropped_since_last: u64,
    pub events: Vec<StoredEvent>,
}

/// A stored record with where it sits in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRow {
    /// Increases with every stored record; the query cursor.
    pub id: i64,
    pub agent_instance_id: String,
    pub sequence: u64,
    #[serde(flatten)]
    pub event: StoredEvent,
}
