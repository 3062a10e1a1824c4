//! Per-rule alert counters, rendered as Prometheus text for the admin port.
//! Labels are the configured rule names only, so cardinality is bounded by
//! the rules file.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct AlertMetrics {
    /// In rule order, as the engine indexes them.
    rules: Vec<RuleCounters>,
}

#[derive(Debug)]
struct RuleCounters {
    name: String,
    raised: AtomicU64,
    ignored: AtomicU64,
}

impl AlertMetrics {
    pub(super) fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self {
            rules: names
                .into_iter()
                .map(|name| RuleCounters {
                    name,
                    raised: AtomicU64::new(0),
                    ignored: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    pub(super) fn raised(&self, index: usize) {
        if let Some(rule) = self.rules.get(index) {
            rule.raised.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn ignored(&self, index: usize) {
        if let Some(rule) = self.rules.get(index) {
            rule.ignored.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Alerts `rule` has raised; `None` for a rule not configured.
    pub fn alerts(&self, rule: &str) -> Option<u64> {
        self.find(rule).map(|r| r.raised.load(Ordering::Relaxed))
    }

    /// Records `rule` would have counted but could not (window closed or
    /// evicted, or its table full).
    pub fn ignored_events(&self, rule: &str) -> Option<u64> {
        self.find(rule).map(|r| r.ignored.load(Ordering::Relaxed))
    }

    fn find(&self, rule: &str) -> Option<&RuleCounters> {
        self.rules.iter().find(|r| r.name == rule)
    }

    /// Prometheus text (format 0.0.4).
    pub fn render(&self, out: &mut String) {
        let name = "palisade_collector_alerts_total";
        let _ = writeln!(out, "# HELP {name} Alerts raised, by rule.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for rule in &self.rules {
            let _ = writeln!(
                out,
                "{name}{{rule=\"{}\"}} {}",
                escape_label(&rule.name),
                rule.raised.load(Ordering::Relaxed)
            );
        }
        let name = "palisade_collector_alert_events_ignored_total";
        let _ = writeln!(
            out,
            "# HELP {name} Records a rule did not count because their window was closed or evicted, or the rule's key table was full."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for rule in &self.rules {
            let _ = writeln!(
                out,
                "{name}{{rule=\"{}\"}} {}",
                escape_label(&rule.name),
                rule.ignored.load(Ordering::Relaxed)
            );
        }
    }
}

/// Label value escaping from the text exposition format.
pub(super) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_line_per_rule_with_escaped_names() {
        let metrics = AlertMetrics::new(["a\"b".to_owned(), "c".to_owned()]);
        metrics.raised(1);
        metrics.raised(1);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("# TYPE palisade_collector_alerts_total counter\n"));
        assert!(out.contains("palisade_collector_alerts_total{rule=\"a\\\"b\"} 0\n"));
        assert!(out.contains("palisade_collector_alerts_total{rule=\"c\"} 2\n"));
        assert_eq!(metrics.alerts("c"), Some(2));
        assert_eq!(metrics.alerts("zz"), None);
    }
}
