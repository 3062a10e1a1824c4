//! Compilation: the `ApiSecurityPolicy` resources that select a workload →
//! one `WorkloadPolicy`, the form the agent enforces.
//!
//! Policies are validated first; compilation only resolves what validation
//! cannot see alone (Secrets, several policies meeting on one workload).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::crd::*;
use crate::duration::parse_duration;
use crate::validate::{ParsedKey, parse_rate_limit_key, parse_time_of_day};
use crate::wire as pb;

/// The workload a policy is compiled for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub labels: Labels,
    /// Application ports; empty when unknown (every policy port applies).
    pub ports: Vec<u16>,
}

/// Mesh-wide settings (Helm values / operator flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    pub trust_domain: String,
    pub default_action: pb::DefaultAction,
    pub default_mtls: pb::MtlsMode,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            default_action: pb::DefaultAction::AllAuthenticated,
            default_mtls: pb::MtlsMode::Strict,
        }
    }
}

/// Where API keys named by `secretRef` come from.
pub trait SecretSource {
    /// Client id → key bytes of the Secret `name` in `namespace`.
    fn api_keys(&self, namespace: &str, name: &str) -> Result<Vec<(String, Vec<u8>)>, String>;
}

/// For tools that compile without access to Secrets: any `secretRef` is an error.
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn api_keys(&self, namespace: &str, name: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        Err(format!("Secret {namespace}/{name} is not available here"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{policy}: {message}")]
    Policy { policy: String, message: String },
    #[error("{0}")]
    Conflict(String),
}

/// Whether `policy` applies to `workload`: same namespace, selector
/// matches, and the ports overlap (a policy without ports covers all).
pub fn selects(policy: &ApiSecurityPolicy, workload: &Workload) -> bool {
    policy.metadata.namespace.as_deref().unwrap_or("default") == workload.namespace
        && policy
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &workload.labels))
        && (policy.spec.ports.is_empty()
            || workload.ports.is_empty()
            || policy
                .spec
                .port_numbers()
                .any(|p| workload.ports.contains(&p)))
}

/// Kubernetes label selector semantics: every `matchLabels` pair and every
/// expression must hold; an empty selector matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // Unknown operators select nothing rather than everything.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

fn policy_key(p: &ApiSecurityPolicy) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// Compiles every policy of `policies` that selects `workload` (the others
/// are ignored). Policies are assumed validated.
pub fn compile_workload(
    policies: &[ApiSecurityPolicy],
    workload: &Workload,
    mesh: &MeshConfig,
    secrets: &dyn SecretSource,
) -> Result<pb::WorkloadPolicy, CompileError> {
    let selected: Vec<&ApiSecurityPolicy> =
        policies.iter().filter(|p| selects(p, workload)).collect();
    compile_selected(selected, workload, mesh, secrets)
}

/// One policy on its own, for any workload it could select, with Secrets
/// read as empty: what validation asks the engine about.
pub(crate) fn compile_alone(
    policy: &ApiSecurityPolicy,
) -> Result<pb::WorkloadPolicy, CompileError> {
    struct EmptySecrets;
    impl SecretSource for EmptySecrets {
        fn api_keys(&self, _: &str, _: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
            Ok(Vec::new())
        }
    }
    let workload = Workload {
        namespace: policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        service_account: "default".into(),
        ..Workload::default()
    };
    compile_selected(
        vec![policy],
        &workload,
        &MeshConfig::default(),
        &EmptySecrets,
    )
}

