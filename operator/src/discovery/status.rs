//! What the discovery service knows about each agent: the version it was
//! sent, the version it ACKed (it enforces that one), and its last NACK.
//! The `Programmed` condition (DESIGN §4) will be computed from here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Disconnected agents are forgotten after this long, so agents that come
/// and go with random instance ids cannot grow the table without bound.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NackRecord {
    pub version: String,
    pub reason: String,
}

/// One agent instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub spiffe_id: String,
    pub pod_name: String,
    /// The last version pushed to it.
    pub sent_version: Option<String>,
    /// The last version it ACKed: what it enforces now.
    pub acked_version: Option<String>,
    pub last_nack: Option<NackRecord>,
    /// Open Watch streams (normally 0 or 1; briefly 2 while a half-dead
    /// connection has not been noticed yet).
    pub streams: u32,
    pub updated: SystemTime,
}

impl AgentRecord {
    pub fn connected(&self) -> bool {
        self.streams > 0
    }
}

/// Shared by every Watch stream.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    agents: Mutex<BTreeMap<String, AgentRecord>>,
    acks: AtomicU64,
    nacks: AtomicU64,
    pushes: AtomicU64,
    subscribers: AtomicU64,
}

impl DiscoveryStatus {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_agents<T>(&self, f: impl FnOnce(&mut BTreeMap<String, AgentRecord>) -> T) -> T {
        // A panic while holding the lock leaves plain data behind; keep going.
        let mut guard = match self.agents.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// A stream opened for `instance`.
    pub fn subscribed(&self, instance: &str, spiffe_id: &str, pod_name: &str) {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        self.with_agents(|agents| {
            agents.retain(|_, a| {
                a.connected()
                    || now
                        .duration_since(a.updated)
                        .is_ok_and(|age| age < FORGET_AFTER)
            });
            let record = agents
                .entry(instance.to_owned())
                .or_insert_with(|| AgentRecord {
                    spiffe_id: spiffe_id.to_owned(),
                    pod_name: pod_name.to_owned(),
                    sent_version: None,
                    acked_version: None,
                    last_nack: None,
                    streams: 0,
                    updated: now,
                });
            record.spiffe_id = spiffe_id.to_owned();
            record.pod_name = pod_name.to_owned();
            record.streams += 1;
            record.updated = now;
        });
    }

    /// A stream of `instance` ended.
    pub fn unsubscribed(&self, instance: &str) {
        // Saturating: never wraps even if called once too often.
        let _ = self
            .subscribers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        self.update(instance, |a| a.streams = a.streams.saturating_sub(1));
    }

    pub fn sent(&self, instance: &str, version: &str) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.update(instance, |a| a.sent_version = Some(version.to_owned()));
    }

    pub fn acked(&self, instance: &str, version: &str) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        self.update(instance, |a| a.acked_version = Some(version.to_owned()));
    }

    pub fn nacked(&self, instance: &str, version: &str, reason: &str) {
        self.nacks.fetch_add(1, Ordering::Relaxed);
        self.update(instance, |a| {
            a.last_nack = Some(NackRecord {
                version: version.to_owned(),
                reason: reason.to_owned(),
            });
        });
    }

    fn update(&self, instance: &str, f: impl FnOnce(&mut AgentRecord)) {
        self.with_agents(|agents| {
            if let Some(a) = agents.get_mut(instance) {
                f(a);
                a.updated = SystemTime::now();
            }
        });
    }

    pub fn agent(&self, instance: &str) -> Option<AgentRecord> {
        self.with_agents(|agents| agents.get(instance).cloned())
    }

    /// Every known agent instance, by instance id.
    pub fn agents(&self) -> Vec<(String, AgentRecord)> {
        self.with_agents(|agents| agents.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }
    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }
    /// Open Watch streams.
    pub fn subscribers(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Prometheus text (format 0.0.4) for the operator's admin port.
    pub fn render_prometheus(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "palisade_operator_discovery_acks_total",
            "counter",
            "Policy versions agents accepted (ACK).",
            self.acks(),
        );
        metric(
            "palisade_operator_discovery_nacks_total",
            "counter",
            "Policy versions agents refused (NACK); they keep their previous version.",
            self.nacks(),
        );
        metric(
            "palisade_operator_discovery_pushes_total",
            "counter",
            "Policy versions sent to agents.",
            self.pushes(),
        );
        metric(
            "palisade_operator_discovery_subscribers",
            "gauge",
            "Open Discovery.Watch streams.",
            self.subscribers(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_renders() {
        let s = DiscoveryStatus::new();
        s.subscribed("i1", "spiffe://cluster.local/ns/a/sa/b", "pod-1");
        s.sent("i1", "v1");
        s.acked("i1", "v1");
        s.sent("i1", "v2");
        s.nacked("i1", "v2", "bad jwks");
        let a = s.agent("i1").unwrap();
        assert_eq!(a.acked_version.as_deref(), Some("v1"));
        assert_eq!(a.sent_version.as_deref(), Some("v2"));
        assert_eq!(a.last_nack.as_ref().unwrap().reason, "bad jwks");
        assert!(a.connected());
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(
            out.contains("palisade_operator_discovery_acks_total 1\n"),
            "{out}"
        );
        assert!(
            out.contains("palisade_operator_discovery_nacks_total 1\n"),
            "{out}"
        );
        assert!(
            out.contains("palisade_operator_discovery_subscribers 1\n"),
            "{out}"
        );
        s.unsubscribed("i1");
        s.unsubscribed("i1");
        assert_eq!(s.subscribers(), 0);
        assert!(!s.agent("i1").unwrap().connected());
    }
}
