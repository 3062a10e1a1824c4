//! The `palisade-agent` command line as a process: the `identity`
//! subcommand against the test double of the operator (it fetches a
//! certificate and keeps renewing it), and flag checks of `run`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::operator::FakeOperator;
use common::{OPERATOR, TestCa, WEB};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn identity_subcommand_fetches_and_renews() {
    let op = FakeOperator::new(
        TestCa::new("mesh root"),
        Duration::from_secs(3),
        &[("tok-web", WEB)],
    );
    let addr = op.serve_default().await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let token = dir.path().join("token");
    std::fs::write(&bundle, &op.ca.pem).unwrap();
    std::fs::write(&token, "tok-web\n").unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .arg("identity")
        .arg("--operator")
        .arg(addr.to_string())
        .arg("--token-file")
        .arg(&token)
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--operator-id")
        .arg(OPERATOR)
        // Not the default 0.0.0.0:15020: tests must not collide on a fixed port.
        .arg("--admin")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut installed = Vec::new();
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("workload certificate installed") {
                installed.push(line);
                if installed.len() == 3 {
                    return;
                }
            }
        }
    })
    .await;
    let _ = child.kill().await;
    assert!(waited.is_ok(), "renewal lines seen: {installed:#?}");
    for line in &installed {
        assert!(line.contains(WEB), "{line}");
        assert!(line.contains("serial="), "{line}");
        assert!(line.contains("not_after="), "{line}");
        assert!(
            !line.contains("tok-web"),
            "token leaked into the log: {line}"
        );
    }
    let serial = |l: &String| {
        l.split("serial=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_ne!(serial(&installed[0]), serial(&installed[2]));
}

#[tokio::test]
async fn help_lists_the_identity_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args(["identity", "--help"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--operator",
        "--token-file",
        "--trust-bundle",
        "--operator-id",
        "--trust-domain",
        "--admin",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
}

/// `palisade-agent run` with everything it needs to get past flag parsing
/// (it fails later, on the missing trust bundle), plus `label`.
async fn run_with_label(label: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade-agent"))
        .args([
            "run",
            "--inbound",
            "127.0.0.1:1=127.0.0.1:2",
            "--operator",
            "127.0.0.1:1",
            "--token-file",
            "/nonexistent/token",
            "--trust-bundle",
            "/nonexistent/bundle.pem",
            "--admin",
            "",
            "--label",
            label,
        ])
        .env("RUST_LOG", "off")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn run_refuses_a_label_that_is_not_key_equals_value() {
    for (label, why) in [("app", "has no '='"), ("=orders", "has an empty key")] {
        let out = run_with_label(label).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--label {label}: {stderr}");
        assert!(stderr.contains("--label"), "--label {label}: {stderr}");
        assert!(stderr.contains("KEY=VALUE"), "--label {label}: {stderr}");
        assert!(stderr.contains(why), "--label {label}: {stderr}");
    }
    // Control: a good label gets past the flags, to the missing trust bundle.
    for label in ["app=orders", "tier="] {
        let out = run_with_label(label).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!stderr.contains("--label"), "--label {label}: {stderr}");
        assert!(stderr.contains("bundle.pem"), "--label {label}: {stderr}");
    }
}