fn compile_selected(
    mut selected: Vec<&ApiSecurityPolicy>,
    workload: &Workload,
    mesh: &MeshConfig,
    secrets: &dyn SecretSource,
) -> Result<pb::WorkloadPolicy, CompileError> {
    selected.sort_by_key(|p| policy_key(p));

    let mut out = pb::WorkloadPolicy {
        workload: format!(
            "spiffe://{}/ns/{}/sa/{}",
            mesh.trust_domain, workload.namespace, workload.service_account
        ),
        trust_domain: mesh.trust_domain.clone(),
        default_action: mesh.default_action as i32,
        ..Default::default()
    };
    let mut audit = pb::AuditConfig::default();
    let mut redact: BTreeSet<String> = [
        "authorization",
        "cookie",
        "set-cookie",
        "proxy-authorization",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut trusted: BTreeSet<String> = BTreeSet::new();
    let mut api_key_header: Option<(String, String)> = None;
    let mut api_keys: Vec<pb::ApiKeyHash> = Vec::new();
    let mut port_votes = PortVotes::default();
    let mut http = HttpOptionVotes::default();

    for policy in &selected {
        let key = policy_key(policy);
        let spec = &policy.spec;
        let audit_only = spec.mode == PolicyMode::Audit;
        let port_numbers: Vec<u16> = spec.port_numbers().collect();
        let ports: Vec<u32> = port_numbers.iter().map(|&p| u32::from(p)).collect();
        out.sources
            .push(format!("{key}@{}", policy.metadata.generation.unwrap_or(0)));
        let err = |message: String| CompileError::Policy {
            policy: key.clone(),
            message,
        };

        // Which connections are accepted, and how they are read, is
        // enforcement: an audit-mode policy has no say in it.
        if !audit_only {
            if let Some(mode) = spec.mtls {
                port_votes.vote_mtls(&port_numbers, mode);
            }
            for entry in &spec.ports {
                if let Some(protocol) = entry.protocol() {
                    port_votes.vote_protocol(entry.number(), protocol);
                }
            }
            if let Some(options) = &spec.http {
                http.vote(options);
            }
        }
        // An audit-mode policy must not change what is enforced, and which
        // credentials are verified (and refused with 401) is enforcement.
        if let Some(auth) = spec.authentication.as_ref().filter(|_| !audit_only) {
            for (i, jwt) in auth.jwt.iter().enumerate() {
                out.jwt_providers
                    .push(compile_jwt(&format!("{key}/jwt[{i}]"), jwt));
            }
            if let Some(keys) = &auth.api_keys {
                let header = keys
                    .header
                    .as_deref()
                    .unwrap_or("x-api-key")
                    .to_ascii_lowercase();
                match &api_key_header {
                    Some((other, h)) if *h != header => {
                        return Err(CompileError::Conflict(format!(
                            "policies {other} and {key} read API keys from different headers ({h} and {header})"
                        )));
                    }
                    _ => api_key_header = Some((key.clone(), header.clone())),
                }
                redact.insert(header);
                for k in &keys.keys {
                    let hash = hex::decode(&k.sha256)
                        .map_err(|_| err(format!("key of client {} is not hex", k.client_id)))?;
                    api_keys.push(pb::ApiKeyHash {
                        client_id: k.client_id.clone(),
                        sha256: hash,
                    });
                }
                if let Some(secret) = &keys.secret_ref {
                    let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
                    for (client, key_bytes) in
                        secrets.api_keys(namespace, &secret.name).map_err(err)?
                    {
                        api_keys.push(pb::ApiKeyHash {
                            client_id: client,
                            sha256: Sha256::digest(&key_bytes).to_vec(),
                        });
                    }
                }
            }
        }
        let role_base = out.roles.len();
        let role_index: BTreeMap<&str, u32> = spec
            .roles
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), (role_base + i) as u32))
            .collect();
        for role in &spec.roles {
            out.roles.push(pb::Role {
                id: format!("{key}/roles/{}", role.name),
                principals: role.principals.clone(),
                namespaces: role.namespaces.clone(),
                claims: compile_claims(&role.claims),
                api_key_clients: role.api_key_clients.clone(),
            });
        }
        for (i, route) in spec.routes.iter().enumerate() {
            let id = match &route.name {
                Some(name) => format!("{key}/routes/{name}"),
                None => format!("{key}/routes[{i}]"),
            };
            out.routes
                .push(compile_route(&id, route, audit_only, &ports, &role_index).map_err(err)?);
        }
        if let Some(f) = &spec.ip_filter {
            trusted.extend(f.trusted_proxies.iter().cloned());
            if !f.allow.is_empty() || !f.deny.is_empty() {
                out.ip_filters.push(pb::IpFilter {
                    id: format!("{key}/ipFilter"),
                    audit_only,
                    ports: ports.clone(),
                    allow: f.allow.clone(),
                    deny: f.deny.clone(),
                });
            }
        }
        if let Some(a) = &spec.audit {
            audit.sample_percent = audit.sample_percent.max(a.sample_percent.unwrap_or(0));
            redact.extend(a.redact_headers.iter().map(|h| h.to_ascii_lowercase()));
        }
    }

    if let Some((_, header)) = api_key_header {
        api_keys.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out.api_keys = Some(pb::ApiKeyAuth {
            header,
            keys: api_keys,
        });
    }
    audit.redact_headers = redact.into_iter().collect();
    out.audit = Some(audit);
    out.trusted_proxies = trusted.into_iter().collect();
    let (default_mtls, ports) = port_votes.resolve(mesh.default_mtls, &workload.ports);
    out.default_mtls = default_mtls as i32;
    out.ports = ports;
    out.http = http.resolve();
    out.version = content_version(&out);
    Ok(out)
}

