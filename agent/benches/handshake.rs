//! Inbound mTLS handshake cost: full TLS 1.3 mutual-TLS handshakes against the
//! agent's server config (`MeshTrust::server_config`, strict mode), with the
//! agent's client config on the other side (SPIFFE verification both ways,
//! expected server identity, no resumption). ECDSA P-256 leaves, as issued.
//!
//! - `loopback`: TCP over 127.0.0.1 on a single-threaded tokio runtime, so
//!   client and server share one core. One iteration: connect, handshake, and
//!   read one byte the server writes after it has verified the client and read
//!   its SPIFFE ID (in TLS 1.3 the client finishes before the server has
//!   checked its certificate).
//! - `in_memory/both_sides`: the same handshake between rustls connections
//!   in memory, no sockets: the crypto and verification alone.
//! - `in_memory/server_side`: only the time spent in the server's half of
//!   that handshake, i.e. the CPU an agent spends per inbound connection.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_agent::identity::{CertStore, IssuedCert};
use palisade_agent::tls::{MeshTrust, MtlsMode, SharedTrustBundle, TrustBundle, crypto_provider};
use palisade_policy::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: rustls_pki_types::CertificateDer<'static>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "bench mesh root");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A store holding a workload leaf shaped like the operator's (empty
    /// subject, SPIFFE URI SAN only, both EKUs, P-256).
    fn store(&self, id: &str) -> Arc<CertStore> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("URI"))];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(24 * 3600)).into();
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = crypto_provider()
            .key_provider
            .load_private_key(der)
            .expect("load key");
        let store = CertStore::new();
        store.install(IssuedCert::new(vec![cert.der().clone()], signing, TD).expect("issued"));
        Arc::new(store)
    }
}

struct Setup {
    server_trust: MeshTrust,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn setup() -> Setup {
    let ca = Ca::new();
    let trust = || {
        let bundle = TrustBundle::from_der(vec![ca.der.clone()]).expect("bundle");
        MeshTrust::new(SharedTrustBundle::new(bundle), TD).expect("trust")
    };
    let server_trust = trust();
    let server = server_trust
        .server_config(ca.store(ORDERS), MtlsMode::Strict)
        .expect("server config");
    let client = trust()
        .client_config(
            Some(ca.store(WEB)),
            Some(SpiffeId::parse(ORDERS).expect("id")),
        )
        .expect("client config");
    Setup {
        server_trust,
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// Serves on loopback: handshake, check the client's identity, write one byte,
/// wait for the client to go.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, trust: MeshTrust) {
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let trust = trust.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            match trust.peer_identity(&tls) {
                Ok(Some(id)) if id.as_str() == WEB => {}
                other => panic!("server saw {other:?}"),
            }
            if tls.write_all(b"k").await.is_err() {
                return;
            }
            let mut buf = [0u8; 16];
            let _ = tls.read(&mut buf).await;
        });
    }
}

async fn loopback_handshake(addr: std::net::SocketAddr, connector: &TlsConnector) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    // Reset instead of FIN: no TIME_WAIT, so thousands of iterations do not
    // run out of ephemeral ports.
    tcp.set_zero_linger().expect("linger");
    let name = ServerName::try_from("orders.shop").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.expect("server's byte");
    debug_assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    black_box(byte);
}

fn bench_loopback(c: &mut Criterion) {
    let s = setup();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(serve(
        listener,
        TlsAcceptor::from(s.server.clone()),
        s.server_trust.clone(),
    ));
    let connector = TlsConnector::from(s.client.clone());
    // Once outside the measurement: the settings are what we claim.
    rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = connector
            .connect(ServerName::try_from("orders.shop").expect("name"), tcp)
            .await
            .expect("handshake");
        let conn = tls.get_ref().1;
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        let suite = conn.negotiated_cipher_suite().expect("suite").suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let group = conn.negotiated_key_exchange_group().expect("group").name();
        assert_eq!(group, rustls::NamedGroup::X25519);
    });
    c.bench_function("inbound_mtls_handshake/loopback", |b| {
        b.iter(|| rt.block_on(loopback_handshake(addr, &connector)));
    });
}

/// Everything `conn` has to send.
fn drain<D>(conn: &mut ConnectionCommon<D>) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// Hands `bytes` to `conn` and lets it process them.
fn feed<D>(conn: &mut ConnectionCommon<D>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read_tls");
        conn.process_new_packets().expect("handshake failed");
    }
}

/// One handshake in memory; returns the time spent in the server's half
/// (creating the connection, processing what the client sent, producing its
/// own flights).
fn in_memory_handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Duration {
    let name = ServerName::try_from("orders.shop").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut server_time = t.elapsed();
    loop {
        let to_server = drain(&mut c);
        let t = Instant::now();
        feed(&mut s, &to_server);
        let to_client = drain(&mut s);
        server_time += t.elapsed();
        feed(&mut c, &to_client);
        if to_server.is_empty() && to_client.is_empty() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    // The server has verified the client's certificate.
    assert!(s.peer_certificates().is_some());
    server_time
}

fn bench_in_memory(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("inbound_mtls_handshake/in_memory");
    group.bench_function("both_sides", |b| {
        b.iter(|| black_box(in_memory_handshake(&s.server, &s.client)));
    });
    group.bench_function("server_side", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| in_memory_handshake(&s.server, &s.client))
                .sum()
        });
    });
    group.finish();
}

criterion_group!(benches, bench_loopback, bench_in_memory);
criterion_main!(benches);
