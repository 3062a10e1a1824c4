//! Alert rules (DESIGN §7): deny-rate spikes, authentication-failure bursts,
//! rate-limit floods, policy changes and audit gaps, counted per key in
//! tumbling windows over the stored records.
//!
//! An alert is raised once per (rule, key, window): the first time the
//! count in that window reaches the rule's threshold. The caller stores it
//! ([`Alert::to_stored_event`]), it is counted in [`AlertMetrics`], and it can
//! be posted to a webhook ([`WebhookNotifier`]).
//!
//! # Config file
//!
//! A JSON object with one field, `rules`, an array of rules:
//!
//! ```json
//! {
//!   "rules": [
//!     { "name": "deny-spike",   "kind": "deny_rate",     "key": "source",      "threshold": 100, "window_secs": 60 },
//!     { "name": "authn-burst",  "kind": "auth_failures", "key": "source",      "threshold": 20,  "window_secs": 60 },
//!     { "name": "ratelimit",    "kind": "rate_limited",  "key": "destination", "threshold": 500, "window_secs": 60 },
//!     { "name": "policy",       "kind": "policy_change", "key": "destination", "threshold": 1,   "window_secs": 300 },
//!     { "name": "audit-loss",   "kind": "gap",           "key": "reporter",    "threshold": 1,   "window_secs": 60,
//!       "max_keys": 1000 }
//!   ]
//! }
//! ```
//!
//! | field         | required | meaning |
//! |---------------|----------|---------|
//! | `name`        | yes      | unique, 1–128 characters, no control characters; the `rule` label of the metric |
//! | `kind`        | yes      | what is counted, see below |
//! | `key`         | yes      | what the count is kept per: `source` (the source principal, or the source IP when the principal is empty), `destination` (destination workload), `reporter` (the agent that reported the record) or `none` (one count for everything; the alert's key is `""`) |
//! | `threshold`   | yes      | integer ≥ 1: the count in one window that raises the alert |
//! | `window_secs` | yes      | integer 1–604800 (one week): the window length |
//! | `max_keys`    | no       | integer 1–1000000, default 10000: how many (key, window) pairs the rule tracks at once |
//!
//! Kinds, all counted over decision records except `gap`:
//!
//! - `deny_rate`: decisions that denied (`decision == "deny"`), 1 each.
//! - `auth_failures`: decisions whose reason starts with `authn.`, 1 each.
//! - `rate_limited`: decisions with status 429 or reason `ratelimit.exceeded`, 1 each.
//! - `policy_change`: a decision whose `policy_version` differs from the last
//!   one seen for the same (reporter, destination workload), 1 each. The
//!   first version seen for a pair is not a change; records without a
//!   version, or older than the last one seen for the pair, are not compared.
//!   At most `max_keys` pairs are remembered (the least recently seen is
//!   forgotten first, and its next record counts as a first sighting).
//! - `gap`: gap records, counting the events they say were lost.
//!
//! Unknown fields are refused. Errors name the field: `rules[2].threshold:
//! must be > 0`.
//!
//! # Windows
//!
//! Windows are tumbling and aligned to the Unix epoch: a record at `t` (its
//! own `time_us`, not the time it arrived) falls in the window starting at
//! `t - t mod window`. Each (key, window) pair has its own count, so records
//! that arrive a little out of order still land in their window.
//!
//! Memory is bounded per rule by `max_keys` (key, window) pairs. A window is
//! closed once `now_us` (the caller's clock, passed to
//! [`AlertEngine::observe`]) is a full window past its end, which leaves one
//! window of grace for late records. When the table is full, the pair with
//! the oldest window is evicted; if every tracked window is as new as the
//! incoming one, the incoming record is not counted instead. Records for a
//! closed or evicted window are ignored rather than counted afresh, which is
//! what keeps "one alert per (rule, key, window)" true; ignored records are
//! counted in `palisade_collector_alert_events_ignored_total`.

mod aged;
mod config;
mod metrics;
mod webhook;

pub use config::{AlertConfigError, AlertKey, AlertKind, AlertRule, AlertRules};
pub use metrics::AlertMetrics;
pub use webhook::{WebhookConfig, WebhookError, WebhookMetrics, WebhookNotifier};

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::event::{RecordKind, StoredEvent};
use aged::AgedMap;