/// A short hash of the compiled content: equal content, equal version.
fn content_version(policy: &pb::WorkloadPolicy) -> String {
    let digest = Sha256::digest(policy.encode_to_vec());
    hex::encode(&digest[..8])
}

/// mTLS and protocol per port. When policies disagree, `strict` wins for
/// mTLS and HTTP wins over `tcp` (a port is never made opaque because one
/// policy said so while another reads HTTP on it).
#[derive(Default)]
struct PortVotes {
    every_port: Option<MtlsMode>,
    per_port: BTreeMap<u16, MtlsMode>,
    protocols: BTreeMap<u16, PortProtocol>,
}

fn stricter(a: Option<MtlsMode>, b: MtlsMode) -> MtlsMode {
    match (a, b) {
        (Some(MtlsMode::Strict), _) | (_, MtlsMode::Strict) => MtlsMode::Strict,
        _ => MtlsMode::Permissive,
    }
}

/// HTTP over gRPC (gRPC is a kind of HTTP), both over `tcp`.
fn wider_protocol(a: Option<PortProtocol>, b: PortProtocol) -> PortProtocol {
    match (a, b) {
        (Some(PortProtocol::Http), _) | (_, PortProtocol::Http) => PortProtocol::Http,
        (Some(PortProtocol::Grpc), _) | (_, PortProtocol::Grpc) => PortProtocol::Grpc,
        _ => PortProtocol::Tcp,
    }
}

impl PortVotes {
    fn vote_mtls(&mut self, ports: &[u16], mode: MtlsMode) {
        if ports.is_empty() {
            self.every_port = Some(stricter(self.every_port, mode));
        } else {
            for p in ports {
                let current = self.per_port.get(p).copied();
                self.per_port.insert(*p, stricter(current, mode));
            }
        }
    }

    fn vote_protocol(&mut self, port: u16, protocol: PortProtocol) {
        let current = self.protocols.get(&port).copied();
        self.protocols
            .insert(port, wider_protocol(current, protocol));
    }

