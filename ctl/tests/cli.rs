//! `palisadectl policy …` as users run it: the real binary on real files.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run palisadectl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn examples() -> Vec<String> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies"));
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("examples")
        .map(|e| e.expect("entry").path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn check_passes_every_example() {
    let files = examples();
    assert!(files.len() >= 5);
    let mut args = vec!["policy", "check"];
    args.extend(files.iter().map(String::as_str));
    let out = ctl(&args);
    assert!(out.status.success(), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.lines().count() >= files.len(), "{text}");
    assert!(text.lines().all(|l| l.ends_with(": ok")), "{text}");
}

#[test]
fn check_fails_with_every_field_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: bad, namespace: shop}
spec:
  roles: [{name: admin, namespaces: [ops]}]
  routes:
    - allow: [{roles: [admins]}]
    - match: {path: {prefix: /x}}
      rateLimit: {amount: 5, period: 5 parsecs}
"#,
    )
    .expect("write");
    let out = ctl(&["policy", "check", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(
            r#"shop/bad: spec.routes[0].allow[0].roles[0]: "admins" is not a role of this policy"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"shop/bad: spec.routes[1].rateLimit.period: "5 parsecs" is not a duration"#
        ),
        "{text}"
    );
}

#[test]
fn simulate_reports_decision_status_and_rule() {
    let out = ctl(&[
        "policy",
        "simulate",
        "examples/policies/orders-api.yaml",
        "--method",
        "DELETE",
        "--path",
        "/orders/7",
        "--claim",
        "roles=orders-admin",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["status"], 200);
    assert_eq!(
        v["rule"],
        "shop/orders-api/routes/write-orders/allow/admins"
    );

    // An encoded detour into the admin area is normalized and refused.
    let out = ctl(&[
        "policy",
        "simulate",
        "examples/policies/orders-api.yaml",
        "--path",
        "/orders/%2e%2e/admin/users",
        "--claim",
        "roles=viewer",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["status"], 403);
    assert_eq!(v["normalizedPath"], "/admin/users");

    let out = ctl(&[
        "policy",
        "simulate",
        "examples/policies/orders-api.yaml",
        "--path",
        "/orders/1",
    ]);
    let text = stdout(&out);
    assert!(text.contains("decision: allow"), "{text}");
    assert!(
        text.contains("rule:     shop/orders-api/routes/read-orders/allow/anyone"),
        "{text}"
    );
}

#[test]
fn compiled_policy_loads_in_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("orders.pb");
    let out = ctl(&[
        "policy",
        "compile",
        "examples/policies/orders-api.yaml",
        "--label",
        "app=orders",
        "--namespace",
        "shop",
        "-o",
        out_file.to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&out_file).expect("compiled file");
    use prost::Message;
    let policy = palisade_policy::wire::WorkloadPolicy::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(policy.sources, ["shop/orders-api@0"]);
    assert!(palisade_policy::PolicyEngine::load(policy).is_ok());
}

#[test]
fn a_label_that_is_not_key_equals_value_is_refused_by_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("orders.pb");
    let out_file = out_file.to_str().expect("path");
    let simulate = |label: &str| {
        ctl(&[
            "policy",
            "simulate",
            "examples/policies/orders-api.yaml",
            "--path",
            "/orders/1",
            "--label",
            label,
        ])
    };
    let compile = |label: &str| {
        ctl(&[
            "policy",
            "compile",
            "examples/policies/orders-api.yaml",
            "--label",
            label,
            "-o",
            out_file,
        ])
    };
    for run in [&simulate as &dyn Fn(&str) -> Output, &compile] {
        for (label, why) in [("app", "has no '='"), ("=orders", "has an empty key")] {
            let out = run(label);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "--label {label}: {stderr}");
            assert!(stderr.contains("--label"), "{stderr}");
            assert!(stderr.contains("KEY=VALUE"), "{stderr}");
            assert!(stderr.contains(why), "{stderr}");
            assert!(out.stdout.is_empty(), "{}", stdout(&out));
        }
    }
    assert!(
        !std::path::Path::new(out_file).exists(),
        "compile wrote a policy for a label it could not read"
    );

    // Control: the same commands with the label well formed.
    let out = simulate("app=orders");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("decision: allow"), "{}", stdout(&out));
    let out = compile("app=orders");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::path::Path::new(out_file).exists());
}

#[test]
fn a_label_selects_which_policies_apply() {
    // Before labels were parsed strictly, `--label app` was dropped and the
    // workload had no labels at all; a real label that selects nothing must
    // leave the example's routes out.
    let run = |label: &str| {
        let out = ctl(&[
            "policy",
            "simulate",
            "examples/policies/orders-api.yaml",
            "--path",
            "/orders/1",
            "--label",
            label,
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    assert_eq!(
        run("app=orders")["route"],
        "shop/orders-api/routes/read-orders"
    );
    assert_eq!(run("app=billing")["route"], serde_json::Value::Null);
}
