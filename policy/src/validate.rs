//! Validation of `ApiSecurityPolicy` documents, reporting every problem at
//! once with the field path and the offending value.
//!
//! Two passes: the CRD's own OpenAPI schema (what the API server enforces,
//! plus unknown-field detection), then the rules a schema cannot express
//! (references between fields, normalized paths, parsable CIDRs, compilable
//! JSON Schemas, dates in order, ...).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::OnceLock;

use serde_json::Value;

use crate::body::{BodySchema, media_type};
use crate::crd::*;
use crate::duration::parse_duration;
use crate::identity::check_principal_pattern;
use crate::masking::ResponseMask;
use crate::normalize::{NormalizeOptions, is_normalized, normalize_target};
use crate::path_index::{PathIndex, PathPattern};

/// One problem, at one field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FieldError {
    /// `spec.routes[2].rateLimit.period`
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of one document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Longest period a rate limit may have.
const MAX_PERIOD_MS: u128 = 24 * 3_600_000;

/// Validates a whole document (as parsed from YAML or JSON) and returns the
/// typed policy when it has no problem.
pub fn validate_document(doc: &Value) -> Result<ApiSecurityPolicy, ValidationErrors> {
    let mut errors = Vec::new();
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some("palisade.dev/v1alpha1") => {}
        other => errors.push(FieldError {
            path: "apiVersion".into(),
            message: format!("{} is not palisade.dev/v1alpha1", show_opt(other)),
        }),
    }
    match doc.get("kind").and_then(Value::as_str) {
        Some("ApiSecurityPolicy") => {}
        other => errors.push(FieldError {
            path: "kind".into(),
            message: format!("{} is not ApiSecurityPolicy", show_opt(other)),
        }),
    }
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if is_dns_subdomain(name) => {}
        other => errors.push(FieldError {
            path: "metadata.name".into(),
            message: format!(
                "{} is not a valid name (lower-case DNS subdomain)",
                show_opt(other)
            ),
        }),
    }
    let Some(spec) = doc.get("spec") else {
        errors.push(FieldError {
            path: "spec".into(),
            message: "is required".into(),
        });
        return Err(ValidationErrors(errors));
    };
    let (mut schema_errors, mut failed_pointers) = schema_check(spec);
    let (port_errors, port_pointers) = port_entry_check(spec);
    schema_errors.extend(port_errors);
    failed_pointers.extend(port_pointers);
    let mut typed = None;
    if failed_pointers.is_empty() {
        match serde_json::from_value::<ApiSecurityPolicy>(doc.clone()) {
            Ok(policy) => {
                errors.extend(validate_spec(&policy.spec));
                if errors.is_empty() {
                    errors.extend(check_declared_protocols(&policy));
                }
                typed = Some(policy);
            }
            Err(e) => errors.push(FieldError {
                path: "spec".into(),
                message: e.to_string(),
            }),
        }
    } else if let Some((pruned, cut_paths)) = prune_until_typed(spec, failed_pointers) {
        // Semantic checks still run on what is left, so one bad field does
        // not hide the others.
        errors.extend(
            validate_spec(&pruned)
                .into_iter()
                .filter(|e| !cut_paths.iter().any(|c| is_within(&e.path, c))),
        );
    }
    errors.extend(schema_errors);
    match typed {
        Some(p) if errors.is_empty() => Ok(p),
        _ => {
            errors.sort();
            errors.dedup();
            Err(ValidationErrors(errors))
        }
    }
}

