//! Shared helpers for the operator's integration tests: spawn the real
//! binary, talk real gRPC over real TLS, build CSRs and check certificates.

#![allow(dead_code)] // each test file uses a different subset

pub mod mock_api;
pub mod watch;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use palisade_proto::identity::v1::identity_client::IdentityClient;
use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const BIN: &str = env!("CARGO_BIN_EXE_palisade-operator");

pub fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running `palisade-operator serve`, killed on drop.
pub struct Operator {
    child: Child,
    pub addr: SocketAddr,
    /// The admin port (`/healthz`, `/readyz`, `/metrics`), unless `--admin ''`.
    pub admin: Option<SocketAddr>,
    pub bundle_path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Operator {
    /// Everything the operator logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn bundle_pem(&self) -> String {
        std::fs::read_to_string(&self.bundle_path).unwrap()
    }

    pub async fn client(&self) -> IdentityClient<Channel> {
        client(self.addr, &self.bundle_pem()).await
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `attempt` every 50 ms until it gives `Ok`, for at most
/// [`watch::STEP`]; then fails the test with its last `Err`.
pub async fn poll<T>(mut attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + watch::STEP;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `needle` appears on at least `n` lines of the operator's
/// log (it is read by a thread, so it lags); returns the first such line.
pub async fn wait_for_count(op: &Operator, needle: &str, n: usize) -> String {
    poll(async || {
        let log = op.log();
        let mut found = log.lines().filter(|l| l.contains(needle));
        match (found.next(), found.count() + 1 >= n) {
            (Some(first), true) => Ok(first.to_owned()),
            _ => Err(format!("{needle:?} not logged {n} times:\n{log}")),
        }
    })
    .await
}

/// Waits until `needle` appears in the operator's log; returns its line.
pub async fn wait_for_log(op: &Operator, needle: &str) -> String {
    wait_for_count(op, needle, 1).await
}

/// Writes a token file.
pub fn write_tokens(dir: &Path, lines: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.join("tokens");
    let mut text = String::from("# token namespace serviceaccount\n");
    for (t, ns, sa) in lines {
        text.push_str(&format!("{t} {ns} {sa}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the operator on ephemeral loopback ports (gRPC, and admin unless
/// `extra` sets `--admin`) and waits for its `listening on` line.
pub fn spawn_operator(state_dir: &Path, tokens: &Path, extra: &[&str]) -> Operator {
    // The default admin address (0.0.0.0:15014) would collide between
    // operators started in parallel.
    let admin: &[&str] = if extra.contains(&"--admin") {
        &[]
    } else {
        &["--admin", "127.0.0.1:0"]
    };
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--tokens")
        .arg(tokens)
        .args(["--listen", "127.0.0.1:0"])
        .args(admin)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn palisade-operator");
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let stderr = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = stderr.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut bundle_path = None;
    let mut admin = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "operator did not start; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        if let Some(p) = line.strip_prefix("palisade-operator trust bundle ") {
            bundle_path = Some(PathBuf::from(p));
        }
        if let Some(a) = line.strip_prefix("palisade-operator admin listening on ") {
            admin = Some(a.parse().unwrap());
        }
        if let Some(a) = line.strip_prefix("palisade-operator listening on ") {
            return Operator {
                child,
                addr: a.parse().unwrap(),
                admin,
                bundle_path: bundle_path.expect("trust bundle line before listening line"),
                stderr,
            };
        }
    }
}

/// A gRPC client that trusts `bundle_pem` and checks the server's name
/// (`localhost`) like an agent would.
pub async fn client(addr: SocketAddr, bundle_pem: &str) -> IdentityClient<Channel> {
    install_ring();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS gRPC connection to the operator");
    IdentityClient::new(channel)
}

/// Like [`client`], but a failed connection is returned, not a panic.
pub async fn try_client(
    addr: SocketAddr,
    bundle_pem: String,
) -> Result<IdentityClient<Channel>, tonic::transport::Error> {
    install_ring();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IdentityClient::new(channel))
}

pub async fn certify(
    client: &mut IdentityClient<Channel>,
    token: &str,
    csr_pem: &str,
    ttl: u32,
) -> Result<CertifyResponse, tonic::Status> {
    client
        .certify(CertifyRequest {
            token: token.to_owned(),
            csr_pem: csr_pem.to_owned(),
            requested_ttl_seconds: ttl,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `Certify` with a fresh key, asking for no SANs and the default lifetime.
pub async fn certify_fresh(
    client: &mut IdentityClient<Channel>,
    token: &str,
) -> Result<CertifyResponse, tonic::Status> {
    let (_key, csr_pem) = csr(vec![]);
    certify(client, token, &csr_pem, 0).await
}

/// Runs `palisade-operator serve` with `extra` arguments, for a start-up
/// that must fail: checks that it did and returns what it printed.
pub fn serve_must_fail(state: &Path, tokens: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .arg("--tokens")
        .arg(tokens)
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CSR for a fresh P-256 key, asking for whatever SANs it likes.
pub fn csr(sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

pub fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.to_owned().try_into().unwrap())
}

pub fn dns_san(name: &str) -> SanType {
    SanType::DnsName(name.to_owned().try_into().unwrap())
}

pub fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// The SANs of a certificate, as strings (`URI:…`, `DNS:…`, `IP:…`).
pub fn sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, x) = X509Certificate::from_der(cert).unwrap();
    let Some(ext) = x.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
                Ok(v4) => format!("IP:{}", std::net::Ipv4Addr::from(v4)),
                Err(_) => format!("IP:{ip:?}"),
            },
            other => format!("OTHER:{other:?}"),
        })
        .collect()
}

/// Verifies `chain` (leaf first) against `bundle` with webpki, for both
/// client and server use.
pub fn verify(
    chain: &[CertificateDer<'_>],
    bundle: &[CertificateDer<'_>],
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = bundle
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    );
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            now,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

pub fn chain_der(resp: &CertifyResponse) -> Vec<CertificateDer<'static>> {
    resp.cert_chain_pem.iter().map(|p| der(p)).collect()
}

pub fn bundle_der(resp: &CertifyResponse) -> Vec<CertificateDer<'static>> {
    resp.trust_bundle_pem.iter().map(|p| der(p)).collect()
}

/// A user's own CA: a root and an intermediate below it (what cert-manager
/// or an offline root ceremony would hand over).
pub struct UserPki {
    pub root_pem: String,
    pub intermediate_pem: String,
    pub intermediate_key_pem: String,
}

pub fn root(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    CertifiedIssuer::self_signed(ca_params(name, None), key).unwrap()
}

fn ca_params(name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

pub fn user_pki() -> UserPki {
    let root = root("Example Corp root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = CertifiedIssuer::signed_by(
        ca_params("Example Corp mesh intermediate", Some(0)),
        key,
        &root,
    )
    .unwrap();
    UserPki {
        root_pem: root.pem(),
        intermediate_pem: intermediate.pem(),
        intermediate_key_pem: intermediate.key().serialize_pem(),
    }
}

/// Writes CA files into `<state>/ca/` as a user would.
pub fn write_ca_files(state: &Path, issuer: &str, key: &str, chain: Option<&str>, bundle: &str) {
    let dir = state.join("ca");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("issuer.pem"), issuer).unwrap();
    std::fs::write(dir.join("issuer-key.pem"), key).unwrap();
    if let Some(chain) = chain {
        std::fs::write(dir.join("chain.pem"), chain).unwrap();
    }
    std::fs::write(dir.join("trust-bundle.pem"), bundle).unwrap();
}
