//! The checked-in CRD is the generated one, and it is a structural schema a
//! real API server accepts.

use std::process::Command;

use serde_json::Value;

const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/apisecuritypolicies.palisade.dev.yaml"
);

fn generated() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-operator"))
        .arg("crdgen")
        .output()
        .expect("run palisade-operator crdgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let checked_in = std::fs::read_to_string(CRD_FILE).expect("crds/ file");
    assert!(
        checked_in == generated(),
        "crds/ drifted from the Rust types: run `cargo run -p palisade-operator -- crdgen > crds/apisecuritypolicies.palisade.dev.yaml`"
    );
}

fn crd() -> Value {
    serde_saphyr::from_str(&generated()).expect("CRD is YAML")
}

#[test]
fn crd_names_printer_columns_and_status() {
    let crd = crd();
    assert_eq!(crd["spec"]["group"], "palisade.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "asp");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["Mode", "Accepted", "Programmed", "Age"]);
}

const KNOWN_FORMATS: [&str; 9] = [
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "date",
    "date-time",
    "password",
    "uri",
];

/// The rules of a structural schema (Kubernetes apiextensions): every node
/// has a type unless it preserves unknown fields; no `$ref`; `anyOf`/`oneOf`
/// /`allOf`/`not` carry no types or defaults; no `additionalProperties`
/// beside `properties`; formats are ones the API server knows.
fn check_structural(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else { return };
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !map.contains_key("type") && !preserve && !map.contains_key("x-kubernetes-int-or-string") {
        problems.push(format!("{path}: no type"));
    }
    if map.contains_key("$ref") {
        problems.push(format!("{path}: $ref"));
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!("{path}: properties with additionalProperties"));
    }
    if let Some(f) = map.get("format").and_then(Value::as_str)
        && !KNOWN_FORMATS.contains(&f)
    {
        problems.push(format!("{path}: unknown format {f}"));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for (i, branch) in map
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if branch.get("type").is_some() || branch.get("default").is_some() {
                problems.push(format!(
                    "{path}.{key}[{i}]: type or default inside a junctor"
                ));
            }
        }
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(v, &format!("{path}.{k}"), problems);
        }
    }
    if let Some(items) = map.get("items") {
        check_structural(items, &format!("{path}[]"), problems);
    }
    if let Some(ap) = map.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(ap, &format!("{path}{{}}"), problems);
    }
}

#[test]
fn schema_is_structural() {
    let crd = crd();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut problems = Vec::new();
    check_structural(schema, "openAPIV3Schema", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn schema_carries_value_rules_and_cel() {
    let text = generated();
    // Patterns, ranges and cross-field CEL rules refuse bad values at apply time.
    assert!(
        text.contains("pattern: ^([0-9]+(ms|s|m|h))+$"),
        "duration pattern"
    );
    assert!(text.contains("rule: has(self.jwksUri) != has(self.jwks)"));
    assert!(text.contains(
        "[has(self.exact), has(self.template), has(self.prefix)].filter(x, x).size() == 1"
    ));
    let crd = crd();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(
        spec["mode"]["enum"],
        serde_json::json!(["enforce", "audit"])
    );
    let amount = &spec["routes"]["items"]["properties"]["rateLimit"]["properties"]["amount"];
    assert_eq!(amount["minimum"].as_f64(), Some(1.0));
    // A port is a number or {port, protocol}: a structural schema cannot say
    // so, the item keeps what it is given and Palisade's validation checks it.
    assert_eq!(spec["ports"]["maxItems"].as_u64(), Some(64));
    assert_eq!(
        spec["ports"]["items"]["x-kubernetes-preserve-unknown-fields"],
        serde_json::json!(true)
    );
}