/// Whether `path` is `prefix` or inside it (`spec.routes[1]` contains
/// `spec.routes[1].allow`, not `spec.routes[10]`).
fn is_within(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Removes (object members) or blanks (array elements) the failing nodes,
/// widening to their parents until the rest deserializes. Returns the typed
/// spec and the dotted paths that were cut.
fn prune_until_typed(
    spec: &Value,
    mut pointers: Vec<String>,
) -> Option<(ApiSecurityPolicySpec, Vec<String>)> {
    for _ in 0..8 {
        let mut pruned = spec.clone();
        for p in &pointers {
            cut(&mut pruned, p);
        }
        if let Ok(typed) = serde_json::from_value::<ApiSecurityPolicySpec>(pruned) {
            let cut_paths = pointers
                .iter()
                .map(|p| pointer_to_path("spec", p))
                .collect();
            return Some((typed, cut_paths));
        }
        // Every top-level field is optional, so cutting one always
        // deserializes; only deeper cuts may need to widen.
        let mut widened = false;
        for p in &mut pointers {
            if let Some((parent, _)) = p.rsplit_once('/')
                && !parent.is_empty()
            {
                *p = parent.to_owned();
                widened = true;
            }
        }
        if !widened {
            break;
        }
    }
    None
}

fn cut(root: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match root.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            // Blank rather than remove, so later indexes keep their paths.
            if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *item = Value::Object(Default::default());
            }
        }
        _ => {}
    }
}

/// The CRD schema of `spec`, made strict for linting: unknown fields are
/// errors (the API server would prune them silently) and OpenAPI's
/// `nullable` becomes a JSON Schema type union.
fn spec_validator() -> &'static Result<jsonschema::Validator, String> {
    static VALIDATOR: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let mut schema = spec_schema();
        make_strict(&mut schema);
        jsonschema::validator_for(&schema).map_err(|e| e.to_string())
    })
}

/// The `spec` property of the CRD's OpenAPI schema.
fn spec_schema() -> Value {
    let crd = custom_resource_definition();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null);
    schema
        .pointer("/properties/spec")
        .cloned()
        .unwrap_or(Value::Null)
}

fn make_strict(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    if map.get("nullable") == Some(&Value::Bool(true))
        && let Some(Value::String(t)) = map.get("type").cloned()
    {
        map.insert("type".into(), serde_json::json!([t, "null"]));
    }
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !preserve && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if preserve {
        // Free-form content (a JSON Schema): nothing below is checked here.
        map.remove("properties");
        return;
    }
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Value::Object(props) = value {
                    props.values_mut().for_each(make_strict);
                }
            }
            "items" | "additionalProperties" => make_strict(value),
            _ => {}
        }
    }
}

/// Schema errors, and the JSON pointers (below `spec`) of the failing nodes.
fn schema_check(spec: &Value) -> (Vec<FieldError>, Vec<String>) {
    let validator = match spec_validator() {
        Ok(v) => v,
        Err(e) => {
            let error = FieldError {
                path: "spec".into(),
                message: format!("internal: the CRD schema does not compile: {e}"),
            };
            return (vec![error], vec![String::new()]);
        }
    };
    let mut errors = Vec::new();
    let mut pointers = Vec::new();
    for e in validator.iter_errors(spec) {
        let at = e.instance_path().as_str().to_owned();
        match e.kind() {
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected {
                    let pointer = format!("{at}/{}", field.replace('~', "~0").replace('/', "~1"));
                    errors.push(FieldError {
                        path: pointer_to_path("spec", &pointer),
                        message: "is not a field of ApiSecurityPolicy (misspelt?)".into(),
                    });
                    pointers.push(pointer);
                }
            }
            kind => {
                let message = match kind {
                    jsonschema::error::ValidationErrorKind::Pattern { pattern } => {
                        pattern_message(pattern)
                            .map(|m| format!("{} {m}", e.instance()))
                            .unwrap_or_else(|| e.to_string())
                    }
                    _ => e.to_string(),
                };
                errors.push(FieldError {
                    path: pointer_to_path("spec", &at),
                    message,
                });
                pointers.push(at);
            }
        }
    }
    (errors, pointers)
}

/// `spec.ports` items, which the CRD schema leaves free (a structural schema
/// cannot say "integer or object"): each must be a port number or
/// `{port, protocol}`.
fn port_entry_check(spec: &Value) -> (Vec<FieldError>, Vec<String>) {
    let mut errors = Vec::new();
    let mut pointers = Vec::new();
    for (i, entry) in spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Err(message) = parse_port_entry(entry) {
            errors.push(FieldError {
                path: format!("spec.ports[{i}]"),
                message,
            });
            pointers.push(format!("/ports/{i}"));
        }
    }
    (errors, pointers)
}

