//! `Identity.Certify` end to end: the real `palisade-operator` binary, real
//! TLS on loopback, real gRPC, and certificates checked with webpki and
//! x509-parser.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

const TOKEN_A: &str = "tok-orders-9f2c41d7a0b3e8c5";
const TOKEN_B: &str = "tok-payments-1b7e93c0d4a2f6e8";
const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/payments";

fn start(extra: &[&str]) -> (tempfile::TempDir, Operator) {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        tmp.path(),
        &[(TOKEN_A, "shop", "orders"), (TOKEN_B, "shop", "payments")],
    );
    let op = spawn_operator(&tmp.path().join("state"), &tokens, extra);
    (tmp, op)
}

#[tokio::test]
async fn a_token_for_a_never_yields_a_certificate_for_b() {
    let (_tmp, op) = start(&[]);
    let mut client = op.client().await;
    // A's token, but the CSR asks for B's SPIFFE ID, B's DNS names and an IP.
    let (_key, csr_a) = csr(vec![
        uri_san(ID_B),
        dns_san("payments.shop.svc"),
        dns_san("payments.shop.svc.cluster.local"),
        rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap()),
    ]);
    let resp = certify(&mut client, TOKEN_A, &csr_a, 0).await.unwrap();
    assert_eq!(resp.spiffe_id, ID_A);
    let chain = chain_der(&resp);
    assert_eq!(sans(&chain[0]), vec![format!("URI:{ID_A}")]);
    verify(&chain, &bundle_der(&resp)).unwrap();

    // And B's token gets B, whatever the CSR says.
    let (_key, csr_b) = csr(vec![uri_san(ID_A)]);
    let resp = certify(&mut client, TOKEN_B, &csr_b, 0).await.unwrap();
    assert_eq!(sans(&chain_der(&resp)[0]), vec![format!("URI:{ID_B}")]);
}

