//! `palisadectl certs inspect` on files and on a live TLS endpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// `palisadectl certs inspect <args…>`.
fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(["certs", "inspect"])
        .args(args)
        .output()
        .expect("run palisadectl")
}

/// The report of an `--output json` run.
fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The JSON report of a successful `certs inspect <source…> --bundle <bundle>`.
fn inspect_against_bundle(source: &[&str], bundle: &Path) -> serde_json::Value {
    let mut args = source.to_vec();
    args.extend([
        "--bundle",
        bundle.to_str().expect("path"),
        "--output",
        "json",
    ]);
    let out = inspect(&args);
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

/// Writes `pem` to `dir/name`.
fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write");
    path
}

struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    Ca {
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, uris: &[&str]) -> (String, KeyPair) {
    let mut params = CertificateParams::new(Vec::new()).expect("params");
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key)
}

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

#[test]
fn inspect_file_reports_identity_and_verification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = ca("palisade root");
    let (leaf_pem, _) = leaf(&root, &[ORDERS]);
    let leaf_file = write_pem(dir.path(), "leaf.pem", &leaf_pem);
    let bundle = write_pem(dir.path(), "bundle.pem", &root.cert_pem);
    let foreign = write_pem(dir.path(), "foreign.pem", &ca("someone else").cert_pem);
    let leaf_arg = leaf_file.to_str().expect("path");

    let v = inspect_against_bundle(&["--file", leaf_arg], &bundle);
    assert_eq!(v["spiffeId"], ORDERS);
    assert_eq!(v["verifiesAgainstBundle"], true);
    assert_eq!(
        v["chain"][0]["issuer"]
            .as_str()
            .map(|s| s.contains("palisade root")),
        Some(true)
    );

    let out = inspect(&[
        "--file",
        leaf_arg,
        "--bundle",
        foreign.to_str().expect("path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verifies against bundle: false"));

    let out = inspect(&["--file", leaf_arg, "--trust-domain", "other.domain"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn inspect_refuses_a_leaf_with_two_spiffe_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = ca("root");
    let (leaf_pem, _) = leaf(&root, &[ORDERS, "spiffe://cluster.local/ns/shop/sa/admin"]);
    let file = write_pem(dir.path(), "two.pem", &leaf_pem);
    let out = inspect(&["--file", file.to_str().expect("path"), "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert!(v["spiffeId"].is_null());
    assert!(v["spiffeIdError"].is_string());
}

#[test]
fn inspect_live_endpoint_shows_the_presented_chain() {
    let root = ca("live root");
    let (leaf_pem, key) = leaf(&root, &[ORDERS]);
    let certs: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(leaf_pem.as_bytes())
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()
        .expect("pem");
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    runtime.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = write_pem(dir.path(), "bundle.pem", &root.cert_pem);
    let v = inspect_against_bundle(&["--endpoint", &addr.to_string()], &bundle);
    assert_eq!(v["spiffeId"], ORDERS);
    assert_eq!(v["verifiesAgainstBundle"], true);
}