/// A port declared `tcp` must not be given HTTP rules by the same policy:
/// the agent would treat it as HTTP (never opaque with rules switched off),
/// which is not what the author declared. The engine decides what makes a
/// port HTTP, so the policy is compiled alone and asked.
fn check_declared_protocols(policy: &ApiSecurityPolicy) -> Vec<FieldError> {
    let declared: Vec<(usize, u16)> = policy
        .spec
        .ports
        .iter()
        .enumerate()
        .filter(|(_, p)| p.protocol() == Some(PortProtocol::Tcp))
        .map(|(i, p)| (i, p.number()))
        .collect();
    if declared.is_empty() || policy.spec.mode == PolicyMode::Audit {
        return Vec::new();
    }
    let Ok(wire) = crate::compile::compile_alone(policy) else {
        // Compilation problems are reported by compilation itself.
        return Vec::new();
    };
    let Ok(engine) = crate::engine::PolicyEngine::load(wire) else {
        return Vec::new();
    };
    declared
        .into_iter()
        .filter_map(|(i, port)| {
            let route = engine.http_route_for(port)?;
            Some(FieldError {
                path: format!("spec.ports[{i}].protocol"),
                message: format!(
                    "port {port} is declared tcp, but route {route} gives it HTTP rules \
                     (a path, method, header or host match, a limit, body or response rules, \
                     or a rule on claims, API keys or request attributes); such a port is \
                     served as HTTP. Declare it http, or give the HTTP routes their own policy \
                     for the other ports"
                ),
            })
        })
        .collect()
}

/// Plain words for the patterns the CRD uses.
fn pattern_message(pattern: &str) -> Option<&'static str> {
    Some(match pattern {
        DURATION_PATTERN => {
            "is not a duration (a number with ms, s, m or h, e.g. 500ms, 1s, 1m30s)"
        }
        TIME_OF_DAY_PATTERN => "is not a time of day (HH:MM, UTC)",
        RATE_LIMIT_KEY_PATTERN => {
            "is not principal, sourceIp, apiKey, header:<name> or claim:<name>"
        }
        CONDITION_KEY_PATTERN => "is not method, header:<name> or claim:<name>",
        NAME_PATTERN => "is not a name (lower-case letters, digits and '-', at most 63)",
        METHOD_PATTERN => "is not an upper-case HTTP method",
        HEADER_NAME_PATTERN => "is not a header name",
        _ => return None,
    })
}

/// `/routes/2/rateLimit` → `spec.routes[2].rateLimit`.
fn pointer_to_path(root: &str, pointer: &str) -> String {
    let mut out = root.to_owned();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            out.push('.');
            out.push_str(&part);
        }
    }
    out
}

fn show_opt(v: Option<&str>) -> String {
    v.map_or_else(|| "(missing)".to_owned(), |s| format!("{s:?}"))
}

/// Collects errors with paths as it walks the spec.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// The rules the schema cannot express. Paths start at `spec`.
pub fn validate_spec(spec: &ApiSecurityPolicySpec) -> Vec<FieldError> {
    let mut c = Checker { errors: Vec::new() };
    let mut seen_ports = HashSet::new();
    for (i, p) in spec.port_numbers().enumerate() {
        if p == 0 {
            c.error(format!("spec.ports[{i}]"), "0 is not a port");
        } else if !seen_ports.insert(p) {
            c.error(format!("spec.ports[{i}]"), format!("{p} is listed twice"));
        }
    }
    if let Some(auth) = &spec.authentication {
        check_authentication(&mut c, auth);
    }
    let role_names = check_roles(&mut c, &spec.roles);
    let mut route_names = HashSet::new();
    for (i, route) in spec.routes.iter().enumerate() {
        let path = format!("spec.routes[{i}]");
        if let Some(name) = &route.name
            && !route_names.insert(name.as_str())
        {
            c.error(
                format!("{path}.name"),
                format!("{name:?} is used by another route"),
            );
        }
        check_route(
            &mut c,
            &path,
            route,
            &role_names,
            spec.authentication.as_ref(),
        );
    }
    if let Some(f) = &spec.ip_filter {
        check_cidrs(&mut c, "spec.ipFilter.allow", &f.allow);
        check_cidrs(&mut c, "spec.ipFilter.deny", &f.deny);
        check_cidrs(&mut c, "spec.ipFilter.trustedProxies", &f.trusted_proxies);
    }
    if let Some(a) = &spec.audit {
        for (i, h) in a.redact_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                c.error(
                    format!("spec.audit.redactHeaders[{i}]"),
                    format!("{h:?} is not a header name"),
                );
            }
        }
    }
    c.errors
}

