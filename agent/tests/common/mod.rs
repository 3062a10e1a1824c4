//! Shared test helpers: an rcgen CA, leaves with chosen SANs and validity, and
//! a tokio-rustls echo server / client pair that report what the handshake did.
#![allow(dead_code)] // each test binary uses a different subset

pub mod backend;
pub mod discovery;
pub mod inbound;
pub mod netns;
pub mod operator;
pub mod outbound;
pub mod proc;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use palisade_agent::identity::{CertStore, IssuedCert};
use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
use palisade_policy::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::{CertifiedKey, SigningKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_palisade-agent");

pub const TD: &str = "cluster.local";
pub const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const OPERATOR: &str = "spiffe://cluster.local/ns/palisade-system/sa/palisade-operator";

pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Leaf chain (just the leaf) and its key.
    pub fn leaf(&self, spec: &Leaf) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let (cert, key) = self.leaf_cert(spec);
        (vec![cert.der().clone()], key)
    }

    pub fn leaf_cert(&self, spec: &Leaf) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for u in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.as_str().try_into().expect("URI SAN")));
        }
        for d in &spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into().expect("DNS SAN")));
        }
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert, key)
    }

    /// A fixed resolver presenting this leaf, whatever is in it.
    pub fn resolver(&self, spec: &Leaf) -> Arc<SingleCertAndKey> {
        let (chain, key) = self.leaf(spec);
        Arc::new(SingleCertAndKey::from(CertifiedKey::new(
            chain,
            signing_key(&key),
        )))
    }

    /// A [`CertStore`] holding a valid leaf for `id`.
    pub fn store(&self, id: &str) -> Arc<CertStore> {
        let (chain, key) = self.leaf(&Leaf::spiffe(id));
        let store = CertStore::new();
        store.install(IssuedCert::new(chain, signing_key(&key), TD).expect("issued cert"));
        Arc::new(store)
    }
}

pub fn signing_key(key: &KeyPair) -> Arc<dyn SigningKey> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .expect("load key")
}

pub struct Leaf {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    /// Valid from a minute ago for an hour.
    pub fn spiffe(id: &str) -> Self {
        let now = SystemTime::now();
        Self {
            uris: vec![id.to_owned()],
            dns: vec![],
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        }
    }
}

pub fn trust(cas: &[&TestCa]) -> MeshTrust {
    let roots = cas.iter().map(|c| c.der.clone()).collect();
    let bundle = SharedTrustBundle::new(TrustBundle::from_der(roots).expect("bundle"));
    MeshTrust::new(bundle, TD).expect("trust")
}

/// What one inbound handshake produced.
pub type Accepted = Result<Option<SpiffeId>, io::Error>;

/// A TLS server that reports each handshake's result on `accepted`, then sends
/// the peer's SPIFFE ID (or `-`) as a first line and echoes everything after.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: mpsc::UnboundedReceiver<Accepted>,
}

impl EchoServer {
    pub async fn start(config: ServerConfig, trust: MeshTrust) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let trust = trust.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let id = trust
                        .peer_identity(&tls)
                        .map_err(|e| io::Error::other(e.to_string()));
                    let line = match &id {
                        Ok(Some(id)) => format!("{id}\n"),
                        _ => "-\n".to_owned(),
                    };
                    let _ = tx.send(id);
                    if tls.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, accepted }
    }

    /// The next handshake's outcome on the server side.
    pub async fn next(&mut self) -> Accepted {
        tokio::time::timeout(Duration::from_secs(10), self.accepted.recv())
            .await
            .expect("server saw no handshake")
            .expect("server stopped")
    }
}

/// A client connection to an [`EchoServer`], past the first line.
pub struct EchoClient {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The identity the server saw for us (`-` for none).
    pub seen_as: String,
}

impl EchoClient {
    /// Handshake and read the server's first line. In TLS 1.3 the server judges
    /// our certificate after our side of the handshake is done, so a refusal
    /// shows up here, on the first read.
    pub async fn dial(addr: SocketAddr, config: ClientConfig) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("mesh.invalid").expect("name");
        let mut stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let seen_as = read_line(&mut stream).await?;
        Ok(Self { stream, seen_as })
    }

    pub async fn echo(&mut self, msg: &[u8]) -> io::Result<()> {
        self.stream.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        self.stream.read_exact(&mut buf).await?;
        if buf != msg {
            return Err(io::Error::other("echo mismatch"));
        }
        Ok(())
    }

    /// The serial (hex) of the certificate the server presented.
    pub fn server_serial(&self) -> String {
        let certs = self
            .stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certs");
        palisade_policy::spiffe_cert::CertificateSummary::parse(certs[0].as_ref())
            .expect("server leaf")
            .serial_hex
    }
}

async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            return String::from_utf8(line).map_err(io::Error::other);
        }
        line.push(b);
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}