#[tokio::test]
async fn refusals_carry_fixed_statuses() {
    let (_tmp, op) = start(&[]);
    let mut client = op.client().await;
    let (_key, good_csr) = csr(vec![]);

    for token in ["tok-unknown-0000000000000000", "", &"x".repeat(20_000)] {
        let err = certify(&mut client, token, &good_csr, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "token not accepted");
    }

    // Flip one bit of the signature: the CSR no longer proves possession.
    let mut der = der_of_csr(&good_csr);
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = palisade_operator::ca::pem::encode("CERTIFICATE REQUEST", &der);
    // A CSR whose signature is by a different key than the one it carries.
    let (_, other) = csr(vec![]);
    let swapped = swap_public_key(&good_csr, &other);
    for bad in [tampered.as_str(), swapped.as_str(), "not a csr", ""] {
        let err = certify(&mut client, TOKEN_A, bad, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(err.message(), "invalid certificate signing request");
    }
    // An unknown token with a bad CSR learns only about the token.
    let err = certify(&mut client, "nope-nope-nope-nope", "garbage", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The operator's output is read by a thread: wait for the lines.
    wait_for_log(&op, "certify refused: token not accepted").await;
    wait_for_log(&op, "certify refused: invalid CSR").await;
    let log = op.log();
    assert!(
        !log.contains("tok-unknown-0000000000000000"),
        "a token reached the log"
    );
    assert!(!log.contains(TOKEN_A), "a token reached the log");
}

fn der_of_csr(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// Replaces the public key bytes inside `csr_pem` with those of `other`
/// (same length for P-256), keeping the original signature.
fn swap_public_key(csr_pem: &str, other_pem: &str) -> String {
    use x509_parser::certification_request::X509CertificationRequest;
    let mine = der_of_csr(csr_pem);
    let theirs = der_of_csr(other_pem);
    let (_, a) = X509CertificationRequest::from_der(&mine).unwrap();
    let (_, b) = X509CertificationRequest::from_der(&theirs).unwrap();
    let key_a = a
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let key_b = b
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    assert_eq!(key_a.len(), key_b.len());
    let pos = mine
        .windows(key_a.len())
        .position(|w| w == key_a.as_slice())
        .unwrap();
    let mut out = mine.clone();
    out[pos..pos + key_b.len()].copy_from_slice(&key_b);
    palisade_operator::ca::pem::encode("CERTIFICATE REQUEST", &out)
}

#[tokio::test]
async fn leaf_profile_lifetime_serials_and_chain() {
    let (_tmp, op) = start(&["--cert-ttl", "30m"]);
    let mut client = op.client().await;
    let (_key, csr_pem) = csr(vec![]);
    let before = SystemTime::now();
    let first = certify(&mut client, TOKEN_A, &csr_pem, 0).await.unwrap();
    let second = certify(&mut client, TOKEN_A, &csr_pem, 0).await.unwrap();

    let chain = chain_der(&first);
    // Generated CA: the issuer is the root, so the chain is the leaf alone.
    assert_eq!(chain.len(), 1);
    assert_eq!(first.trust_bundle_pem.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&op.bundle_path).unwrap(),
        first.trust_bundle_pem[0]
    );
    verify(&chain, &bundle_der(&first)).unwrap();

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject means the SAN must be critical");

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let now = before.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(
        not_after - not_before,
        30 * 60 + 5 * 60,
        "30m lifetime + 5m back-dating"
    );
    assert!(
        (now - 5 * 60 - not_before).abs() <= 5,
        "not-before is back-dated 5 minutes"
    );
    assert_eq!(first.expires_at.unwrap().seconds, not_after);

    let chain2 = chain_der(&second);
    let (_, leaf2) = X509Certificate::from_der(&chain2[0]).unwrap();
    assert_ne!(leaf.raw_serial(), leaf2.raw_serial());
    assert!(leaf.raw_serial().len() >= 9, "at least 64 random bits");

    // An agent may ask for less, never for more.
    let short = certify(&mut client, TOKEN_A, &csr_pem, 120).await.unwrap();
    let long = certify(&mut client, TOKEN_A, &csr_pem, 7 * 24 * 3600)
        .await
        .unwrap();
    let lifetime = |r: &palisade_proto::identity::v1::CertifyResponse| {
        let chain = chain_der(r);
        let (_, c) = X509Certificate::from_der(&chain[0]).unwrap();
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    };
    assert_eq!(lifetime(&short), 120 + 300);
    assert_eq!(lifetime(&long), 30 * 60 + 300);

    // Every issuance is logged with identity and serial, never the token.
    let serial = hex_serial(&leaf);
    let line = wait_for_log(&op, &serial).await;
    assert!(
        line.contains("certificate issued") && line.contains(ID_A),
        "{line}"
    );
    assert!(!op.log().contains(TOKEN_A));
}

fn hex_serial(cert: &X509Certificate<'_>) -> String {
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn the_operator_serves_tls_with_its_own_spiffe_identity() {
    let (_tmp, op) = start(&[
        "--namespace",
        "mesh-system",
        "--trust-domain",
        "prod.example",
    ]);
    let served = served_certificate(&op).await;
    assert_eq!(
        sans(&served),
        vec![
            "URI:spiffe://prod.example/ns/mesh-system/sa/palisade-operator".to_owned(),
            "DNS:palisade-operator.mesh-system.svc".to_owned(),
            "DNS:localhost".to_owned(),
            "IP:127.0.0.1".to_owned(),
        ]
    );
    // Workload identities use the configured trust domain too.
    let resp = certify_fresh(&mut op.client().await, TOKEN_A)
        .await
        .unwrap();
    assert_eq!(resp.spiffe_id, "spiffe://prod.example/ns/shop/sa/orders");
}

/// Handshakes with the operator by IP address (so its certificate must name
/// 127.0.0.1), verifying against the trust bundle; returns the leaf served.
async fn served_certificate(op: &Operator) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    install_ring();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(op.bundle_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(op.addr).await.unwrap();
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await
        .expect("handshake verified against the trust bundle");
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    conn.peer_certificates().unwrap()[0].clone().into_owned()
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_before_it_expires() {
    let (_tmp, op) = start(&["--cert-ttl", "3s"]);
    let first = served_certificate(&op).await;
    // Renewal happens at 70 % of the lifetime; wait past expiry of the first.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let second = served_certificate(&op).await;
    assert_ne!(first, second);
    assert!(
        op.log()
            .contains("renewed the operator's serving certificate")
    );
}

#[tokio::test]
async fn intermediate_from_the_users_root() {
    let pki = user_pki();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // The root also appears in chain.pem, as many tools write it; it must
    // not be served as an intermediate.
    write_ca_files(
        &state,
        &pki.intermediate_pem,
        &pki.intermediate_key_pem,
        Some(&pki.root_pem),
        &pki.root_pem,
    );
    let tokens = write_tokens(tmp.path(), &[(TOKEN_A, "shop", "orders")]);
    let op = spawn_operator(&state, &tokens, &[]);
    // The client trusts only the user's root: the operator's own serving
    // chain must include the intermediate for this to connect.
    let mut client = client(op.addr, &pki.root_pem).await;
    let resp = certify_fresh(&mut client, TOKEN_A).await.unwrap();
    let chain = chain_der(&resp);
    assert_eq!(chain.len(), 2, "leaf, intermediate");
    assert_eq!(chain[1], der(&pki.intermediate_pem));
    assert_eq!(resp.trust_bundle_pem.len(), 1);
    assert_eq!(bundle_der(&resp)[0], der(&pki.root_pem));
    // leaf -> intermediate -> root
    verify(&chain, &bundle_der(&resp)).unwrap();
    // Without the intermediate the leaf does not chain.
    assert!(verify(&chain[..1], &bundle_der(&resp)).is_err());
}

#[tokio::test]
async fn root_rotation_serves_the_whole_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let tokens = write_tokens(tmp.path(), &[(TOKEN_A, "shop", "orders")]);
    let out = std::process::Command::new(BIN)
        .args(["ca", "init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let old_root = std::fs::read_to_string(state.join("ca/trust-bundle.pem")).unwrap();
    let old_key = std::fs::read_to_string(state.join("ca/issuer-key.pem")).unwrap();
    let new_root = root("New root");
    let new_root_pem = new_root.pem();
    let bundle = format!("{old_root}{new_root_pem}");

    // Step 1: add the new root to the bundle; the old root still issues.
    write_ca_files(&state, &old_root, &old_key, None, &bundle);
    let resp = {
        let op = spawn_operator(&state, &tokens, &[]);
        certify_fresh(&mut op.client().await, TOKEN_A)
            .await
            .unwrap()
    };
    assert_eq!(resp.trust_bundle_pem.len(), 2);
    assert_eq!(bundle_der(&resp), vec![der(&old_root), der(&new_root_pem)]);
    let old_leaf = chain_der(&resp);
    verify(&old_leaf, &[der(&old_root)]).unwrap();

    // Step 2: switch the issuer to the new root; both stay trusted.
    write_ca_files(
        &state,
        &new_root_pem,
        &new_root.key().serialize_pem(),
        None,
        &bundle,
    );
    let op = spawn_operator(&state, &tokens, &[]);
    let resp = certify_fresh(&mut op.client().await, TOKEN_A)
        .await
        .unwrap();
    assert_eq!(bundle_der(&resp), vec![der(&old_root), der(&new_root_pem)]);
    let new_leaf = chain_der(&resp);
    verify(&new_leaf, &bundle_der(&resp)).unwrap();
    verify(&new_leaf, &[der(&new_root_pem)]).unwrap();
    assert!(verify(&new_leaf, &[der(&old_root)]).is_err());
    // Peers still holding old-root leaves verify against the same bundle.
    verify(&old_leaf, &bundle_der(&resp)).unwrap();
}

#[test]
fn mismatched_ca_files_stop_the_operator_with_a_reason() {
    let pki = user_pki();
    let other = user_pki();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN_A, "shop", "orders")]);
    let cases = [
        // Key of another intermediate.
        (
            &pki.intermediate_pem,
            &other.intermediate_key_pem,
            &pki.root_pem,
            "does not belong",
        ),
        // Bundle without the issuer's root.
        (
            &pki.intermediate_pem,
            &pki.intermediate_key_pem,
            &other.root_pem,
            "does not chain",
        ),
    ];
    for (i, (issuer, key, bundle, expect)) in cases.into_iter().enumerate() {
        let state = tmp.path().join(format!("state{i}"));
        write_ca_files(&state, issuer, key, None, bundle);
        let stderr = serve_must_fail(&state, &tokens, &[]);
        assert!(stderr.contains(expect), "{stderr}");
    }
}
