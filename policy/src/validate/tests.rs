//! Each bad field is reported at its path, all at once, with the value.

use serde_json::{Value, json};

use super::*;
use crate::documents::parse_documents;

fn example(name: &str) -> Value {
    let path = format!("{}/../examples/policies/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse_documents(&text).expect("yaml").remove(0)
}

/// Sets the value at a JSON pointer, creating objects on the way.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, last) = pointer.rsplit_once('/').expect("pointer");
    let target = doc
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent}"));
    match target {
        Value::Object(m) => {
            m.insert(last.to_owned(), value);
        }
        Value::Array(a) => a[last.parse::<usize>().expect("index")] = value,
        _ => panic!("{parent} is a scalar"),
    }
}

fn errors_of(doc: &Value) -> Vec<FieldError> {
    validate_document(doc).expect_err("should be invalid").0
}

#[test]
fn the_examples_are_valid() {
    let dir = format!("{}/../examples/policies", env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in parse_documents(&text).expect("yaml") {
            if let Err(e) = validate_document(&doc) {
                panic!("{}: {e}", path.display());
            }
            count += 1;
        }
    }
    assert!(count >= 5, "only {count} example policies");
}

#[test]
fn each_bad_field_is_reported_at_its_path() {
    let cases: &[(&str, Value, &str, &str)] = &[
        (
            "/apiVersion",
            json!("palisade.dev/v1"),
            "apiVersion",
            "is not palisade.dev/v1alpha1",
        ),
        (
            "/metadata/name",
            json!("Orders_API"),
            "metadata.name",
            "not a valid name",
        ),
        (
            "/spec/mode",
            json!("enforcing"),
            "spec.mode",
            "\"enforcing\"",
        ),
        ("/spec/mtls", json!("optional"), "spec.mtls", "\"optional\""),
        (
            "/spec/ports/0",
            json!(0),
            "spec.ports[0]",
            "not a port number",
        ),
        (
            "/spec/ports/0",
            json!({"port": 5432, "protocol": "mysql"}),
            "spec.ports[0]",
            "is not http, grpc or tcp",
        ),
        (
            "/spec/ports/0",
            json!({"port": 5432, "proto": "tcp"}),
            "spec.ports[0]",
            "\"proto\" is not a field",
        ),
        (
            "/spec/ports/0",
            json!("8080"),
            "spec.ports[0]",
            "not a port number or",
        ),
        (
            "/spec/ports/0",
            json!({"protocol": "tcp"}),
            "spec.ports[0]",
            "needs `port`",
        ),
        (
            "/spec/http",
            json!({"pathParameters": "strip"}),
            "spec.http.pathParameters",
            "\"strip\"",
        ),
        (
            "/spec/authentication/jwt/0/jwksUri",
            json!("ftp://keys"),
            "spec.authentication.jwt[0].jwksUri",
            "ftp://keys",
        ),
        (
            "/spec/roles/0/name",
            json!("Admin"),
            "spec.roles[0].name",
            "is not a name",
        ),
        (
            "/spec/roles/1/principals/0",
            json!("storefront"),
            "spec.roles[1].principals[0]",
            "\"storefront\" is not a SPIFFE ID",
        ),
        (
            "/spec/routes/0/match/path",
            json!({"prefix": "/orders/../admin"}),
            "spec.routes[0].match.path.prefix",
            "is not a normalized path (requests are matched as \"/admin\")",
        ),
        (
            "/spec/routes/0/match/path",
            json!({"template": "/orders/{id"}),
            "spec.routes[0].match.path.template",
            "/orders/{id",
        ),
        (
            "/spec/routes/0/match/methods/0",
            json!("get"),
            "spec.routes[0].match.methods[0]",
            "is not an upper-case HTTP method",
        ),
        (
            "/spec/routes/1/allow/0/roles/0",
            json!("admins"),
            "spec.routes[1].allow[0].roles[0]",
            "\"admins\" is not a role of this policy (roles: admin, storefront)",
        ),
        (
            "/spec/routes/1/allow/1/conditions/0/key",
            json!("verb"),
            "spec.routes[1].allow[1].conditions[0].key",
            "is not method, header:<name> or claim:<name>",
        ),
        (
            "/spec/routes/2/deny/0/sourceCidrs",
            json!(["10.0.0.0/33"]),
            "spec.routes[2].deny[0].sourceCidrs[0]",
            "\"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "/spec/routes/2/rateLimit",
            json!({"amount": 10, "period": "5 parsecs"}),
            "spec.routes[2].rateLimit.period",
            "\"5 parsecs\" is not a duration",
        ),
        (
            "/spec/routes/2/rateLimit",
            json!({"amount": 10, "period": "1s", "key": "cookie"}),
            "spec.routes[2].rateLimit.key",
            "\"cookie\" is not principal, sourceIp",
        ),
        (
            "/spec/routes/2/validation",
            json!({"jsonSchema": {"type": "nonsense"}}),
            "spec.routes[2].validation.jsonSchema",
            "",
        ),
        (
            "/spec/routes/2/validation",
            json!({"contentTypes": ["JSON"]}),
            "spec.routes[2].validation.contentTypes[0]",
            "\"JSON\" is not a lower-case media type",
        ),
        (
            "/spec/routes/2/response",
            json!({"redact": ["ssn"]}),
            "spec.routes[2].response.redact[0]",
            "\"ssn\"",
        ),
        (
            "/spec/routes/2/deprecation",
            json!({"sunset": "next year"}),
            "spec.routes[2].deprecation.sunset",
            "\"next year\" is not an RFC 3339 time",
        ),
        (
            "/spec/ipFilter",
            json!({"deny": ["somewhere"]}),
            "spec.ipFilter.deny[0]",
            "\"somewhere\"",
        ),
        (
            "/spec/routes/2/rateLimt",
            json!({}),
            "spec.routes[2].rateLimt",
            "is not a field of ApiSecurityPolicy",
        ),
    ];
    for (pointer, value, path, message) in cases {
        let mut doc = example("orders-api.yaml");
        set(&mut doc, pointer, value.clone());
        let errors = errors_of(&doc);
        assert!(
            errors
                .iter()
                .any(|e| e.path == *path && e.message.contains(message)),
            "{pointer} = {value}: expected `{path}: …{message}…`, got {errors:#?}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let mut doc = example("orders-api.yaml");
    set(&mut doc, "/spec/mode", json!("enforcing"));
    set(
        &mut doc,
        "/spec/routes/0/match/path",
        json!({"prefix": "/a/./b"}),
    );
    set(&mut doc, "/spec/routes/1/allow/0/roles/0", json!("nobody"));
    set(
        &mut doc,
        "/spec/routes/2/rateLimit",
        json!({"amount": 1, "period": "forever"}),
    );
    let paths: Vec<String> = errors_of(&doc).into_iter().map(|e| e.path).collect();
    for want in [
        "spec.mode",
        "spec.routes[0].match.path.prefix",
        "spec.routes[1].allow[0].roles[0]",
        "spec.routes[2].rateLimit.period",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want} missing from {paths:?}"
        );
    }
}

