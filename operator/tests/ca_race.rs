//! Operators started together on one state directory end up with one CA.

mod common;

use std::process::{Command, Stdio};

use common::*;

const TOKEN: &str = "tok-race-5d1f0e2a9c8b7a61";

#[tokio::test]
async fn two_operators_started_together_share_one_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let tokens = write_tokens(tmp.path(), &[(TOKEN, "shop", "orders")]);
    // Both processes are spawned before either has had time to create the CA.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn_operator(&state, &tokens, &[]));
        let b = s.spawn(|| spawn_operator(&state, &tokens, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.bundle_path, b.bundle_path);
    let bundle = a.bundle_pem();

    let mut responses = Vec::new();
    for op in [&a, &b] {
        // Each operator's TLS certificate chains to the one bundle on disk...
        let mut client = client(op.addr, &bundle).await;
        responses.push(certify_fresh(&mut client, TOKEN).await.unwrap());
    }
    // ...and so does every workload certificate, from either of them.
    for resp in &responses {
        assert_eq!(resp.trust_bundle_pem, vec![bundle.clone()]);
        verify(&chain_der(resp), &[der(&bundle)]).unwrap();
    }
    // Exactly one CA directory, no staging leftovers.
    let entries: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("ca")]);
    let created = [a.log(), b.log()]
        .iter()
        .filter(|l| l.contains("created=true"))
        .count();
    assert!(created <= 1, "{}\n---\n{}", a.log(), b.log());
}

#[test]
fn concurrent_ca_init_prints_one_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let children: Vec<_> = (0..6)
        .map(|_| {
            Command::new(BIN)
                .args(["ca", "init", "--state-dir"])
                .arg(&state)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let fingerprints: Vec<String> = outputs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout.clone()).unwrap()
        })
        .collect();
    assert!(fingerprints[0].starts_with("sha256:"));
    assert_eq!(fingerprints[0].trim().len(), "sha256:".len() + 64);
    assert!(
        fingerprints.iter().all(|f| *f == fingerprints[0]),
        "{fingerprints:?}"
    );
    let created = outputs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("created a new CA"))
        .count();
    assert_eq!(created, 1);
    // The fingerprint is the bundle's root.
    let bundle = std::fs::read_to_string(state.join("ca/trust-bundle.pem")).unwrap();
    assert_eq!(
        fingerprints[0].trim(),
        palisade_operator::ca::fingerprint(&der(&bundle))
    );
}