fn check_authentication(c: &mut Checker, auth: &Authentication) {
    let mut issuers = HashSet::new();
    for (i, jwt) in auth.jwt.iter().enumerate() {
        let path = format!("spec.authentication.jwt[{i}]");
        if !issuers.insert(jwt.issuer.as_str()) {
            c.error(
                format!("{path}.issuer"),
                format!("{:?} is configured twice", jwt.issuer),
            );
        }
        match (&jwt.jwks_uri, &jwt.jwks) {
            (Some(_), Some(_)) | (None, None) => {
                c.error(path.clone(), "set exactly one of jwksUri and jwks");
            }
            (Some(uri), None) => check_jwks_uri(c, &format!("{path}.jwksUri"), uri),
            (None, Some(jwks)) => check_inline_jwks(c, &format!("{path}.jwks"), jwks),
        }
        if let Some(prefix) = &jwt.prefix
            && prefix.bytes().any(|b| b.is_ascii_control())
        {
            c.error(format!("{path}.prefix"), "contains a control character");
        }
        let mut algs = HashSet::new();
        for (j, alg) in jwt.algorithms.iter().enumerate() {
            if !algs.insert(*alg) {
                c.error(
                    format!("{path}.algorithms[{j}]"),
                    format!("{alg:?} is listed twice"),
                );
            }
        }
    }
    if let Some(keys) = &auth.api_keys {
        let path = "spec.authentication.apiKeys";
        if keys.secret_ref.is_none() && keys.keys.is_empty() {
            c.error(path, "set secretRef or keys");
        }
        let mut clients = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, k) in keys.keys.iter().enumerate() {
            if !clients.insert(k.client_id.as_str()) {
                c.error(
                    format!("{path}.keys[{i}].clientId"),
                    format!("{:?} is listed twice", k.client_id),
                );
            }
            if !hashes.insert(k.sha256.as_str()) {
                c.error(
                    format!("{path}.keys[{i}].sha256"),
                    "the same key is given to two clients",
                );
            }
        }
    }
}

/// A policy must never make the agent fetch keys over plaintext from
/// somewhere else; http:// is allowed only for loopback (local development).
fn check_jwks_uri(c: &mut Checker, path: &str, uri: &str) {
    let ok = if let Some(rest) = uri.strip_prefix("https://") {
        !rest.is_empty() && !rest.starts_with('/')
    } else if let Some(rest) = uri.strip_prefix("http://") {
        ["127.0.0.1", "localhost", "[::1]"].iter().any(|h| {
            rest.strip_prefix(h)
                .is_some_and(|r| r.is_empty() || r.starts_with(':') || r.starts_with('/'))
        })
    } else {
        false
    };
    if !ok {
        c.error(
            path,
            format!("{uri:?} is not an https:// URL (http:// only for loopback)"),
        );
    }
}

