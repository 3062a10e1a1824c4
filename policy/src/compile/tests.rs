use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::*;
use crate::documents::load_policies;

fn policies(yaml: &str) -> Vec<ApiSecurityPolicy> {
    load_policies(yaml)
        .expect("yaml")
        .into_iter()
        .map(|p| p.unwrap_or_else(|(l, e)| panic!("{l}: {e}")))
        .collect()
}

fn workload(labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: "shop".into(),
        service_account: "orders".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ports: vec![8080],
    }
}

const TWO_POLICIES: &str = r#"
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: orders, namespace: shop, generation: 3}
spec:
  selector: {matchLabels: {app: orders}}
  authentication:
    apiKeys: {header: X-Partner-Key, secretRef: {name: partner-keys}}
  audit: {samplePercent: 5, redactHeaders: [x-session]}
  routes:
    - allow: [{apiKeyClients: [acme]}]
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: other-namespace, namespace: billing}
spec:
  routes: [{deny: [{}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: wrong-port, namespace: shop}
spec:
  ports: [9999]
  routes: [{deny: [{}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: canary, namespace: shop}
spec:
  selector:
    matchExpressions: [{key: track, operator: In, values: [canary]}]
  routes: [{deny: [{}]}]
"#;

struct Keys;
impl SecretSource for Keys {
    fn api_keys(&self, namespace: &str, name: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        assert_eq!((namespace, name), ("shop", "partner-keys"));
        Ok(vec![("acme".into(), b"s3cret-key".to_vec())])
    }
}

#[test]
fn only_policies_selecting_the_workload_are_compiled() {
    let compiled = compile_workload(
        &policies(TWO_POLICIES),
        &workload(&[("app", "orders")]),
        &MeshConfig::default(),
        &Keys,
    )
    .expect("compile");
    assert_eq!(compiled.sources, ["shop/orders@3"]);
    assert_eq!(compiled.routes.len(), 1);
    assert_eq!(
        compiled.workload,
        "spiffe://cluster.local/ns/shop/sa/orders"
    );
    let canary = compile_workload(
        &policies(TWO_POLICIES),
        &workload(&[("app", "orders"), ("track", "canary")]),
        &MeshConfig::default(),
        &Keys,
    )
    .expect("compile");
    assert_eq!(canary.sources, ["shop/canary@0", "shop/orders@3"]);
}

#[test]
fn api_keys_from_secrets_arrive_hashed_never_plain() {
    let compiled = compile_workload(
        &policies(TWO_POLICIES),
        &workload(&[("app", "orders")]),
        &MeshConfig::default(),
        &Keys,
    )
    .expect("compile");
    let keys = compiled.api_keys.as_ref().expect("api keys");
    assert_eq!(keys.header, "x-partner-key");
    assert_eq!(keys.keys[0].client_id, "acme");
    assert_eq!(keys.keys[0].sha256, Sha256::digest(b"s3cret-key").to_vec());
    let wire = compiled.encode_to_vec();
    assert!(
        !wire.windows(10).any(|w| w == b"s3cret-key"),
        "plaintext key on the wire"
    );
    // The API-key header is never copied into audit events.
    let audit = compiled.audit.expect("audit");
    assert!(audit.redact_headers.contains(&"x-partner-key".to_owned()));
    assert!(audit.redact_headers.contains(&"x-session".to_owned()));
    assert!(audit.redact_headers.contains(&"authorization".to_owned()));
    assert_eq!(audit.sample_percent, 5);
}

#[test]
fn secret_refs_fail_without_a_secret_source() {
    let err = compile_workload(
        &policies(TWO_POLICIES),
        &workload(&[("app", "orders")]),
        &MeshConfig::default(),
        &NoSecrets,
    )
    .unwrap_err();
    assert!(err.to_string().contains("shop/orders"), "{err}");
    assert!(err.to_string().contains("partner-keys"), "{err}");
}

#[test]
fn conflicting_api_key_headers_are_an_error() {
    let yaml = r#"
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: a, namespace: shop}
spec:
  authentication: {apiKeys: {header: x-a, keys: [{clientId: c, sha256: "0000000000000000000000000000000000000000000000000000000000000000"}]}}
  routes: [{allow: [{}]}]
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: b, namespace: shop}
spec:
  authentication: {apiKeys: {header: x-b, keys: [{clientId: d, sha256: "1111111111111111111111111111111111111111111111111111111111111111"}]}}
  routes: [{allow: [{}]}]
"#;
    let err = compile_workload(
        &policies(yaml),
        &workload(&[]),
        &MeshConfig::default(),
        &NoSecrets,
    )
    .unwrap_err();
    assert!(matches!(err, CompileError::Conflict(_)), "{err}");
}

#[test]
fn version_follows_content() {
    let yaml = "apiVersion: palisade.dev/v1alpha1\nkind: ApiSecurityPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  routes: [{allow: [{}]}]\n";
    let w = workload(&[]);
    let a = compile_workload(&policies(yaml), &w, &MeshConfig::default(), &NoSecrets).expect("a");
    let b = compile_workload(&policies(yaml), &w, &MeshConfig::default(), &NoSecrets).expect("b");
    assert_eq!(a.version, b.version);
    let changed = yaml.replace("allow: [{}]", "deny: [{}]");
    let c =
        compile_workload(&policies(&changed), &w, &MeshConfig::default(), &NoSecrets).expect("c");
    assert_ne!(a.version, c.version);
}

#[test]
fn label_selectors_follow_kubernetes_semantics() {
    let labels: Labels = [
        ("app".to_owned(), "orders".to_owned()),
        ("tier".to_owned(), "web".to_owned()),
    ]
    .into();
    let expr = |key: &str, op: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }]),
        ..Default::default()
    };
    assert!(selector_matches(&LabelSelector::default(), &labels));
    assert!(selector_matches(
        &expr("tier", "In", &["web", "api"]),
        &labels
    ));
    assert!(!selector_matches(&expr("tier", "NotIn", &["web"]), &labels));
    assert!(selector_matches(&expr("zone", "NotIn", &["a"]), &labels));
    assert!(selector_matches(&expr("app", "Exists", &[]), &labels));
    assert!(!selector_matches(
        &expr("app", "DoesNotExist", &[]),
        &labels
    ));
    assert!(
        !selector_matches(&expr("app", "Matches", &["orders"]), &labels),
        "unknown operators select nothing"
    );
    let ml = LabelSelector {
        match_labels: Some([("app".to_owned(), "billing".to_owned())].into()),
        ..Default::default()
    };
    assert!(!selector_matches(&ml, &labels));
}

