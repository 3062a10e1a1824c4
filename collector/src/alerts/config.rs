//! Reading and checking the alert rules file (format: see the module above).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::event::StoredEvent;

/// Longest window a rule may have: beyond a week a tumbling window says
/// little, and the bound keeps window arithmetic far from overflow.
const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;
const DEFAULT_MAX_KEYS: usize = 10_000;
const MAX_MAX_KEYS: u64 = 1_000_000;
const MAX_NAME_CHARS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum AlertConfigError {
    #[error("reading alert rules {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("alert rules are not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// `field` is a path into the document, e.g. `rules[2].threshold`.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

fn field_error(field: impl Into<String>, problem: impl Into<String>) -> AlertConfigError {
    AlertConfigError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    DenyRate,
    AuthFailures,
    RateLimited,
    PolicyChange,
    Gap,
}

impl AlertKind {
    const ALL: [AlertKind; 5] = [
        AlertKind::DenyRate,
        AlertKind::AuthFailures,
        AlertKind::RateLimited,
        AlertKind::PolicyChange,
        AlertKind::Gap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::DenyRate => "deny_rate",
            AlertKind::AuthFailures => "auth_failures",
            AlertKind::RateLimited => "rate_limited",
            AlertKind::PolicyChange => "policy_change",
            AlertKind::Gap => "gap",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// What a rule keeps its counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKey {
    /// The source principal, or the source IP when the principal is empty.
    Source,
    Destination,
    Reporter,
    /// One count for all records.
    None,
}

impl AlertKey {
    const ALL: [AlertKey; 4] = [
        AlertKey::Source,
        AlertKey::Destination,
        AlertKey::Reporter,
        AlertKey::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKey::Source => "source",
            AlertKey::Destination => "destination",
            AlertKey::Reporter => "reporter",
            AlertKey::None => "none",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// This key's value for `event`.
    pub fn of(self, event: &StoredEvent) -> &str {
        match self {
            AlertKey::Source if event.source_principal.is_empty() => &event.source_ip,
            AlertKey::Source => &event.source_principal,
            AlertKey::Destination => &event.destination_workload,
            AlertKey::Reporter => &event.reporter,
            AlertKey::None => "",
        }
    }
}

/// One checked rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRule {
    pub name: String,
    pub kind: AlertKind,
    pub key: AlertKey,
    /// At least 1.
    pub threshold: u64,
    /// 1 to 604800.
    pub window_secs: u64,
    /// (key, window) pairs tracked at once, at least 1.
    pub max_keys: usize,
}

/// The checked contents of a rules file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertRules {
    rules: Vec<AlertRule>,
}

impl AlertRules {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AlertConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| AlertConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, AlertConfigError> {
        // Walked by hand rather than derived so every error names the exact
        // field (`rules[2].threshold`), which serde's messages do not.
        let doc: Value = serde_json::from_str(text)?;
        let top = doc
            .as_object()
            .ok_or_else(|| field_error("(document)", "must be a JSON object"))?;
        if let Some(unknown) = top.keys().find(|k| k.as_str() != "rules") {
            return Err(field_error(unknown.as_str(), "unknown field"));
        }
        let list = top
            .get("rules")
            .ok_or_else(|| field_error("rules", "missing"))?
            .as_array()
            .ok_or_else(|| field_error("rules", "must be an array"))?;

        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(list.len());
        for (index, value) in list.iter().enumerate() {
            let at = format!("rules[{index}]");
            let rule = parse_rule(&at, value)?;
            if !names.insert(rule.name.clone()) {
                return Err(field_error(
                    format!("{at}.name"),
                    format!("duplicate rule name {:?}", rule.name),
                ));
            }
            rules.push(rule);
        }
        Ok(Self { rules })
    }

    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    pub fn into_rules(self) -> Vec<AlertRule> {
        self.rules
    }
}

const RULE_FIELDS: [&str; 6] = [
    "name",
    "kind",
    "key",
    "threshold",
    "window_secs",
    "max_keys",
];

fn parse_rule(at: &str, value: &Value) -> Result<AlertRule, AlertConfigError> {
    let obj = value
        .as_object()
        .ok_or_else(|| field_error(at, "must be an object"))?;
    if let Some(unknown) = obj.keys().find(|k| !RULE_FIELDS.contains(&k.as_str())) {
        return Err(field_error(format!("{at}.{unknown}"), "unknown field"));
    }

    let name = string_field(at, obj, "name")?;
    if name.is_empty() {
        return Err(field_error(format!("{at}.name"), "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(field_error(
            format!("{at}.name"),
            format!("longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(field_error(
            format!("{at}.name"),
            "must not contain control characters",
        ));
    }

    let kind_text = string_field(at, obj, "kind")?;
    let kind = AlertKind::parse(kind_text).ok_or_else(|| {
        field_error(
            format!("{at}.kind"),
            format!(
                "unknown kind {kind_text:?} (expected one of {})",
                AlertKind::ALL.map(AlertKind::as_str).join(", ")
            ),
        )
    })?;

    let key_text = string_field(at, obj, "key")?;
    let key = AlertKey::parse(key_text).ok_or_else(|| {
        field_error(
            format!("{at}.key"),
            format!(
                "unknown key {key_text:?} (expected one of {})",
                AlertKey::ALL.map(AlertKey::as_str).join(", ")
            ),
        )
    })?;

    let threshold = integer_field(at, obj, "threshold")?
        .ok_or_else(|| field_error(format!("{at}.threshold"), "missing"))?;
    if threshold == 0 {
        return Err(field_error(format!("{at}.threshold"), "must be > 0"));
    }

    let window_secs = integer_field(at, obj, "window_secs")?
        .ok_or_else(|| field_error(format!("{at}.window_secs"), "missing"))?;
    if window_secs == 0 {
        return Err(field_error(format!("{at}.window_secs"), "must be > 0"));
    }
    if window_secs > MAX_WINDOW_SECS {
        return Err(field_error(
            format!("{at}.window_secs"),
            format!("must be at most {MAX_WINDOW_SECS} (one week)"),
        ));
    }

    let max_keys = match integer_field(at, obj, "max_keys")? {
        None => DEFAULT_MAX_KEYS,
        Some(0) => return Err(field_error(format!("{at}.max_keys"), "must be > 0")),
        Some(n) if n > MAX_MAX_KEYS => {
            return Err(field_error(
                format!("{at}.max_keys"),
                format!("must be at most {MAX_MAX_KEYS}"),
            ));
        }
        Some(n) => usize::try_from(n)
            .map_err(|_| field_error(format!("{at}.max_keys"), "too large for this platform"))?,
    };

    Ok(AlertRule {
        name: name.to_owned(),
        kind,
        key,
        threshold,
        window_secs,
        max_keys,
    })
}

fn string_field<'a>(
    at: &str,
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a str, AlertConfigError> {
    match obj.get(field) {
        None => Err(field_error(format!("{at}.{field}"), "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(field_error(format!("{at}.{field}"), "must be a string")),
    }
}

/// A non-negative integer field; `None` when absent.
fn integer_field(
    at: &str,
    obj: &Map<String, Value>,
    field: &str,
) -> Result<Option<u64>, AlertConfigError> {
    match obj.get(field) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            // Say "> 0" for the usual mistake (a negative count) rather than
            // a type complaint.
            None if n.as_i64().is_some() => {
                Err(field_error(format!("{at}.{field}"), "must be > 0"))
            }
            None => Err(field_error(
                format!("{at}.{field}"),
                "must be a whole number",
            )),
        },
        Some(_) => Err(field_error(format!("{at}.{field}"), "must be a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        AlertRules::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let ok = r#"{"name":"a","kind":"deny_rate","key":"source","threshold":1,"window_secs":60}"#;
        assert_eq!(
            err(&format!(
                r#"{{"rules":[{ok},{{"name":"b","kind":"gap","key":"reporter","threshold":-3,"window_secs":60}}]}}"#
            )),
            "rules[1].threshold: must be > 0"
        );
        assert_eq!(
            err(&format!(r#"{{"rules":[{ok},{ok}]}}"#)),
            "rules[1].name: duplicate rule name \"a\""
        );
        assert_eq!(
            err(
                r#"{"rules":[{"name":"a","kind":"deny_rate","key":"source","threshold":1,"window_secs":1.5}]}"#
            ),
            "rules[0].window_secs: must be a whole number"
        );
        assert_eq!(err(r#"{"rule":[]}"#), "rule: unknown field");
        assert!(err("[").starts_with("alert rules are not valid JSON"));
    }

    #[test]
    fn max_keys_defaults() {
        let rules = AlertRules::from_json(
            r#"{"rules":[{"name":"a","kind":"policy_change","key":"none","threshold":1,"window_secs":60}]}"#,
        )
        .unwrap();
        assert_eq!(rules.rules()[0].max_keys, DEFAULT_MAX_KEYS);
        assert_eq!(rules.rules()[0].key, AlertKey::None);
    }
}
