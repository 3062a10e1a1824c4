//! What the agent knows about its policy: which version it enforces and
//! where it came from, whether the discovery stream is up, and what it
//! refused last. Read by `/config_dump` and `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

/// Where the policy in force came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// No policy yet: every request is denied.
    #[default]
    None,
    /// `--policy-file`.
    File,
    /// The operator's `Discovery.Watch`.
    Discovery,
}

impl PolicySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::File => "file",
            Self::Discovery => "discovery",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastNack {
    pub version: String,
    pub reason: String,
}

/// One consistent reading of [`PolicyStatus`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyStatusSnapshot {
    /// The version enforced now.
    pub version: Option<String>,
    pub source: PolicySource,
    /// Whether a discovery stream is open.
    pub connected: bool,
    /// Versions loaded and ACKed.
    pub acks: u64,
    /// Versions refused (NACKed); the previous one stayed in force.
    pub nacks: u64,
    pub last_nack: Option<LastNack>,
    /// Discovery streams that failed or ended (connect failures included).
    pub stream_failures: u64,
}

#[derive(Debug, Default)]
struct Current {
    version: Option<String>,
    source: PolicySource,
    last_nack: Option<LastNack>,
}

#[derive(Debug, Default)]
pub struct PolicyStatus {
    current: Mutex<Current>,
    connected: AtomicBool,
    acks: AtomicU64,
    nacks: AtomicU64,
    stream_failures: AtomicU64,
}

impl PolicyStatus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A policy from `--policy-file` is in force.
    pub fn set_file(&self, version: &str) {
        let mut c = self.current.lock();
        c.version = Some(version.to_owned());
        c.source = PolicySource::File;
    }

    pub(crate) fn applied(&self, version: &str) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        let mut c = self.current.lock();
        c.version = Some(version.to_owned());
        c.source = PolicySource::Discovery;
    }

    /// An already enforced version was sent again (after a reconnect).
    pub(crate) fn reacked(&self) {
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, version: &str, reason: &str) {
        self.nacks.fetch_add(1, Ordering::Relaxed);
        self.current.lock().last_nack = Some(LastNack {
            version: version.to_owned(),
            reason: reason.to_owned(),
        });
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub(crate) fn stream_failed(&self) {
        self.stream_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The version in force, if it came from discovery.
    pub(crate) fn discovery_version(&self) -> Option<String> {
        let c = self.current.lock();
        (c.source == PolicySource::Discovery)
            .then(|| c.version.clone())
            .flatten()
    }

    pub fn snapshot(&self) -> PolicyStatusSnapshot {
        let c = self.current.lock();
        PolicyStatusSnapshot {
            version: c.version.clone(),
            source: c.source,
            connected: self.connected.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            last_nack: c.last_nack.clone(),
            stream_failures: self.stream_failures.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text (format 0.0.4). The version is a label of an info
    /// gauge: one series at a time, so cardinality stays at one.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = self.snapshot();
        let _ = writeln!(
            out,
            "# HELP palisade_agent_policy_updates_total Policy versions from the operator, by outcome (ack: enforced; nack: refused, the previous one kept)."
        );
        let _ = writeln!(out, "# TYPE palisade_agent_policy_updates_total counter");
        let _ = writeln!(
            out,
            "palisade_agent_policy_updates_total{{result=\"ack\"}} {}",
            s.acks
        );
        let _ = writeln!(
            out,
            "palisade_agent_policy_updates_total{{result=\"nack\"}} {}",
            s.nacks
        );
        let _ = writeln!(
            out,
            "# HELP palisade_agent_policy_connected 1 while the policy stream to the operator is open."
        );
        let _ = writeln!(out, "# TYPE palisade_agent_policy_connected gauge");
        let _ = writeln!(
            out,
            "palisade_agent_policy_connected {}",
            u8::from(s.connected)
        );
        let _ = writeln!(
            out,
            "# HELP palisade_agent_policy_stream_failures_total Policy streams that failed or ended; the agent reconnected with backoff."
        );
        let _ = writeln!(
            out,
            "# TYPE palisade_agent_policy_stream_failures_total counter"
        );
        let _ = writeln!(
            out,
            "palisade_agent_policy_stream_failures_total {}",
            s.stream_failures
        );
        let _ = writeln!(
            out,
            "# HELP palisade_agent_policy_info The policy version in force and where it came from."
        );
        let _ = writeln!(out, "# TYPE palisade_agent_policy_info gauge");
        if let Some(version) = &s.version {
            let _ = writeln!(
                out,
                "palisade_agent_policy_info{{source=\"{}\",version=\"{}\"}} 1",
                s.source.as_str(),
                escape_label(version)
            );
        }
    }
}

/// Prometheus label-value escaping: backslash, double quote, newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_info() {
        let s = PolicyStatus::new();
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(out.contains("palisade_agent_policy_updates_total{result=\"ack\"} 0\n"));
        assert!(out.contains("palisade_agent_policy_connected 0\n"));
        assert!(!out.contains("palisade_agent_policy_info{"));

        s.set_connected(true);
        s.applied("abc123");
        s.refused("def456", "bad \"jwks\"");
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(out.contains("palisade_agent_policy_updates_total{result=\"ack\"} 1\n"));
        assert!(out.contains("palisade_agent_policy_updates_total{result=\"nack\"} 1\n"));
        assert!(out.contains("palisade_agent_policy_connected 1\n"));
        assert!(
            out.contains("palisade_agent_policy_info{source=\"discovery\",version=\"abc123\"} 1\n")
        );
        let snap = s.snapshot();
        assert_eq!(snap.version.as_deref(), Some("abc123"));
        assert_eq!(snap.last_nack.unwrap().version, "def456");
        assert_eq!(escape_label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }

    #[test]
    fn serializes_for_config_dump() {
        let s = PolicyStatus::new();
        s.set_file("v9");
        let json = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(json["source"], "file");
        assert_eq!(json["version"], "v9");
    }
}