#[test]
fn declared_protocols_and_http_opt_outs_are_merged_strictly() {
    let yaml = r#"
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: db, namespace: shop}
spec:
  mtls: permissive
  ports: [{port: 5432, protocol: tcp}, {port: 6379, protocol: tcp}, 8080]
  http: {pathParameters: allow, headersWithUnderscores: drop}
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: api, namespace: shop}
spec:
  ports: [{port: 6379, protocol: http}]
  http: {headersWithUnderscores: reject}
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: shadow, namespace: shop}
spec:
  mode: audit
  ports: [{port: 7000, protocol: tcp}]
  http: {pathParameters: reject}
"#;
    let mut w = workload(&[]);
    w.ports = vec![];
    let out = compile_workload(&policies(yaml), &w, &MeshConfig::default(), &NoSecrets).unwrap();
    let ports: Vec<_> = out
        .ports
        .iter()
        .map(|p| {
            (
                p.port,
                pb::MtlsMode::try_from(p.mtls).unwrap(),
                pb::PortProtocol::try_from(p.protocol).unwrap(),
            )
        })
        .collect();
    // HTTP wins over tcp; an audit-mode policy declares nothing; the
    // permissive ports keep their mTLS mode.
    assert_eq!(
        ports,
        [
            (5432, pb::MtlsMode::Permissive, pb::PortProtocol::Tcp),
            (6379, pb::MtlsMode::Permissive, pb::PortProtocol::Http),
            (
                8080,
                pb::MtlsMode::Permissive,
                pb::PortProtocol::Unspecified
            ),
        ]
    );
    // An opt-out holds unless another enforced policy insists on the strict
    // value; the audit-mode policy's says nothing.
    assert_eq!(
        out.http,
        Some(pb::HttpOptions {
            allow_path_parameters: true,
            drop_underscore_headers: false,
        })
    );

    // A port listed only for its protocol keeps the mesh default mTLS.
    let yaml = r#"
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: db, namespace: shop}
spec:
  ports: [{port: 5432, protocol: tcp}]
"#;
    let mesh = MeshConfig {
        default_mtls: pb::MtlsMode::Permissive,
        ..MeshConfig::default()
    };
    let out = compile_workload(&policies(yaml), &w, &mesh, &NoSecrets).unwrap();
    assert_eq!(out.ports[0].mtls, pb::MtlsMode::Permissive as i32);
    assert_eq!(out.http, None);
}
