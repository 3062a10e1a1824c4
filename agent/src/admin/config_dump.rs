//! `/config_dump`: the compiled policy the agent enforces, its identity and
//! the outbound proxy's meshed destinations (flags and discovery), as JSON, for operators debugging "why was this denied". Secrets never
//! appear: API-key hashes are replaced by `"[redacted]"` (the policy never
//! carries a key itself), and the private key stays in the process.

use palisade_policy::wire;
use serde_json::{Value, json};

use super::AdminState;

/// Replaces every hash and secret-derived value.
pub const REDACTED: &str = "[redacted]";

/// The whole dump, pretty-printed.
pub fn render(state: &AdminState) -> String {
    let identity = state.identity().store().current().map(|cert| {
        json!({
            "spiffe_id": cert.spiffe_id().as_str(),
            "serial": cert.serial_hex(),
            "not_before": cert.not_before(),
            "not_after": cert.not_after(),
        })
    });
    let policy = state
        .policy
        .as_ref()
        .and_then(|p| p.current())
        .map(|p| policy_json(p.engine.policy()));
    let dump = json!({
        "ready": state.not_ready_reason().is_none(),
        "draining": state.is_draining(),
        "runtime": state.runtime,
        "identity": identity,
        "policy": policy,
        "mesh_destinations": state.destinations.as_ref().map(|d| d.to_json()),
    });
    let mut text = serde_json::to_string_pretty(&dump).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

/// The compiled policy as JSON, with enum numbers as their proto names and
/// API-key hashes redacted.
pub fn policy_json(policy: &wire::WorkloadPolicy) -> Value {
    let mut value = serde_json::to_value(policy).unwrap_or(Value::Null);
    if let Some(keys) = value
        .pointer_mut("/api_keys/keys")
        .and_then(Value::as_array_mut)
    {
        for key in keys {
            if let Some(hash) = key.get_mut("sha256") {
                *hash = Value::String(REDACTED.to_owned());
            }
        }
    }
    name_enum(&mut value, "/default_action", |n| {
        wire::DefaultAction::try_from(n)
            .ok()
            .map(|e| e.as_str_name())
    });
    name_enum(&mut value, "/default_mtls", mtls_name);
    for_each(&mut value, "/ports", |port| {
        name_enum(port, "/mtls", mtls_name)
    });
    for_each(&mut value, "/routes", |route| {
        name_enum(route, "/rate_limit/algorithm", |n| {
            wire::rate_limit::Algorithm::try_from(n)
                .ok()
                .map(|e| e.as_str_name())
        });
        name_enum(route, "/rate_limit/key", |n| {
            wire::rate_limit::KeyKind::try_from(n)
                .ok()
                .map(|e| e.as_str_name())
        });
        name_enum(route, "/rate_limit/scope", |n| {
            wire::rate_limit::Scope::try_from(n)
                .ok()
                .map(|e| e.as_str_name())
        });
        name_enum(route, "/rate_limit/failure_mode", |n| {
            wire::rate_limit::FailureMode::try_from(n)
                .ok()
                .map(|e| e.as_str_name())
        });
        for rules in ["/allow", "/deny"] {
            for_each(route, rules, |rule| {
                for_each(rule, "/conditions", |c| {
                    name_enum(c, "/subject", |n| {
                        wire::condition::Subject::try_from(n)
                            .ok()
                            .map(|e| e.as_str_name())
                    });
                    name_enum(c, "/operator", |n| {
                        wire::condition::Operator::try_from(n)
                            .ok()
                            .map(|e| e.as_str_name())
                    });
                });
            });
        }
    });
    value
}

fn mtls_name(n: i32) -> Option<&'static str> {
    wire::MtlsMode::try_from(n).ok().map(|e| e.as_str_name())
}

fn name_enum(value: &mut Value, pointer: &str, name: impl Fn(i32) -> Option<&'static str>) {
    if let Some(field) = value.pointer_mut(pointer)
        && let Some(n) = field.as_i64().and_then(|n| i32::try_from(n).ok())
        && let Some(name) = name(n)
    {
        *field = Value::String(name.to_owned());
    }
}

fn for_each(value: &mut Value, pointer: &str, mut f: impl FnMut(&mut Value)) {
    if let Some(items) = value.pointer_mut(pointer).and_then(Value::as_array_mut) {
        items.iter_mut().for_each(&mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_hashes_are_redacted_and_enums_named() {
        let policy = wire::WorkloadPolicy {
            version: "v7".into(),
            default_action: wire::DefaultAction::Deny as i32,
            default_mtls: wire::MtlsMode::Strict as i32,
            api_keys: Some(wire::ApiKeyAuth {
                header: "x-api-key".into(),
                keys: vec![wire::ApiKeyHash {
                    client_id: "billing".into(),
                    sha256: vec![0xab; 32],
                }],
            }),
            routes: vec![wire::Route {
                id: "r".into(),
                rate_limit: Some(wire::RateLimit {
                    id: "l".into(),
                    algorithm: wire::rate_limit::Algorithm::TokenBucket as i32,
                    scope: wire::rate_limit::Scope::Global as i32,
                    failure_mode: wire::rate_limit::FailureMode::Open as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = policy_json(&policy);
        let text = v.to_string();
        assert_eq!(v.pointer("/api_keys/keys/0/sha256"), Some(&json!(REDACTED)));
        assert_eq!(
            v.pointer("/api_keys/keys/0/client_id"),
            Some(&json!("billing"))
        );
        // 0xab = 171: no trace of the hash bytes anywhere.
        assert!(!text.contains("171"), "{text}");
        assert_eq!(
            v.pointer("/default_action"),
            Some(&json!("DEFAULT_ACTION_DENY"))
        );
        assert_eq!(v.pointer("/default_mtls"), Some(&json!("MTLS_MODE_STRICT")));
        assert_eq!(
            v.pointer("/routes/0/rate_limit/algorithm"),
            Some(&json!("ALGORITHM_TOKEN_BUCKET"))
        );
        assert_eq!(
            v.pointer("/routes/0/rate_limit/failure_mode"),
            Some(&json!("FAILURE_MODE_OPEN"))
        );
        assert_eq!(v.pointer("/version"), Some(&json!("v7")));
    }
}