    fn resolve(
        &self,
        mesh_default: pb::MtlsMode,
        workload_ports: &[u16],
    ) -> (pb::MtlsMode, Vec<pb::PortPolicy>) {
        let to_wire = |m: MtlsMode| match m {
            MtlsMode::Strict => pb::MtlsMode::Strict,
            MtlsMode::Permissive => pb::MtlsMode::Permissive,
        };
        let default = self.every_port.map_or(mesh_default, to_wire);
        let listed: BTreeSet<u16> = self
            .per_port
            .keys()
            .chain(self.protocols.keys())
            .copied()
            .filter(|p| workload_ports.is_empty() || workload_ports.contains(p))
            .collect();
        let ports = listed
            .into_iter()
            .map(|p| {
                // A port-specific permissive cannot loosen a strict all-ports
                // vote; a port listed only for its protocol keeps the default.
                let mtls = self
                    .per_port
                    .get(&p)
                    .map_or(default, |m| to_wire(stricter(self.every_port, *m)));
                let protocol = match self.protocols.get(&p) {
                    None => pb::PortProtocol::Unspecified,
                    Some(PortProtocol::Http) => pb::PortProtocol::Http,
                    Some(PortProtocol::Grpc) => pb::PortProtocol::Grpc,
                    Some(PortProtocol::Tcp) => pb::PortProtocol::Tcp,
                };
                pb::PortPolicy {
                    port: u32::from(p),
                    mtls: mtls as i32,
                    protocol: protocol as i32,
                }
            })
            .collect();
        (default, ports)
    }
}

/// `spec.http` of every enforced policy: an opt-out holds when some policy
/// asks for it and none insists on the strict default.
#[derive(Default)]
struct HttpOptionVotes {
    path_parameters: (bool, bool),
    underscore_headers: (bool, bool),
}

impl HttpOptionVotes {
    fn vote(&mut self, options: &HttpOptionsSpec) {
        match options.path_parameters {
            Some(PathParameters::Allow) => self.path_parameters.0 = true,
            Some(PathParameters::Reject) => self.path_parameters.1 = true,
            None => {}
        }
        match options.headers_with_underscores {
            Some(UnderscoreHeaders::Drop) => self.underscore_headers.0 = true,
            Some(UnderscoreHeaders::Reject) => self.underscore_headers.1 = true,
            None => {}
        }
    }

    fn resolve(&self) -> Option<pb::HttpOptions> {
        let holds = |(relaxed, strict): (bool, bool)| relaxed && !strict;
        let options = pb::HttpOptions {
            allow_path_parameters: holds(self.path_parameters),
            drop_underscore_headers: holds(self.underscore_headers),
        };
        (options != pb::HttpOptions::default()).then_some(options)
    }
}

fn compile_jwt(id: &str, jwt: &JwtIssuer) -> pb::JwtProvider {
    let header = jwt
        .from_header
        .as_deref()
        .unwrap_or("authorization")
        .to_ascii_lowercase();
    let prefix = jwt.prefix.clone().unwrap_or_else(|| {
        if header == "authorization" {
            "Bearer ".into()
        } else {
            String::new()
        }
    });
    let algorithms = if jwt.algorithms.is_empty() {
        vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
    } else {
        jwt.algorithms.iter().map(|a| format!("{a:?}")).collect()
    };
    pb::JwtProvider {
        id: id.into(),
        issuer: jwt.issuer.clone(),
        audiences: jwt.audiences.clone(),
        keys: match (&jwt.jwks_uri, &jwt.jwks) {
            (Some(uri), _) => Some(pb::jwt_provider::Keys::JwksUri(uri.clone())),
            (None, Some(inline)) => Some(pb::jwt_provider::Keys::JwksJson(inline.clone())),
            (None, None) => None,
        },
        header,
        prefix,
        leeway_seconds: jwt.leeway_seconds.unwrap_or(30),
        algorithms,
    }
}

fn compile_claims(claims: &[ClaimMatchSpec]) -> Vec<pb::ClaimMatch> {
    claims
        .iter()
        .map(|c| pb::ClaimMatch {
            name: c.name.clone(),
            values: c.values.clone(),
        })
        .collect()
}

