//! The `ApiSecurityPolicy` custom resource (group `palisade.dev`, version
//! `v1alpha1`), exactly as users write it. Field reference: `docs/policy.md`.
//!
//! The schema generated from these types is what the API server enforces at
//! `kubectl apply` time, so simple value rules (patterns, ranges, enums) live
//! here as schema attributes and cross-field rules as CEL (`x_kube`).
//! Everything the schema cannot express is checked by [`crate::validate`].

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration such as `500ms`, `1s`, `1m30s`, `1h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// `HH:MM`, 24-hour clock.
pub const TIME_OF_DAY_PATTERN: &str = r"^([01][0-9]|2[0-3]):[0-5][0-9]$";
/// A rate-limit key: `principal`, `sourceIp`, `apiKey`, `header:<name>` or `claim:<name>`.
pub const RATE_LIMIT_KEY_PATTERN: &str =
    r"^(principal|sourceIp|apiKey|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|claim:[A-Za-z0-9_.:-]+)$";
/// A condition key: `method`, `header:<name>` or `claim:<name>`.
pub const CONDITION_KEY_PATTERN: &str =
    r"^(method|header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|claim:[A-Za-z0-9_.:-]+)$";
/// A DNS-label style name used for routes, roles and rules.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// An HTTP method token, upper case.
pub const METHOD_PATTERN: &str = r"^[A-Z]+$";
/// An HTTP header field name.
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// Declares how Palisade secures the workloads it selects.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "palisade.dev",
    version = "v1alpha1",
    kind = "ApiSecurityPolicy",
    plural = "apisecuritypolicies",
    singular = "apisecuritypolicy",
    shortname = "asp",
    namespaced,
    status = "ApiSecurityPolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiSecurityPolicySpec {
    /// Workloads (pods) in this namespace that the policy applies to, by
    /// label. Absent selects every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Application ports the policy applies to, each a number (`8080`) or
    /// a number with its protocol (`{port: 5432, protocol: tcp}`). Empty:
    /// every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Vec<PortSpec>,
    /// `enforce` (default) blocks; `audit` only records what it would have done.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Mutual TLS requirement for the selected ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// How callers prove who they are beyond their mesh identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Named sets of callers (RBAC), referenced by `allow`/`deny` rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub roles: Vec<RoleSpec>,
    /// What may be called, by whom, how often and with what payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub routes: Vec<RouteSpec>,
    /// Source address allow and deny lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_filter: Option<IpFilterSpec>,
    /// What gets reported to the audit collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
    /// Opt-outs of the strict request checks, for apps that need them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpOptionsSpec>,
}

impl ApiSecurityPolicySpec {
    /// The port numbers of `ports`, in order.
    pub fn port_numbers(&self) -> impl Iterator<Item = PortNumber> + '_ {
        self.ports.iter().map(PortSpec::number)
    }
}

/// A TCP port number.
pub type PortNumber = u16;

/// One entry of `spec.ports`: a bare number, or a number with the port's
/// application protocol.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    Number(PortNumber),
    Declared(DeclaredPort),
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeclaredPort {
    pub port: PortNumber,
    /// Absent: HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PortProtocol>,
}

/// What a port speaks. `http` (the default) and `grpc` are proxied as HTTP
/// with every rule; `tcp` is proxied opaquely with identity-level rules
/// only, and only when no route gives the port HTTP rules.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PortProtocol {
    Http,
    Grpc,
    Tcp,
}

impl PortSpec {
    pub fn number(&self) -> PortNumber {
        match self {
            PortSpec::Number(p) => *p,
            PortSpec::Declared(d) => d.port,
        }
    }

    /// The declared protocol; `None` for a bare number.
    pub fn protocol(&self) -> Option<PortProtocol> {
        match self {
            PortSpec::Number(_) => None,
            PortSpec::Declared(d) => d.protocol,
        }
    }
}

impl From<PortNumber> for PortSpec {
    fn from(port: PortNumber) -> Self {
        PortSpec::Number(port)
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand rather than `untagged`, so a bad entry gets a message that
        // says what is expected instead of "did not match any variant".
        let value = serde_json::Value::deserialize(deserializer)?;
        parse_port_entry(&value).map_err(serde::de::Error::custom)
    }
}

/// Reads one `spec.ports` entry, or says what is wrong with it.
pub fn parse_port_entry(value: &serde_json::Value) -> Result<PortSpec, String> {
    use serde_json::Value;
    let number = |v: &Value| -> Result<PortNumber, String> {
        v.as_u64()
            .and_then(|n| PortNumber::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("{v} is not a port number (1-65535)"))
    };
    match value {
        Value::Number(_) => number(value).map(PortSpec::Number),
        Value::Object(map) => {
            if let Some(field) = map.keys().find(|k| *k != "port" && *k != "protocol") {
                return Err(format!(
                    "{field:?} is not a field of a port entry (port, protocol)"
                ));
            }
            let port = map
                .get("port")
                .ok_or_else(|| "a port entry needs `port`".to_owned())
                .and_then(number)?;
            let protocol = match map.get("protocol") {
                None => None,
                Some(p) => Some(
                    serde_json::from_value::<PortProtocol>(p.clone())
                        .map_err(|_| format!("protocol {p} is not http, grpc or tcp"))?,
                ),
            };
            Ok(PortSpec::Declared(DeclaredPort { port, protocol }))
        }
        other => Err(format!(
            "{other} is not a port number or {{port, protocol}}"
        )),
    }
}

/// `spec.ports`: integers or `{port, protocol}` objects. A structural
/// schema cannot say "integer or object", so each item preserves what it is
/// given and Palisade's own validation ([`parse_port_entry`]) checks it.
fn ports_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": {
            "description": "A port number (1-65535), or {port: <number>, protocol: http | grpc | tcp}. Default protocol: http.",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

/// Opt-outs of the strict defaults of request handling. Where several
/// policies select a workload, an opt-out holds only if no policy sets the
/// strict value explicitly.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpOptionsSpec {
    /// `reject` (default): a path containing `;` is refused with 400, since
    /// Java-style back ends strip `;` parameters before routing and would
    /// serve a different path than policy matched. `allow`: `;` is matched
    /// as part of its segment (still refused in `.;` and `..;` segments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_parameters: Option<PathParameters>,
    /// `reject` (default): a header name containing `_` is refused with 400
    /// (CGI-style back ends read `x_user` as `X-User`). `drop`: such headers
    /// are removed before anything reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_with_underscores: Option<UnderscoreHeaders>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PathParameters {
    Reject,
    Allow,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum UnderscoreHeaders {
    Reject,
    Drop,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    /// Only mutually authenticated mesh peers may connect.
    Strict,
    /// Plaintext connections are accepted too (migration aid).
    Permissive,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authentication {
    /// JSON Web Token issuers whose tokens are accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub jwt: Vec<JwtIssuer>,
    /// API keys, identified by client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeys>,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.jwksUri) != has(self.jwks)").message("set exactly one of jwksUri and jwks"))]
pub struct JwtIssuer {
    /// The `iss` claim value tokens must carry.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. Empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// HTTPS URL of the issuer's JSON Web Key Set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub jwks_uri: Option<String>,
    /// Inline JSON Web Key Set (public keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Header the token is read from. Default `Authorization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = HEADER_NAME_PATTERN))]
    pub from_header: Option<String>,
    /// Text before the token in that header. Default `Bearer ` for `Authorization`, empty otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 300))]
    pub leeway_seconds: Option<u32>,
    /// Accepted signature algorithms. Default all of RS256, ES256, EdDSA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<JwtAlgorithm>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    RS256,
    ES256,
    EdDSA,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.secretRef) || (has(self.keys) && size(self.keys) > 0)").message("set secretRef or keys"))]