#[test]
fn cross_field_rules_are_checked() {
    let base = json!({
        "apiVersion": "palisade.dev/v1alpha1",
        "kind": "ApiSecurityPolicy",
        "metadata": {"name": "p"},
        "spec": {}
    });
    let with_spec = |spec: Value| {
        let mut d = base.clone();
        d["spec"] = spec;
        d
    };
    let cases = [
        (
            json!({"routes": [{"match": {"path": {"exact": "/a", "prefix": "/a"}}, "allow": [{}]}]}),
            "spec.routes[0].match.path",
            "set exactly one",
        ),
        (
            json!({"routes": [{"match": {"path": {"exact": "/a"}}}]}),
            "spec.routes[0]",
            "does nothing",
        ),
        (
            json!({"routes": [{"allow": [{"name": "x"}, {"name": "x"}]}]}),
            "spec.routes[0].allow[1].name",
            "used by another rule",
        ),
        (
            json!({"routes": [{"name": "a", "allow": [{}]}, {"name": "a", "allow": [{}]}]}),
            "spec.routes[1].name",
            "used by another route",
        ),
        (
            json!({"routes": [{"allow": [{"conditions": [{"timeOfDay": {"start": "09:00", "end": "09:00"}}]}]}]}),
            "spec.routes[0].allow[0].conditions[0].timeOfDay",
            "empty",
        ),
        (
            json!({"routes": [{"allow": [{"conditions": [{"key": "method", "equals": "GET", "prefix": "G"}]}]}]}),
            "spec.routes[0].allow[0].conditions[0]",
            "exactly one of equals",
        ),
        (
            json!({"routes": [{"rateLimit": {"amount": 1, "period": "1s", "key": "apiKey"}}]}),
            "spec.routes[0].rateLimit.key",
            "needs spec.authentication.apiKeys",
        ),
        (
            json!({"routes": [{"rateLimit": {"amount": 1, "period": "1s", "algorithm": "fixedWindow", "burst": 5}}]}),
            "spec.routes[0].rateLimit.burst",
            "tokenBucket",
        ),
        (
            json!({"routes": [{"rateLimit": {"amount": 1, "period": "48h"}}]}),
            "spec.routes[0].rateLimit.period",
            "longer than 24h",
        ),
        (
            json!({"routes": [{"deprecation": {"deprecatedAt": "2026-02-01T00:00:00Z", "sunset": "2026-01-01T00:00:00Z"}}]}),
            "spec.routes[0].deprecation.sunset",
            "not after deprecatedAt",
        ),
        (
            json!({"routes": [{"deprecation": {"deprecatedAt": "2026-02-01T00:00:00Z", "blockAfterSunset": true}}]}),
            "spec.routes[0].deprecation.blockAfterSunset",
            "needs sunset",
        ),
        (
            json!({"authentication": {"jwt": [{"issuer": "i", "jwksUri": "https://a/k", "jwks": "{}"}]}}),
            "spec.authentication.jwt[0]",
            "exactly one of jwksUri and jwks",
        ),
        (
            json!({"authentication": {"jwt": [{"issuer": "i", "jwks": "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"x\",\"e\":\"AQAB\",\"d\":\"secret\"}]}"}]}}),
            "spec.authentication.jwt[0].jwks.keys[0]",
            "private key material",
        ),
        (
            json!({"authentication": {"jwt": [{"issuer": "i", "jwksUri": "http://keys.example.com/k"}]}}),
            "spec.authentication.jwt[0].jwksUri",
            "not an https:// URL",
        ),
        (
            json!({"authentication": {"apiKeys": {}}}),
            "spec.authentication.apiKeys",
            "set secretRef or keys",
        ),
        (
            json!({"roles": [{"name": "empty"}]}),
            "spec.roles[0]",
            "has no members",
        ),
        (
            json!({"ports": [8080, 8080]}),
            "spec.ports[1]",
            "listed twice",
        ),
    ];
    for (spec, path, message) in cases {
        let errors = errors_of(&with_spec(spec.clone()));
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(message)),
            "{spec}: expected `{path}: …{message}…`, got {errors:#?}"
        );
    }
}