fn check_inline_jwks(c: &mut Checker, path: &str, jwks: &str) {
    let doc: Value = match serde_json::from_str(jwks) {
        Ok(v) => v,
        Err(e) => {
            c.error(path, format!("is not JSON: {e}"));
            return;
        }
    };
    let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
        c.error(path, "is not a JSON Web Key Set (no \"keys\" array)");
        return;
    };
    if keys.is_empty() {
        c.error(path, "has no keys");
    }
    for (i, key) in keys.iter().enumerate() {
        let kty = key.get("kty").and_then(Value::as_str);
        if !matches!(kty, Some("RSA" | "EC" | "OKP")) {
            c.error(
                format!("{path}.keys[{i}].kty"),
                format!("{} is not RSA, EC or OKP", show_opt(kty)),
            );
        }
        // Private parts in a policy would be a leaked secret.
        if ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|m| key.get(m).is_some())
        {
            c.error(
                format!("{path}.keys[{i}]"),
                "contains private key material; publish public keys only",
            );
        }
    }
}

fn check_roles<'a>(c: &mut Checker, roles: &'a [RoleSpec]) -> BTreeSet<&'a str> {
    let mut names = BTreeSet::new();
    for (i, role) in roles.iter().enumerate() {
        let path = format!("spec.roles[{i}]");
        if !names.insert(role.name.as_str()) {
            c.error(
                format!("{path}.name"),
                format!("{:?} is defined twice", role.name),
            );
        }
        if role.principals.is_empty()
            && role.namespaces.is_empty()
            && role.claims.is_empty()
            && role.api_key_clients.is_empty()
        {
            c.error(
                path.clone(),
                "has no members (set principals, namespaces, claims or apiKeyClients)",
            );
        }
        check_principals(c, &path, &role.principals);
        check_namespaces(c, &path, &role.namespaces);
        check_claims(c, &path, &role.claims);
    }
    names
}

fn check_principals(c: &mut Checker, path: &str, principals: &[String]) {
    for (j, p) in principals.iter().enumerate() {
        if let Err(e) = check_principal_pattern(p) {
            c.error(
                format!("{path}.principals[{j}]"),
                format!("{p:?} is not a SPIFFE ID pattern: {e}"),
            );
        }
    }
}

fn check_namespaces(c: &mut Checker, path: &str, namespaces: &[String]) {
    for (j, ns) in namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            c.error(
                format!("{path}.namespaces[{j}]"),
                format!("{ns:?} is not a namespace name"),
            );
        }
    }
}

fn check_claims(c: &mut Checker, path: &str, claims: &[ClaimMatchSpec]) {
    for (j, claim) in claims.iter().enumerate() {
        if claim.name.is_empty() {
            c.error(format!("{path}.claims[{j}].name"), "is empty");
        }
        if claim.values.is_empty() {
            c.error(format!("{path}.claims[{j}].values"), "is empty");
        }
    }
}

fn check_cidrs(c: &mut Checker, path: &str, cidrs: &[String]) {
    for (i, cidr) in cidrs.iter().enumerate() {
        let ok = cidr.parse::<ipnet::IpNet>().is_ok() || cidr.parse::<std::net::IpAddr>().is_ok();
        if !ok {
            c.error(
                format!("{path}[{i}]"),
                format!("{cidr:?} is not a CIDR or IP address"),
            );
        }
    }
}

