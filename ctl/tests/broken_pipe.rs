//! A reader that goes away (`palisadectl … | head -1`) ends palisadectl
//! quietly: exit status 141 (what a shell reports for a writer killed by
//! SIGPIPE), nothing on stderr, no "failed printing to stdout" panic.
//!
//! The pipe's read end is closed before the process starts, so its very
//! first write fails with EPIPE: deterministic, unlike racing `head`.

use std::process::{Command, Output, Stdio};

const CTL: &str = env!("CARGO_BIN_EXE_palisadectl");

fn root() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/..")
}

/// Runs palisadectl with stdout a pipe nobody reads from any more.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(CTL)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run palisadectl")
}

/// The same, with stdout read to the end: the control.
fn run_read(args: &[&str]) -> Output {
    Command::new(CTL)
        .args(args)
        .current_dir(root())
        .output()
        .expect("run palisadectl")
}

fn assert_quiet_on_closed_pipe(args: &[&str]) {
    // Control: the command itself works and prints something.
    let read = run_read(args);
    assert!(
        !read.stdout.is_empty(),
        "{args:?} printed nothing: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    let out = run_into_closed_pipe(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(stderr.is_empty(), "{args:?} said: {stderr}");
    assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
}

fn examples() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(format!("{}/examples/policies", root()))
        .expect("examples")
        .map(|e| e.expect("entry").path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn policy_simulate_text_and_json() {
    let base = [
        "policy",
        "simulate",
        "examples/policies/orders-api.yaml",
        "--path",
        "/orders/1",
        "--repeat",
        "1000",
    ];
    assert_quiet_on_closed_pipe(&base);
    assert_quiet_on_closed_pipe(&[&base[..], &["--output", "json"]].concat());
}

#[test]
fn policy_check_of_many_files() {
    let files = examples();
    let mut args = vec!["policy", "check"];
    for _ in 0..20 {
        args.extend(files.iter().map(String::as_str));
    }
    assert_quiet_on_closed_pipe(&args);
    // Also when the lines are problems, and when a file cannot be read.
    assert_quiet_on_closed_pipe(&["policy", "check", "/nonexistent/policy.yaml"]);
}

#[test]
fn policy_compile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("orders.pb");
    assert_quiet_on_closed_pipe(&[
        "policy",
        "compile",
        "examples/policies/orders-api.yaml",
        "--label",
        "app=orders",
        "-o",
        out.to_str().expect("path"),
    ]);
}

#[test]
fn certs_inspect_text_and_json() {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/orders"
            .try_into()
            .expect("uri"),
    )];
    let cert = params.self_signed(&key).expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("leaf.pem");
    std::fs::write(&file, cert.pem()).expect("write");
    let file = file.to_str().expect("path");
    assert_quiet_on_closed_pipe(&["certs", "inspect", "--file", file]);
    assert_quiet_on_closed_pipe(&["certs", "inspect", "--file", file, "--output", "json"]);
}

#[test]
fn help() {
    // clap prints help itself; it must not panic either.
    let out = run_into_closed_pipe(&["policy", "simulate", "--help"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