fn compile_route(
    id: &str,
    route: &RouteSpec,
    audit_only: bool,
    ports: &[u32],
    roles: &BTreeMap<&str, u32>,
) -> Result<pb::Route, String> {
    let m = route.match_.clone().unwrap_or_default();
    let path = m.path.as_ref().map(|p| pb::PathMatch {
        kind: match (&p.exact, &p.template, &p.prefix) {
            (Some(e), _, _) => Some(pb::path_match::Kind::Exact(e.clone())),
            (_, Some(t), _) => Some(pb::path_match::Kind::Template(t.clone())),
            (_, _, Some(p)) => Some(pb::path_match::Kind::Prefix(p.clone())),
            _ => None,
        },
    });
    let headers = m
        .headers
        .iter()
        .map(|h| pb::HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            kind: match (&h.exact, &h.prefix, h.present) {
                (Some(e), _, _) => Some(pb::header_match::Kind::Exact(e.clone())),
                (_, Some(p), _) => Some(pb::header_match::Kind::Prefix(p.clone())),
                (_, _, Some(b)) => Some(pb::header_match::Kind::Present(b)),
                _ => None,
            },
        })
        .collect();
    let hosts = m
        .hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let rules = |kind: &str, rules: &[RuleSpec]| -> Result<Vec<pb::Rule>, String> {
        rules
            .iter()
            .enumerate()
            .map(|(j, r)| {
                let rule_id = match &r.name {
                    Some(name) => format!("{id}/{kind}/{name}"),
                    None => format!("{id}/{kind}[{j}]"),
                };
                compile_rule(rule_id, r, roles)
            })
            .collect()
    };
    let rate_limit = route
        .rate_limit
        .as_ref()
        .map(|rl| compile_rate_limit(&format!("{id}/rateLimit"), rl))
        .transpose()?;
    let validation = route
        .validation
        .as_ref()
        .map(|v| -> Result<pb::Validation, String> {
            Ok(pb::Validation {
                max_body_bytes: v.max_body_bytes.unwrap_or(0),
                content_types: v.content_types.clone(),
                json_schema: match &v.json_schema {
                    Some(s) => serde_json::to_string(s).map_err(|e| e.to_string())?,
                    None => String::new(),
                },
            })
        })
        .transpose()?;
    let response = route.response.as_ref().map(|r| pb::ResponseRules {
        redact: r.redact.clone(),
        mask: r
            .mask
            .iter()
            .map(|m| pb::MaskRule {
                pointer: m.pointer.clone(),
                show_last: m.show_last.unwrap_or(0),
            })
            .collect(),
    });
    let deprecation = route
        .deprecation
        .as_ref()
        .map(|d| -> Result<pb::Deprecation, String> {
            let ts = |v: &Option<String>| -> Result<i64, String> {
                v.as_ref().map_or(Ok(0), |t| {
                    t.parse::<jiff::Timestamp>()
                        .map(|t| t.as_second())
                        .map_err(|e| format!("{t:?}: {e}"))
                })
            };
            Ok(pb::Deprecation {
                deprecated_at: ts(&d.deprecated_at)?,
                sunset: ts(&d.sunset)?,
                link: d.link.clone().unwrap_or_default(),
                block_after_sunset: d.block_after_sunset,
            })
        })
        .transpose()?;
    Ok(pb::Route {
        id: id.into(),
        policy: id.split('/').take(2).collect::<Vec<_>>().join("/"),
        audit_only,
        ports: ports.to_vec(),
        path,
        methods: m.methods.iter().map(|m| m.0.clone()).collect(),
        headers,
        hosts,
        allow: rules("allow", &route.allow)?,
        deny: rules("deny", &route.deny)?,
        rate_limit,
        validation,
        response,
        deprecation,
    })
}