fn check_route(
    c: &mut Checker,
    path: &str,
    route: &RouteSpec,
    roles: &BTreeSet<&str>,
    auth: Option<&Authentication>,
) {
    if route.allow.is_empty()
        && route.deny.is_empty()
        && route.rate_limit.is_none()
        && route.validation.is_none()
        && route.response.is_none()
        && route.deprecation.is_none()
    {
        c.error(
            path,
            "does nothing: set allow, deny, rateLimit, validation, response or deprecation",
        );
    }
    if let Some(m) = &route.match_ {
        check_match(c, &format!("{path}.match"), m);
    }
    for (kind, rules) in [("allow", &route.allow), ("deny", &route.deny)] {
        let mut names = HashSet::new();
        for (j, rule) in rules.iter().enumerate() {
            let rule_path = format!("{path}.{kind}[{j}]");
            if let Some(name) = &rule.name
                && !names.insert(name.as_str())
            {
                c.error(
                    format!("{rule_path}.name"),
                    format!("{name:?} is used by another rule"),
                );
            }
            check_rule(c, &rule_path, rule, roles);
        }
    }
    if let Some(rl) = &route.rate_limit {
        check_rate_limit(c, &format!("{path}.rateLimit"), rl, auth);
    }
    if let Some(v) = &route.validation {
        check_validation(c, &format!("{path}.validation"), v);
    }
    if let Some(r) = &route.response {
        let masks: Vec<(String, u32)> = r
            .mask
            .iter()
            .map(|m| (m.pointer.clone(), m.show_last.unwrap_or(0)))
            .collect();
        if r.redact.is_empty() && r.mask.is_empty() {
            c.error(format!("{path}.response"), "is empty: set redact or mask");
        }
        // Report the field of the pointer that fails, one by one.
        for (j, p) in r.redact.iter().enumerate() {
            if let Err(e) = ResponseMask::compile(std::slice::from_ref(p), &[]) {
                c.error(
                    format!("{path}.response.redact[{j}]"),
                    format!("{p:?}: {e}"),
                );
            }
        }
        for (j, m) in masks.iter().enumerate() {
            if let Err(e) = ResponseMask::compile(&[], std::slice::from_ref(m)) {
                c.error(
                    format!("{path}.response.mask[{j}].pointer"),
                    format!("{:?}: {e}", m.0),
                );
            }
        }
    }
    if let Some(d) = &route.deprecation {
        check_deprecation(c, &format!("{path}.deprecation"), d);
    }
}

fn check_match(c: &mut Checker, path: &str, m: &RouteMatch) {
    if let Some(p) = &m.path {
        let set = [&p.exact, &p.template, &p.prefix]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            c.error(
                format!("{path}.path"),
                "set exactly one of exact, template and prefix",
            );
        }
        let patterns = [
            (
                "exact",
                p.exact.as_ref().map(|v| PathPattern::Exact(v.clone())),
            ),
            (
                "template",
                p.template
                    .as_ref()
                    .map(|v| PathPattern::Template(v.clone())),
            ),
            (
                "prefix",
                p.prefix.as_ref().map(|v| PathPattern::Prefix(v.clone())),
            ),
        ];
        for (field, pattern) in patterns {
            let Some(pattern) = pattern else { continue };
            let text = match &pattern {
                PathPattern::Exact(t) | PathPattern::Template(t) | PathPattern::Prefix(t) => {
                    t.clone()
                }
            };
            let field_path = format!("{path}.path.{field}");
            if field != "template" && !is_normalized(&text) {
                let hint = match normalize_target(&text, &NormalizeOptions::default()) {
                    Ok(n) if n.query.is_none() => {
                        format!(" (requests are matched as {:?})", n.path)
                    }
                    _ => String::new(),
                };
                c.error(
                    field_path,
                    format!("{text:?} is not a normalized path{hint}"),
                );
                continue;
            }
            if let Err(e) = PathIndex::<()>::new().insert(pattern, ()) {
                c.error(field_path, format!("{text:?}: {e}"));
            }
        }
    }
    for (j, h) in m.headers.iter().enumerate() {
        let set = [h.exact.is_some(), h.prefix.is_some(), h.present.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            c.error(
                format!("{path}.headers[{j}]"),
                "set exactly one of exact, prefix and present",
            );
        }
        if h.name.eq_ignore_ascii_case("host") {
            c.error(
                format!("{path}.headers[{j}].name"),
                "match the host with `hosts`",
            );
        }
    }
    let mut methods = HashSet::new();
    for (j, m) in m.methods.iter().enumerate() {
        if !KNOWN_METHODS.contains(&m.0.as_str()) {
            c.error(
                format!("{path}.methods[{j}]"),
                format!("{:?} is not an HTTP method", m.0),
            );
        } else if !methods.insert(m.0.as_str()) {
            c.error(
                format!("{path}.methods[{j}]"),
                format!("{:?} is listed twice", m.0),
            );
        }
    }
    for (j, host) in m.hosts.iter().enumerate() {
        if !is_host_name(host) {
            c.error(
                format!("{path}.hosts[{j}]"),
                format!("{host:?} is not a host name"),
            );
        }
    }
}

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