/// One raised alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// The rule's name.
    pub rule: String,
    pub kind: AlertKind,
    /// What `key` is (source, destination, reporter, none).
    pub key_by: AlertKey,
    /// The key's value: a principal, IP, workload, reporter, or `""` for
    /// `none`.
    pub key: String,
    /// The count in the window when it reached the threshold (a gap record
    /// can take it past the threshold in one step).
    pub count: u64,
    pub threshold: u64,
    /// Start of the window, microseconds since the Unix epoch.
    pub window_start_us: i64,
    pub window_secs: u64,
    /// When the collector raised it (the `now_us` given to `observe`).
    pub raised_us: i64,
}

impl Alert {
    /// The record the collector stores for this alert: kind `alert` at
    /// `raised_us`, `rule` the rule's name, `reason` `alert.<kind>`, the key in
    /// the column it came from (source principal or IP, destination
    /// workload, reporter). The stored record has no columns for the counts,
    /// so they travel as `alert.*` entries in `headers` (sorted by name, as
    /// headers always are).
    pub fn to_stored_event(&self) -> StoredEvent {
        let mut event = StoredEvent::new(RecordKind::Alert, self.raised_us);
        event.rule = self.rule.clone();
        event.reason = format!("alert.{}", self.kind.as_str());
        match self.key_by {
            AlertKey::Source => {
                // The key came from the principal unless that was empty, in
                // which case it is the source IP.
                if self.key.parse::<IpAddr>().is_ok() {
                    event.source_ip = self.key.clone();
                } else {
                    event.source_principal = self.key.clone();
                }
            }
            AlertKey::Destination => event.destination_workload = self.key.clone(),
            AlertKey::Reporter => event.reporter = self.key.clone(),
            AlertKey::None => {}
        }
        event.headers = vec![
            ("alert.count".to_owned(), self.count.to_string()),
            ("alert.threshold".to_owned(), self.threshold.to_string()),
            ("alert.window_secs".to_owned(), self.window_secs.to_string()),
            (
                "alert.window_start_us".to_owned(),
                self.window_start_us.to_string(),
            ),
        ];
        event
    }
}

/// Counts records against the rules and raises alerts. Not shared: the
/// ingest path owns it (behind a lock if several tasks feed it).
pub struct AlertEngine {
    rules: Vec<RuleState>,
    metrics: Arc<AlertMetrics>,
}

struct RuleState {
    rule: AlertRule,
    window_us: i64,
    /// Count per (key, window start); aged by window start.
    windows: AgedMap<(String, i64), Window>,
    /// Every (key, window) ever removed (closed or evicted) started at or
    /// before this, so a record for a window not tracked and not after it
    /// would re-open a window that may already have alerted.
    closed_through_us: Option<i64>,
    /// For `policy_change`: last version per (reporter, destination), aged
    /// by the time of the record it came from.
    versions: AgedMap<(String, String), String>,
}

#[derive(Debug, Default)]
struct Window {
    count: u64,
    alerted: bool,
}

impl AlertEngine {
    pub fn new(rules: AlertRules) -> Self {
        let metrics = Arc::new(AlertMetrics::new(
            rules.rules().iter().map(|r| r.name.clone()),
        ));
        let rules = rules
            .into_rules()
            .into_iter()
            .map(|rule| RuleState {
                // window_secs is at most a week (checked), so this fits.
                window_us: i64::try_from(rule.window_secs)
                    .unwrap_or(i64::MAX / 1_000_000)
                    .saturating_mul(1_000_000),
                windows: AgedMap::new(rule.max_keys),
                closed_through_us: None,
                versions: AgedMap::new(rule.max_keys),
                rule,
            })
            .collect();
        Self { rules, metrics }
    }

    /// The counters of raised alerts, for the admin port.
    pub fn metrics(&self) -> Arc<AlertMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Counts `events` (in the order given) and returns the alerts they
    /// raise. Windows come from each record's `time_us`; `now_us` closes old
    /// windows and is the alerts' `raised_us`.
    pub fn observe(&mut self, events: &[StoredEvent], now_us: i64) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for (index, state) in self.rules.iter_mut().enumerate() {
            state.close_windows(now_us);
            for event in events {
                match state.observe(event, now_us) {
                    Observed::Nothing => {}
                    Observed::Ignored => self.metrics.ignored(index),
                    Observed::Alert(alert) => {
                        tracing::info!(
                            rule = %alert.rule,
                            kind = alert.kind.as_str(),
                            key = %alert.key,
                            count = alert.count,
                            window_start_us = alert.window_start_us,
                            "alert raised"
                        );
                        self.metrics.raised(index);
                        alerts.push(*alert);
                    }
                }
            }
        }
        alerts
    }
}