fn compile_rule(
    id: String,
    rule: &RuleSpec,
    roles: &BTreeMap<&str, u32>,
) -> Result<pb::Rule, String> {
    let role_ids = rule
        .roles
        .iter()
        .map(|r| {
            roles
                .get(r.as_str())
                .copied()
                .ok_or_else(|| format!("unknown role {r:?}"))
        })
        .collect::<Result<_, _>>()?;
    let conditions = rule
        .conditions
        .iter()
        .map(compile_condition)
        .collect::<Result<_, _>>()?;
    Ok(pb::Rule {
        id,
        roles: role_ids,
        principals: rule.principals.clone(),
        namespaces: rule.namespaces.clone(),
        api_key_clients: rule.api_key_clients.clone(),
        claims: compile_claims(&rule.claims),
        source_cidrs: rule.source_cidrs.clone(),
        conditions,
    })
}

fn compile_condition(c: &ConditionSpec) -> Result<pb::Condition, String> {
    use pb::condition::{Operator, Subject};
    if let Some(w) = &c.time_of_day {
        let minute = |v: &str| parse_time_of_day(v).ok_or_else(|| format!("{v:?} is not HH:MM"));
        return Ok(pb::Condition {
            subject: Subject::TimeOfDay as i32,
            start_minute: minute(&w.start)?,
            end_minute: minute(&w.end)?,
            weekdays: w.days.iter().map(|d| *d as u32 + 1).collect(),
            ..Default::default()
        });
    }
    let key = c.key.as_deref().unwrap_or_default();
    let (subject, name) = if key == "method" {
        (Subject::Method, String::new())
    } else if let Some(h) = key.strip_prefix("header:") {
        (Subject::Header, h.to_ascii_lowercase())
    } else if let Some(claim) = key.strip_prefix("claim:") {
        (Subject::Claim, claim.to_owned())
    } else {
        return Err(format!("unknown condition key {key:?}"));
    };
    let (operator, values) = match (&c.equals, &c.in_, &c.prefix) {
        (Some(v), _, _) => (Operator::Equals, vec![v.clone()]),
        (_, Some(vs), _) => (Operator::In, vs.clone()),
        (_, _, Some(p)) => (Operator::Prefix, vec![p.clone()]),
        _ => return Err("condition has no operator".into()),
    };
    Ok(pb::Condition {
        subject: subject as i32,
        name,
        operator: operator as i32,
        values,
        ..Default::default()
    })
}

fn compile_rate_limit(id: &str, rl: &RateLimitSpec) -> Result<pb::RateLimit, String> {
    use pb::rate_limit::{Algorithm, FailureMode as Fm, KeyKind, Scope};
    let period = parse_duration(&rl.period).map_err(|e| format!("{:?} {e}", rl.period))?;
    let (key, key_name) = match parse_rate_limit_key(&rl.key) {
        Some(ParsedKey::Principal) => (KeyKind::Principal, String::new()),
        Some(ParsedKey::SourceIp) => (KeyKind::SourceIp, String::new()),
        Some(ParsedKey::ApiKey) => (KeyKind::ApiKey, String::new()),
        Some(ParsedKey::Header(h)) => (KeyKind::Header, h.to_ascii_lowercase()),
        Some(ParsedKey::Claim(c)) => (KeyKind::Claim, c.to_owned()),
        None => return Err(format!("{:?} is not a rate-limit key", rl.key)),
    };
    Ok(pb::RateLimit {
        id: id.into(),
        algorithm: match rl.algorithm {
            RateLimitAlgorithm::TokenBucket => Algorithm::TokenBucket,
            RateLimitAlgorithm::FixedWindow => Algorithm::FixedWindow,
            RateLimitAlgorithm::SlidingWindow => Algorithm::SlidingWindow,
        } as i32,
        amount: rl.amount,
        period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
        burst: rl.burst.unwrap_or(0),
        key: key as i32,
        key_name,
        scope: match rl.scope {
            RateLimitScope::Local => Scope::Local,
            RateLimitScope::Global => Scope::Global,
        } as i32,
        failure_mode: match rl.failure_mode.unwrap_or_default() {
            FailureMode::Closed => Fm::Closed,
            FailureMode::Open => Fm::Open,
        } as i32,
        max_keys: rl.max_keys.unwrap_or(100_000),
    })
}

#[cfg(test)]
mod tests;