fn check_rule(c: &mut Checker, path: &str, rule: &RuleSpec, roles: &BTreeSet<&str>) {
    for (k, role) in rule.roles.iter().enumerate() {
        if !roles.contains(role.as_str()) {
            let known = if roles.is_empty() {
                "this policy defines no roles".to_owned()
            } else {
                format!(
                    "roles: {}",
                    roles.iter().copied().collect::<Vec<_>>().join(", ")
                )
            };
            c.error(
                format!("{path}.roles[{k}]"),
                format!("{role:?} is not a role of this policy ({known})"),
            );
        }
    }
    check_principals(c, path, &rule.principals);
    check_namespaces(c, path, &rule.namespaces);
    check_claims(c, path, &rule.claims);
    check_cidrs(c, &format!("{path}.sourceCidrs"), &rule.source_cidrs);
    for (k, cond) in rule.conditions.iter().enumerate() {
        check_condition(c, &format!("{path}.conditions[{k}]"), cond);
    }
}

fn check_condition(c: &mut Checker, path: &str, cond: &ConditionSpec) {
    match (&cond.key, &cond.time_of_day) {
        (Some(key), None) => {
            let ops = [
                cond.equals.is_some(),
                cond.in_.is_some(),
                cond.prefix.is_some(),
            ];
            if ops.iter().filter(|b| **b).count() != 1 {
                c.error(path, "set exactly one of equals, in and prefix");
            }
            if cond.in_.as_ref().is_some_and(Vec::is_empty) {
                c.error(format!("{path}.in"), "is empty");
            }
            if key == "method" {
                let values = cond.equals.iter().chain(cond.in_.iter().flatten());
                for v in values {
                    if !KNOWN_METHODS.contains(&v.as_str()) {
                        c.error(path, format!("{v:?} is not an HTTP method"));
                    }
                }
            } else if !(key.starts_with("header:") || key.starts_with("claim:")) {
                c.error(
                    format!("{path}.key"),
                    format!("{key:?} is not method, header:<name> or claim:<name>"),
                );
            }
        }
        (None, Some(w)) => {
            for (field, v) in [("start", &w.start), ("end", &w.end)] {
                if parse_time_of_day(v).is_none() {
                    c.error(
                        format!("{path}.timeOfDay.{field}"),
                        format!("{v:?} is not HH:MM"),
                    );
                }
            }
            if w.start == w.end {
                c.error(
                    format!("{path}.timeOfDay"),
                    "start equals end: the window would be empty",
                );
            }
            if cond.equals.is_some() || cond.in_.is_some() || cond.prefix.is_some() {
                c.error(path, "timeOfDay takes no equals, in or prefix");
            }
        }
        _ => c.error(path, "set exactly one of key and timeOfDay"),
    }
}