#[test]
fn loopback_jwks_over_http_is_allowed_for_local_development() {
    let doc = json!({
        "apiVersion": "palisade.dev/v1alpha1",
        "kind": "ApiSecurityPolicy",
        "metadata": {"name": "p"},
        "spec": {"authentication": {"jwt": [{"issuer": "i", "jwksUri": "http://127.0.0.1:8080/jwks"}]}}
    });
    assert!(validate_document(&doc).is_ok());
}

#[test]
fn ports_take_numbers_and_declared_protocols() {
    let doc = |ports: Value, routes: Value| {
        json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "ApiSecurityPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"ports": ports, "routes": routes}
        })
    };
    let identity_only =
        json!([{"allow": [{"principals": ["spiffe://cluster.local/ns/shop/sa/web"]}]}]);
    let policy = validate_document(&doc(
        json!([8080, {"port": 5432, "protocol": "tcp"}, {"port": 9090}]),
        identity_only,
    ))
    .expect("valid");
    let ports: Vec<_> = policy
        .spec
        .ports
        .iter()
        .map(|p| (p.number(), p.protocol()))
        .collect();
    assert_eq!(
        ports,
        [(8080, None), (5432, Some(PortProtocol::Tcp)), (9090, None)]
    );
    // Written back in the form it came in.
    let back = serde_json::to_value(&policy.spec.ports).unwrap();
    assert_eq!(
        back,
        json!([8080, {"port": 5432, "protocol": "tcp"}, {"port": 9090}])
    );

    assert!(
        errors_of(&doc(
            json!([5432, {"port": 5432, "protocol": "tcp"}]),
            json!([])
        ))
        .iter()
        .any(|e| e.path == "spec.ports[1]" && e.message.contains("listed twice"))
    );
}

#[test]
fn a_port_declared_tcp_cannot_be_given_http_rules_by_its_policy() {
    let doc = |routes: Value| {
        json!({
            "apiVersion": "palisade.dev/v1alpha1",
            "kind": "ApiSecurityPolicy",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"ports": [8080, {"port": 5432, "protocol": "tcp"}], "routes": routes}
        })
    };
    for routes in [
        json!([{"match": {"path": {"prefix": "/admin"}}, "deny": [{}]}]),
        json!([{"rateLimit": {"amount": 10, "period": "1s"}}]),
        json!([{"allow": [{"claims": [{"name": "role", "values": ["dba"]}]}]}]),
        json!([{"deny": [{"conditions": [{"key": "header:x-user", "equals": "bob"}]}]}]),
    ] {
        let errors = errors_of(&doc(routes.clone()));
        assert!(
            errors.iter().any(|e| e.path == "spec.ports[1].protocol"
                && e.message.contains("declared tcp")
                && e.message.contains("shop/db/routes[0]")),
            "{routes}: {errors:#?}"
        );
    }
    // Identity-level rules are what a tcp port can enforce.
    assert!(
        validate_document(&doc(json!([{
            "deny": [{"namespaces": ["sandbox"]}],
            "allow": [{"principals": ["spiffe://cluster.local/ns/shop/sa/*"], "sourceCidrs": ["10.0.0.0/8"]}]
        }])))
        .is_ok()
    );
}
