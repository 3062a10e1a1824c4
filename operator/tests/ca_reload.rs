//! Local-mode root rotation against the real `palisade-operator` binary:
//! the CA files are edited while the operator runs, following the steps in
//! docs/operations.md, and `Identity.Certify` (and the operator's own
//! serving certificate) follow them without a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use palisade_operator::ca::generate::generate_root;
use palisade_proto::identity::v1::CertifyResponse;
use palisade_proto::identity::v1::identity_client::IdentityClient;
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

const TOKEN: &str = "tok-orders-9f2c41d7a0b3e8c5";

/// Replaces one CA file in one step (write elsewhere, then rename), as the
/// docs tell operators to.
fn replace_ca_file(state: &Path, file: &str, text: &str) {
    let path = state.join("ca").join(file);
    let staging = path.with_extension("new");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, &path).unwrap();
}

async fn issue(client: &mut IdentityClient<Channel>) -> CertifyResponse {
    certify_fresh(client, TOKEN).await.expect("certify")
}

/// Retries Certify until its response satisfies `check`.
async fn eventually(
    client: &mut IdentityClient<Channel>,
    check: impl Fn(&CertifyResponse) -> Result<(), String>,
) -> CertifyResponse {
    poll(async || {
        let resp = issue(client).await;
        check(&resp).map(|()| resp)
    })
    .await
}

fn chains_to(resp: &CertifyResponse, root: &CertificateDer<'_>) -> bool {
    verify(&chain_der(resp), std::slice::from_ref(root)).is_ok()
}

#[tokio::test]
async fn a_root_rotation_applies_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let tokens = write_tokens(tmp.path(), &[(TOKEN, "shop", "orders")]);
    let op = spawn_operator(&state, &tokens, &["--ca-poll-interval", "100ms"]);
    let old_bundle = op.bundle_pem();
    let r1 = der(&old_bundle);
    let mut client = op.client().await;

    let first = issue(&mut client).await;
    assert_eq!(bundle_der(&first), vec![r1.clone()]);
    assert!(chains_to(&first, &r1));

    // Step 2: the new root joins the bundle; the issuer stays.
    let new = generate_root(SystemTime::now()).unwrap();
    let r2 = der(&new.trust_bundle_pem);
    replace_ca_file(
        &state,
        "trust-bundle.pem",
        &format!("{old_bundle}{}", new.trust_bundle_pem),
    );
    let two_roots = eventually(&mut client, |r| {
        let bundle = bundle_der(r);
        if bundle == vec![r1.clone(), r2.clone()] {
            Ok(())
        } else {
            Err(format!("bundle still has {} root(s)", bundle.len()))
        }
    })
    .await;
    assert!(chains_to(&two_roots, &r1), "the issuer changed at step 2");
    assert!(!chains_to(&two_roots, &r2));
    let line = wait_for_log(&op, "CA reloaded").await;
    assert!(line.contains("trust-bundle.pem"), "{line}");

    // Step 4: the issuer switches to the new root.
    replace_ca_file(&state, "issuer-key.pem", &new.issuer_key_pem);
    replace_ca_file(&state, "issuer.pem", &new.issuer_pem);
    let switched = eventually(&mut client, |r| {
        if chains_to(r, &r2) {
            Ok(())
        } else {
            Err("new leaves do not chain to the new root yet".into())
        }
    })
    .await;
    assert!(!chains_to(&switched, &r1));
    assert_eq!(bundle_der(&switched), vec![r1.clone(), r2.clone()]);
    // The operator's serving certificate followed: a client that trusts
    // only the new root (an agent after step 6) can connect.
    wait_for_log(&op, "re-issued the operator's serving certificate").await;
    let mut new_only = client_trusting(&op, &new.trust_bundle_pem).await;
    assert!(chains_to(&issue(&mut new_only).await, &r2));

    // A broken bundle: rejected, logged, the previous CA stays in force.
    replace_ca_file(
        &state,
        "trust-bundle.pem",
        "-----BEGIN CERTIFICATE-----\nhalf a certificate\n",
    );
    let line = wait_for_log(&op, "CA files rejected").await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("trust-bundle.pem"), "{line}");
    assert!(line.contains("previous CA stays in force"), "{line}");
    // Still so a few polls later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let kept = issue(&mut client).await;
    assert!(chains_to(&kept, &r2));
    assert_eq!(bundle_der(&kept), vec![r1.clone(), r2.clone()]);

    // Step 6 (after the fix): the old root leaves the bundle.
    replace_ca_file(&state, "trust-bundle.pem", &new.trust_bundle_pem);
    eventually(&mut new_only, |r| {
        if bundle_der(r) == vec![r2.clone()] {
            Ok(())
        } else {
            Err("the old root is still in the bundle".into())
        }
    })
    .await;
    assert!(
        !op.log().contains("BEGIN PRIVATE KEY"),
        "key material logged"
    );
}

/// A client that trusts `bundle_pem` only, retrying the handshake until
/// it succeeds.
async fn client_trusting(op: &Operator, bundle_pem: &str) -> IdentityClient<Channel> {
    poll(async || {
        // The serving certificate is swapped just after the log line is
        // written; retry the handshake briefly.
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            try_client(op.addr, bundle_pem.to_owned()),
        )
        .await;
        match result {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(format!("handshake with new-root-only trust: {e}")),
            Err(_) => Err("handshake timed out".into()),
        }
    })
    .await
}

#[test]
fn the_ca_poll_interval_is_checked_and_local_only() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN, "shop", "orders")]);
    let stderr = serve_must_fail(
        &tmp.path().join("state"),
        &tokens,
        &["--admin", "", "--ca-poll-interval", "1ms"],
    );
    assert!(stderr.contains("at least 50ms"), "{stderr}");

    let out = Command::new(BIN)
        .args(["serve", "--kubernetes", "--ca-poll-interval", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "not a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca-poll-interval"), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