enum Observed {
    Nothing,
    /// The record counted for the rule but its window is no longer tracked.
    Ignored,
    Alert(Box<Alert>),
}

impl RuleState {
    /// Drops windows that ended a full window before `now_us`.
    fn close_windows(&mut self, now_us: i64) {
        let grace = self.window_us.saturating_mul(2);
        while let Some(((_, start), _)) = self
            .windows
            .pop_oldest_if(|start| start.saturating_add(grace) <= now_us)
        {
            self.closed_through(start);
        }
    }

    fn closed_through(&mut self, start: i64) {
        self.closed_through_us = Some(self.closed_through_us.map_or(start, |c| c.max(start)));
    }

    fn observe(&mut self, event: &StoredEvent, now_us: i64) -> Observed {
        let amount = match self.amount(event) {
            Some(amount) if amount > 0 => amount,
            _ => return Observed::Nothing,
        };
        let key = self.rule.key.of(event).to_owned();
        let start = event.time_us.div_euclid(self.window_us) * self.window_us;
        let slot = (key, start);

        if self.windows.get_mut(&slot).is_none() {
            if self.closed_through_us.is_some_and(|c| start <= c) {
                return Observed::Ignored;
            }
            if self.windows.is_full() {
                match self.windows.oldest_age() {
                    Some(oldest) if oldest < start => {
                        if let Some(((_, evicted), _)) = self.windows.pop_oldest_if(|_| true) {
                            self.closed_through(evicted);
                        }
                    }
                    // Every tracked window is at least as new: evicting one
                    // would close a live window, so this record goes uncounted.
                    _ => return Observed::Ignored,
                }
            }
            self.windows.insert(slot.clone(), start, Window::default());
        }
        let Some(window) = self.windows.get_mut(&slot) else {
            return Observed::Ignored;
        };
        window.count = window.count.saturating_add(amount);
        if window.alerted || window.count < self.rule.threshold {
            return Observed::Nothing;
        }
        window.alerted = true;
        Observed::Alert(Box::new(Alert {
            rule: self.rule.name.clone(),
            kind: self.rule.kind,
            key_by: self.rule.key,
            key: slot.0,
            count: window.count,
            threshold: self.rule.threshold,
            window_start_us: start,
            window_secs: self.rule.window_secs,
            raised_us: now_us,
        }))
    }

    /// How much `event` counts for this rule.
    fn amount(&mut self, event: &StoredEvent) -> Option<u64> {
        match self.rule.kind {
            AlertKind::Gap => (event.kind == RecordKind::Gap).then_some(event.lost),
            _ if event.kind != RecordKind::Decision => None,
            AlertKind::DenyRate => (event.decision == "deny").then_some(1),
            AlertKind::AuthFailures => event.reason.starts_with("authn.").then_some(1),
            AlertKind::RateLimited => {
                (event.status == 429 || event.reason == "ratelimit.exceeded").then_some(1)
            }
            AlertKind::PolicyChange => self.policy_changed(event).then_some(1),
        }
    }

    fn policy_changed(&mut self, event: &StoredEvent) -> bool {
        if event.policy_version.is_empty() {
            return false;
        }
        let pair = (event.reporter.clone(), event.destination_workload.clone());
        match self.versions.get_with_age(&pair) {
            // A record older than the one the version came from says nothing
            // about what is current (batches from one agent can be replayed
            // or interleave with another's).
            Some((seen_at, _)) if event.time_us < seen_at => false,
            Some((_, version)) => {
                let changed = *version != event.policy_version;
                if changed {
                    *version = event.policy_version.clone();
                }
                self.versions.set_age(&pair, event.time_us);
                changed
            }
            None => {
                if self.versions.is_full() {
                    self.versions.pop_oldest_if(|_| true);
                }
                self.versions
                    .insert(pair, event.time_us, event.policy_version.clone());
                false
            }
        }
    }
}