pub struct ApiKeys {
    /// Header carrying the key. Default `X-API-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = HEADER_NAME_PATTERN))]
    pub header: Option<String>,
    /// A Secret in the policy's namespace whose data maps client id → key.
    /// The operator hashes the keys; agents only ever see the hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Keys given as SHA-256 hashes (hex), for use without a Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<HashedApiKey>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashedApiKey {
    #[schemars(length(min = 1, max = 253))]
    pub client_id: String,
    /// Lower-case hex SHA-256 of the key.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

/// A named set of callers. A request holds the role when it matches any
/// entry of any field.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleSpec {
    #[schemars(regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// SPIFFE IDs of mesh peers; a trailing `*` matches any suffix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Namespaces of mesh peers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// JWT claims; the claim (or any element of an array claim) must be one of the values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatchSpec>,
    /// API-key client ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_key_clients: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimMatchSpec {
    /// Claim name; dots address nested objects (`realm_access.roles`).
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// Optional name, used in decisions and audit events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NAME_PATTERN))]
    pub name: Option<String>,
    /// Which requests the route covers. Absent: every request.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "match")]
    pub match_: Option<RouteMatch>,
    /// If any allow rule exists for a port, a request must match one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allow: Vec<RuleSpec>,
    /// A request matching any deny rule is refused, whatever else allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub deny: Vec<RuleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation: Option<DeprecationSpec>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchSpec>,
    /// Upper-case methods. Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Every listed header must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatchSpec>,
    /// `Host`/`:authority` values, compared case-insensitively, port and
    /// trailing dot ignored. Empty: every host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// An HTTP method; upper case.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct HttpMethod(#[schemars(regex(pattern = METHOD_PATTERN))] pub String);

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.template), has(self.prefix)].filter(x, x).size() == 1").message("set exactly one of exact, template and prefix"))]
pub struct PathMatchSpec {
    /// The whole normalized path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub exact: Option<String>,
    /// A path whose `{name}` segments match any one segment: `/orders/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub template: Option<String>,
    /// A segment-aware prefix: `/api` matches `/api` and `/api/…`, not `/apix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub prefix: Option<String>,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.prefix), has(self.present)].filter(x, x).size() == 1").message("set exactly one of exact, prefix and present"))]
pub struct HeaderMatchSpec {
    #[schemars(regex(pattern = HEADER_NAME_PATTERN))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// An allow or deny rule. Every field that is set must match (AND); within
/// a list any entry may match (OR). A rule with no field matches every request.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Optional name, reported as the deciding rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NAME_PATTERN))]
    pub name: Option<String>,
    /// Names of roles of this policy; holding any of them matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// SPIFFE IDs of mesh peers; a trailing `*` matches any suffix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_key_clients: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatchSpec>,
    /// Client address ranges (CIDR or single address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
    /// Attribute conditions; every one must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ConditionSpec>,
}

/// An attribute (ABAC) condition: a subject (`key` or `timeOfDay`) and,
/// for a key, one operator.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.key) != has(self.timeOfDay)").message("set exactly one of key and timeOfDay"))]
#[x_kube(validation = Rule::new("has(self.timeOfDay) || [has(self.equals), has(self.in), has(self.prefix)].filter(x, x).size() == 1").message("set exactly one of equals, in and prefix"))]
pub struct ConditionSpec {
    /// `method`, `header:<name>` (every value, repeated or comma-joined, is
    /// checked) or `claim:<name>` (every element of an array claim is checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CONDITION_KEY_PATTERN))]
    pub key: Option<String>,
    /// A daily window in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_of_day: Option<TimeWindowSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "in")]
    pub in_: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeWindowSpec {
    /// `HH:MM` UTC, inclusive.
    #[schemars(regex(pattern = TIME_OF_DAY_PATTERN))]
    pub start: String,
    /// `HH:MM` UTC, exclusive; earlier than `start` wraps past midnight.
    #[schemars(regex(pattern = TIME_OF_DAY_PATTERN))]
    pub end: String,
    /// Days the window is open. Empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitAlgorithm {
    #[default]
    TokenBucket,
    FixedWindow,
    SlidingWindow,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    /// Each agent counts on its own.
    #[default]
    Local,
    /// All agents of the mesh share one count in Redis.
    Global,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Deny when the shared store cannot be reached.
    #[default]
    Closed,
    /// Admit when the shared store cannot be reached.
    Open,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    #[serde(default)]
    pub algorithm: RateLimitAlgorithm,
    /// Requests admitted per period.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub amount: u64,
    /// e.g. `1s`, `1m`, `1h`.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub period: String,
    /// Token bucket capacity. Default `amount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub burst: Option<u64>,
    /// What the limit counts per: `principal`, `sourceIp`, `apiKey`,
    /// `header:<name>` or `claim:<name>`.
    #[serde(default = "default_rate_limit_key")]
    #[schemars(regex(pattern = RATE_LIMIT_KEY_PATTERN))]
    pub key: String,
    #[serde(default)]
    pub scope: RateLimitScope,
    /// What a `global` limit does when Redis cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// Distinct keys one agent tracks for this limit. Default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_keys: Option<u32>,
}

fn default_rate_limit_key() -> String {
    "sourceIp".to_owned()
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValidationSpec {
    /// Largest request body accepted, in bytes (413 above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_073_741_824))]
    pub max_body_bytes: Option<u64>,
    /// Accepted media types, e.g. `application/json` or `text/*` (415 otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_types: Vec<String>,
    /// A JSON Schema the JSON body must satisfy (400 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub json_schema: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseSpec {
    /// JSON pointers removed from JSON responses (`*` = any element).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
    /// JSON pointers whose string values are masked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<MaskSpec>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaskSpec {
    #[schemars(regex(pattern = r"^/"))]
    pub pointer: String,
    /// Characters left visible at the end. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub show_last: Option<u32>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeprecationSpec {
    /// When the route was deprecated (RFC 3339); sent as the `Deprecation` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at: Option<String>,
    /// When the route goes away (RFC 3339); sent as the `Sunset` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<String>,
    /// Where to read about the replacement; sent as a `Link` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub link: Option<String>,
    /// Answer 410 Gone once `sunset` has passed.
    #[serde(default)]
    pub block_after_sunset: bool,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpFilterSpec {
    /// When set, the client address must be in one of these ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Client addresses refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Proxies whose `X-Forwarded-For` entries are believed. Without them
    /// the client address is the connection's peer address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSpec {
    /// Percentage of allowed requests reported (denials are always reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub sample_percent: Option<u32>,
    /// Headers never copied into audit events (beyond the built-in
    /// `authorization`, `cookie`, `set-cookie`, `proxy-authorization` and the API-key header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_headers: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiSecurityPolicyStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (validated) and `Programmed` (running in selected workloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Workloads the policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_workloads: Option<u32>,
    /// Of those, workloads that acknowledged this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_workloads: Option<u32>,
}

/// Schema for a free-form JSON object (a JSON Schema document).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The CRD as installed: the derived definition with integer formats that
/// the API server knows (`uint32` and friends are not OpenAPI formats).
pub fn custom_resource_definition() -> CustomResourceDefinition {
    let crd = <ApiSecurityPolicy as kube::CustomResourceExt>::crd();
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    use_openapi_formats(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn use_openapi_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(format)) = map.get("format") {
                let replacement = match format.as_str() {
                    "uint8" | "uint16" | "int8" | "int16" => Some("int32"),
                    "uint32" | "uint64" | "uint" => Some("int64"),
                    _ => None,
                };
                if let Some(r) = replacement {
                    map.insert("format".into(), r.into());
                }
            }
            map.values_mut().for_each(use_openapi_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(use_openapi_formats),
        _ => {}
    }
}

/// Labels of a workload, for selector matching.
pub type Labels = BTreeMap<String, String>;