/// `HH:MM` → minutes after midnight.
pub(crate) fn parse_time_of_day(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn check_rate_limit(
    c: &mut Checker,
    path: &str,
    rl: &RateLimitSpec,
    auth: Option<&Authentication>,
) {
    match parse_duration(&rl.period) {
        Err(e) => c.error(format!("{path}.period"), format!("{:?} {e}", rl.period)),
        Ok(d) if d.as_millis() == 0 => {
            c.error(format!("{path}.period"), format!("{:?} is zero", rl.period))
        }
        Ok(d) if d.as_millis() > MAX_PERIOD_MS => {
            c.error(
                format!("{path}.period"),
                format!("{:?} is longer than 24h", rl.period),
            );
        }
        Ok(_) => {}
    }
    if rl.amount == 0 {
        c.error(
            format!("{path}.amount"),
            "0 admits nothing; use a deny rule to block",
        );
    }
    if rl.burst.is_some() && rl.algorithm != RateLimitAlgorithm::TokenBucket {
        c.error(
            format!("{path}.burst"),
            "applies only to algorithm tokenBucket",
        );
    }
    if rl.failure_mode.is_some() && rl.scope != RateLimitScope::Global {
        c.error(
            format!("{path}.failureMode"),
            "applies only to scope global",
        );
    }
    match parse_rate_limit_key(&rl.key) {
        None => c.error(
            format!("{path}.key"),
            format!(
                "{:?} is not principal, sourceIp, apiKey, header:<name> or claim:<name>",
                rl.key
            ),
        ),
        Some(ParsedKey::ApiKey) if auth.and_then(|a| a.api_keys.as_ref()).is_none() => {
            c.error(
                format!("{path}.key"),
                "apiKey needs spec.authentication.apiKeys",
            );
        }
        Some(ParsedKey::Claim(_)) if auth.is_none_or(|a| a.jwt.is_empty()) => {
            c.error(
                format!("{path}.key"),
                format!("{:?} needs spec.authentication.jwt", rl.key),
            );
        }
        Some(_) => {}
    }
}

pub(crate) enum ParsedKey<'a> {
    Principal,
    SourceIp,
    ApiKey,
    Header(&'a str),
    Claim(&'a str),
}

pub(crate) fn parse_rate_limit_key(key: &str) -> Option<ParsedKey<'_>> {
    match key {
        "principal" => Some(ParsedKey::Principal),
        "sourceIp" => Some(ParsedKey::SourceIp),
        "apiKey" => Some(ParsedKey::ApiKey),
        _ => {
            if let Some(h) = key.strip_prefix("header:") {
                http::HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(|_| ParsedKey::Header(h))
            } else {
                key.strip_prefix("claim:")
                    .filter(|c| !c.is_empty())
                    .map(ParsedKey::Claim)
            }
        }
    }
}

fn check_validation(c: &mut Checker, path: &str, v: &ValidationSpec) {
    if v.max_body_bytes.is_none() && v.content_types.is_empty() && v.json_schema.is_none() {
        c.error(
            path,
            "is empty: set maxBodyBytes, contentTypes or jsonSchema",
        );
    }
    for (i, ct) in v.content_types.iter().enumerate() {
        let ok = media_type(ct).is_some_and(|m| m == ct.as_str());
        if !ok {
            c.error(
                format!("{path}.contentTypes[{i}]"),
                format!("{ct:?} is not a lower-case media type without parameters"),
            );
        }
    }
    if let Some(schema) = &v.json_schema {
        match serde_json::to_string(schema) {
            Ok(text) => {
                if let Err(e) = BodySchema::compile(&text) {
                    c.error(format!("{path}.jsonSchema"), e.to_string());
                }
            }
            Err(e) => c.error(format!("{path}.jsonSchema"), e.to_string()),
        }
    }
}

fn check_deprecation(c: &mut Checker, path: &str, d: &DeprecationSpec) {
    let parse = |c: &mut Checker, field: &str, v: &Option<String>| -> Option<jiff::Timestamp> {
        let text = v.as_ref()?;
        match text.parse::<jiff::Timestamp>() {
            Ok(t) => Some(t),
            Err(_) => {
                c.error(
                    format!("{path}.{field}"),
                    format!("{text:?} is not an RFC 3339 time"),
                );
                None
            }
        }
    };
    let deprecated = parse(c, "deprecatedAt", &d.deprecated_at);
    let sunset = parse(c, "sunset", &d.sunset);
    if let (Some(a), Some(b)) = (deprecated, sunset)
        && b <= a
    {
        c.error(format!("{path}.sunset"), "is not after deprecatedAt");
    }
    if d.block_after_sunset && d.sunset.is_none() {
        c.error(format!("{path}.blockAfterSunset"), "needs sunset");
    }
    if d.deprecated_at.is_none() && d.sunset.is_none() {
        c.error(path, "set deprecatedAt or sunset");
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        })
}

#[cfg(test)]
mod tests;
