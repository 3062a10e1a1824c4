//! The outbound proxy on loopback with real TLS: a plaintext "app" connects
//! to it, it originates mTLS to test servers that present rcgen SPIFFE
//! certificates, and the servers record what they saw (the client identity,
//! the negotiated ALPN, every byte). Then the same path end to end with the
//! real binaries: app → `palisade-agent run --outbound` → `palisade-agent run
//! --inbound` → backend.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::backend::{Http, loopback};
use common::inbound::mesh_policy;
use common::outbound::{
    SeenHeaders, assert_one_request_from_web_at_orders, read_until, recording_app,
};
use common::proc::{Proc, agent_run};
use common::{AGENT, Leaf, ORDERS, TD, TestCa, WEB, signing_key, trust};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use palisade_agent::identity::{CertStore, IssuedCert};
use palisade_agent::outbound::{
    DestinationTable, DiscoveredDestinations, DiscoveredTable, OutboundConfig, OutboundError,
    OutboundMetrics, OutboundOutcome, OutboundProxy, OutboundTarget,
};
use palisade_agent::tls::{MeshTrust, MtlsMode};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bound on anything a test waits for, so a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

/// What a test server's handshake produced.
#[derive(Debug)]
struct Handshake {
    /// The client's verified SPIFFE ID.
    peer: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// A mesh TLS server: reports every handshake, records every byte it
/// receives, echoes it, and answers the client's end of stream with `bye`
/// before closing (so a test can see half-close cross the tunnel).
struct TlsServer {
    addr: SocketAddr,
    handshakes: mpsc::UnboundedReceiver<Result<Handshake, String>>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl TlsServer {
    /// Presents a valid leaf for `id` from `ca`; trusts `trust`.
    async fn start(ca: &TestCa, id: &str, trust: &MeshTrust) -> Self {
        let config = trust.server_config(ca.store(id), MtlsMode::Strict).unwrap();
        Self::start_with(config, trust.clone()).await
    }

    async fn start_with(config: rustls::ServerConfig, trust: MeshTrust) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, handshakes) = mpsc::unbounded_channel();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, trust, tx, sink) =
                    (acceptor.clone(), trust.clone(), tx.clone(), sink.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let peer = trust
                        .peer_identity(&tls)
                        .ok()
                        .flatten()
                        .map(|id| id.to_string());
                    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let _ = tx.send(Ok(Handshake { peer, alpn }));
                    let mut buf = [0u8; 4096];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) => {
                                let _ = tls.write_all(b"bye").await;
                                let _ = tls.shutdown().await;
                                return;
                            }
                            Ok(n) => {
                                sink.lock().extend_from_slice(&buf[..n]);
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            received,
        }
    }

    async fn next_handshake(&mut self) -> Result<Handshake, String> {
        tokio::time::timeout(WAIT, self.handshakes.recv())
            .await
            .expect("the server saw no handshake")
            .expect("server stopped")
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().clone()
    }
}

/// An outbound proxy in explicit mode towards `dest`, presenting `certs`,
/// with `--mesh-destination` entries `table`.
async fn proxy_to(
    dest: SocketAddr,
    table: &[String],
    trust: &MeshTrust,
    certs: Arc<CertStore>,
) -> (SocketAddr, Arc<OutboundMetrics>) {
    let table = DestinationTable::parse(table.iter().map(String::as_str)).unwrap();
    let config = OutboundConfig::new(trust.clone(), certs, table);
    spawn_proxy(OutboundTarget::Fixed(dest), config).await
}

/// Binds an outbound proxy for `target` on loopback and runs it in the
/// background; its address and metrics.
async fn spawn_proxy(
    target: OutboundTarget,
    config: OutboundConfig,
) -> (SocketAddr, Arc<OutboundMetrics>) {
    let metrics = config.metrics.clone();
    let proxy = OutboundProxy::bind("127.0.0.1:0".parse().unwrap(), target, config)
        .await
        .unwrap();
    let addr = proxy.local_addr().unwrap();
    tokio::spawn(proxy.run());
    (addr, metrics)
}

/// A TLS server presenting `server_id` (from a fresh mesh CA), and an
/// outbound proxy for web that expects orders there.
async fn web_expecting_orders_at(server_id: &str) -> (TlsServer, SocketAddr, Arc<OutboundMetrics>) {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let server = TlsServer::start(&ca, server_id, &trust).await;
    let entry = format!("{}={ORDERS}", server.addr);
    let (proxy, metrics) = proxy_to(server.addr, &[entry], &trust, ca.store(WEB)).await;
    (server, proxy, metrics)
}

/// Reads until the proxy closes the app's connection; an error (reset)
/// counts as closed. Returns what arrived before.
async fn read_until_closed(app: &mut TcpStream) -> Vec<u8> {
    read_until(
        app,
        WAIT,
        "the proxy left the app's connection open",
        |_| false,
    )
    .await
}

/// Connects to `proxy`, sends `msg` and reads until the proxy closes the
/// connection (see [`read_until_closed`]).
async fn send_and_drain(proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut app = TcpStream::connect(proxy).await.unwrap();
    app.write_all(msg).await.unwrap();
    read_until_closed(&mut app).await
}

/// Sends `msg` on `app` and reads back as many bytes (the echo).
async fn echoed(app: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    app.write_all(msg).await.unwrap();
    let mut echo = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, app.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    echo
}

#[tokio::test]
async fn bytes_flow_to_the_expected_identity_with_our_certificate_and_half_close() {
    let (mut server, proxy, metrics) = web_expecting_orders_at(ORDERS).await;

    let mut app = TcpStream::connect(proxy).await.unwrap();
    assert_eq!(echoed(&mut app, b"ping").await, b"ping");
    let hs = server.next_handshake().await.unwrap();
    assert_eq!(hs.peer.as_deref(), Some(WEB), "the server saw our identity");
    // "ping" is no request line: opaque TCP, no ALPN.
    assert_eq!(hs.alpn, None);

    // Half-close: our end of stream reaches the server, whose answer to it
    // still comes back.
    app.shutdown().await.unwrap();
    let rest = read_until_closed(&mut app).await;
    assert_eq!(rest, b"bye");
    assert_eq!(server.received(), b"ping");
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);
}

#[tokio::test]
async fn a_server_with_the_wrong_spiffe_id_gets_nothing_and_the_app_is_closed() {
    // A valid mesh certificate, but for payments, not orders.
    let (mut server, proxy, metrics) = web_expecting_orders_at(PAYMENTS).await;

    let got = send_and_drain(proxy, b"GET /secret HTTP/1.1\r\nhost: orders\r\n\r\n").await;
    assert!(got.is_empty(), "the app got {got:?}");
    let hs = server.next_handshake().await;
    assert!(hs.is_err(), "the server completed a handshake: {hs:?}");
    assert!(server.received().is_empty());
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 0);
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let ca = TestCa::new("mesh root");
    let other = TestCa::new("someone else's root");
    let trust = trust(&[&ca]);
    // The right SPIFFE ID, signed by a CA outside our bundle. The server
    // trusts both CAs, so any refusal is the proxy's.
    let both = common::trust(&[&ca, &other]);
    let config = both
        .server_config(other.store(ORDERS), MtlsMode::Strict)
        .unwrap();
    let mut server = TlsServer::start_with(config, both).await;
    let entry = format!("{}={ORDERS}", server.addr);
    let (proxy, metrics) = proxy_to(server.addr, &[entry], &trust, ca.store(WEB)).await;

    assert!(send_and_drain(proxy, b"hello").await.is_empty());
    assert!(server.next_handshake().await.is_err());
    assert!(server.received().is_empty());
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);
}

#[tokio::test]
async fn unpinned_destinations_still_require_our_trust_domain() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    // Signed by our CA, but a SPIFFE ID of another trust domain.
    let resolver = ca.resolver(&Leaf::spiffe("spiffe://evil.example/ns/shop/sa/orders"));
    let config = trust.server_config(resolver, MtlsMode::Permissive).unwrap();
    let mut server = TlsServer::start_with(config, trust.clone()).await;
    // No table entry: explicit mode accepts any identity *of the trust domain*.
    let (proxy, metrics) = proxy_to(server.addr, &[], &trust, ca.store(WEB)).await;

    assert!(send_and_drain(proxy, b"hello").await.is_empty());
    assert!(server.next_handshake().await.is_err());
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);

    // While any identity of the trust domain is fine there.
    let mut good = TlsServer::start(&ca, PAYMENTS, &trust).await;
    let (proxy, metrics) = proxy_to(good.addr, &[], &trust, ca.store(WEB)).await;
    let mut app = TcpStream::connect(proxy).await.unwrap();
    assert_eq!(echoed(&mut app, b"hello").await, b"hello");
    assert_eq!(
        good.next_handshake().await.unwrap().peer.as_deref(),
        Some(WEB)
    );
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);
}

#[tokio::test]
async fn a_plaintext_server_at_a_meshed_destination_is_never_sent_plaintext() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    // A plaintext HTTP server recording what it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tcp.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(buf[..n].to_vec());
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nplaintext")
                    .await;
            });
        }
    });
    let entry = format!("{addr}={ORDERS}");
    let (proxy, metrics) = proxy_to(addr, &[entry], &trust, ca.store(WEB)).await;

    let got = send_and_drain(proxy, b"GET /secret HTTP/1.1\r\nhost: orders\r\n\r\n").await;
    assert!(
        got.is_empty(),
        "the app got {:?}",
        String::from_utf8_lossy(&got)
    );
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.first(), Some(&0x16), "not a TLS handshake record");
    assert!(
        !first.windows(7).any(|w| w == b"/secret"),
        "the app's bytes leaked in plaintext"
    );
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);
}

#[tokio::test]
async fn alpn_follows_the_apps_first_bytes_which_arrive_untouched() {
    let (mut server, proxy, metrics) = web_expecting_orders_at(ORDERS).await;

    let cases: [(&[u8], Option<&[u8]>); 3] = [
        (H2_PREFACE, Some(b"h2")),
        (b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n", Some(b"http/1.1")),
        (b"\x00\x01opaque", None),
    ];
    for (first, alpn) in cases {
        let mut app = TcpStream::connect(proxy).await.unwrap();
        let echo = echoed(&mut app, first).await;
        assert_eq!(echo, first, "the bytes were changed or consumed");
        let hs = server.next_handshake().await.unwrap();
        assert_eq!(
            hs.alpn.as_deref(),
            alpn,
            "for {:?}",
            String::from_utf8_lossy(first)
        );
        drop(app);
    }

    // A server-first protocol: the app sends nothing; after the detection
    // timeout the tunnel opens without ALPN and works both ways.
    let mut app = TcpStream::connect(proxy).await.unwrap();
    let hs = server.next_handshake().await.unwrap();
    assert_eq!(hs.alpn, None);
    assert_eq!(echoed(&mut app, b"late").await, b"late");
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 4);
}

#[tokio::test]
async fn a_renewed_certificate_is_used_by_the_next_connection() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let mut server = TlsServer::start(&ca, ORDERS, &trust).await;
    let store = ca.store(WEB);
    let entry = format!("{}={ORDERS}", server.addr);
    let (proxy, _) = proxy_to(server.addr, &[entry], &trust, store.clone()).await;

    let mut first = TcpStream::connect(proxy).await.unwrap();
    first.write_all(b"one").await.unwrap();
    assert_eq!(
        server.next_handshake().await.unwrap().peer.as_deref(),
        Some(WEB)
    );

    // Renewal installs a new certificate (here with a new identity, so the
    // server can tell which one it got).
    const WEB_V2: &str = "spiffe://cluster.local/ns/shop/sa/web-v2";
    let (chain, key) = ca.leaf(&Leaf::spiffe(WEB_V2));
    store.install(IssuedCert::new(chain, signing_key(&key), TD).unwrap());

    let mut second = TcpStream::connect(proxy).await.unwrap();
    second.write_all(b"two").await.unwrap();
    assert_eq!(
        server.next_handshake().await.unwrap().peer.as_deref(),
        Some(WEB_V2)
    );
    // The established tunnel is unaffected.
    let mut echo = [0u8; 3];
    first.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"one");
}

#[tokio::test]
async fn an_unreachable_destination_closes_the_app_connection() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (proxy, metrics) = proxy_to(dead, &[format!("{dead}=*")], &trust, ca.store(WEB)).await;
    assert!(
        send_and_drain(proxy, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_empty()
    );
    assert_eq!(metrics.connections(OutboundOutcome::ConnectFailed), 1);
}

#[tokio::test]
async fn a_connection_to_the_transparent_listener_itself_is_refused() {
    // Not redirected by iptables: its "original destination" is the listener
    // itself (or unknown) — forwarding it would loop.
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let config = OutboundConfig::new(
        trust,
        ca.store(WEB),
        DestinationTable::parse(["0.0.0.0/0=*"]).unwrap(),
    );
    let (addr, metrics) = spawn_proxy(OutboundTarget::OriginalDst, config).await;
    assert!(
        send_and_drain(addr, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_empty()
    );
    assert_eq!(metrics.connections(OutboundOutcome::Denied), 1);
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 0);
}

#[tokio::test]
async fn identities_of_another_trust_domain_are_refused_at_start() {
    let ca = TestCa::new("mesh root");
    let table = DestinationTable::parse(["10.0.0.0/8=spiffe://other.example/ns/a/sa/b"]).unwrap();
    let config = OutboundConfig::new(trust(&[&ca]), ca.store(WEB), table);
    let err = OutboundProxy::bind(
        "127.0.0.1:0".parse().unwrap(),
        OutboundTarget::OriginalDst,
        config,
    )
    .await
    .err()
    .expect("bind must fail");
    assert!(
        matches!(err, OutboundError::ForeignTrustDomain { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("other.example"), "{err}");
}

// ---------------------------------------------------------------------------
// Identities pinned from discovery.

/// The discovered table pinning `id` at `dest` (as the watcher would swap in).
fn discovered_at(dest: SocketAddr, id: &str, version: &str) -> DiscoveredTable {
    DiscoveredTable {
        version: Some(version.into()),
        table: DestinationTable::parse([format!("{dest}={id}").as_str()]).unwrap(),
        skipped: 0,
    }
}

/// An explicit-mode proxy to `dest` with flag entries `flags` that also
/// consults `discovered`.
async fn proxy_with_discovery(
    dest: SocketAddr,
    flags: &[String],
    discovered: &DiscoveredDestinations,
    trust: &MeshTrust,
    certs: Arc<CertStore>,
) -> (SocketAddr, Arc<OutboundMetrics>) {
    let table = DestinationTable::parse(flags.iter().map(String::as_str)).unwrap();
    let config =
        OutboundConfig::new(trust.clone(), certs, table).with_discovered(discovered.clone());
    spawn_proxy(OutboundTarget::Fixed(dest), config).await
}

/// Sends `msg` through the proxy and returns what came back before close.
async fn round_trip(proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut app = TcpStream::connect(proxy).await.unwrap();
    // The proxy may already have closed (refused handshake): ignore errors.
    let _ = app.write_all(msg).await;
    let _ = app.shutdown().await;
    read_until_closed(&mut app).await
}

#[tokio::test]
async fn the_identity_discovery_says_is_pinned_per_connection() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    // The server at dest is orders; no flag covers dest.
    let mut server = TlsServer::start(&ca, ORDERS, &trust).await;
    let discovered = DiscoveredDestinations::new();
    discovered.replace(discovered_at(server.addr, ORDERS, "d1"));
    let (proxy, metrics) =
        proxy_with_discovery(server.addr, &[], &discovered, &trust, ca.store(WEB)).await;

    // Discovery says orders: tunnelled, echoed, the server's half-close answer back.
    assert_eq!(round_trip(proxy, b"first").await, b"firstbye");
    assert_eq!(
        server.next_handshake().await.unwrap().peer.as_deref(),
        Some(WEB)
    );
    assert_eq!(server.received(), b"first");
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);

    // Discovery now says payments lives there; the server is still orders:
    // the very next connection is refused, and nothing reaches the server app.
    discovered.replace(discovered_at(server.addr, PAYMENTS, "d2"));
    assert!(round_trip(proxy, b"second").await.is_empty());
    assert!(
        server.next_handshake().await.is_err(),
        "handshake must fail"
    );
    assert_eq!(
        server.received(),
        b"first",
        "no byte of the second connection"
    );
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);

    // And back: orders again works again.
    discovered.replace(discovered_at(server.addr, ORDERS, "d3"));
    assert_eq!(round_trip(proxy, b"third").await, b"thirdbye");
    assert_eq!(server.received(), b"firstthird");
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 2);
}

#[tokio::test]
async fn flags_override_discovery() {
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let mut server = TlsServer::start(&ca, ORDERS, &trust).await;
    let discovered = DiscoveredDestinations::new();
    // Discovery is wrong about this destination; the flag is right and wins.
    discovered.replace(discovered_at(server.addr, PAYMENTS, "d1"));
    let flag = format!("{}={ORDERS}", server.addr);
    let (proxy, metrics) =
        proxy_with_discovery(server.addr, &[flag], &discovered, &trust, ca.store(WEB)).await;
    assert_eq!(round_trip(proxy, b"ping").await, b"pingbye");
    assert!(server.next_handshake().await.is_ok());
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);

    // The other way round: a flag pinning payments beats discovery saying
    // orders (the real server), so the connection is refused.
    let discovered = DiscoveredDestinations::new();
    discovered.replace(discovered_at(server.addr, ORDERS, "d1"));
    let flag = format!("{}={PAYMENTS}", server.addr);
    let (proxy, metrics) =
        proxy_with_discovery(server.addr, &[flag], &discovered, &trust, ca.store(WEB)).await;
    assert!(round_trip(proxy, b"pong").await.is_empty());
    assert!(server.next_handshake().await.is_err());
    assert_eq!(server.received(), b"ping");
    assert_eq!(metrics.connections(OutboundOutcome::HandshakeFailed), 1);
}

#[tokio::test]
async fn discovery_without_an_entry_for_the_destination_accepts_the_trust_domain() {
    // An explicit destination is always meshed: covered by neither table,
    // any identity of the trust domain is accepted (never plaintext).
    let ca = TestCa::new("mesh root");
    let trust = trust(&[&ca]);
    let mut server = TlsServer::start(&ca, ORDERS, &trust).await;
    let discovered = DiscoveredDestinations::new();
    discovered.replace(DiscoveredTable {
        version: Some("d1".into()),
        table: DestinationTable::parse([format!("10.255.0.1={PAYMENTS}").as_str()]).unwrap(),
        skipped: 0,
    });
    let (proxy, metrics) =
        proxy_with_discovery(server.addr, &[], &discovered, &trust, ca.store(WEB)).await;
    assert_eq!(round_trip(proxy, b"hi").await, b"hibye");
    assert!(server.next_handshake().await.is_ok());
    assert_eq!(metrics.connections(OutboundOutcome::Mtls), 1);
}

// ---------------------------------------------------------------------------
// End to end with the real binaries.

/// Writes `ca.pem`, and `NAME.pem` / `NAME.key` for each identity.
fn write_pki(dir: &Path, ca: &TestCa, ids: &[(&str, &str)]) {
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    for (name, id) in ids {
        let (cert, key) = ca.leaf_cert(&Leaf::spiffe(id));
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// Mesh default: every authenticated peer is allowed, strict mTLS.
fn write_policy(path: &Path) {
    std::fs::write(path, mesh_policy(Vec::new()).encode_to_vec()).unwrap();
}

/// An HTTP/1.1 + h2c app recording the headers of every request, answering "app".
async fn recording_backend() -> (SocketAddr, SeenHeaders) {
    // HTTP/1.1 and h2c: the inbound agent keeps HTTP/2 as HTTP/2.
    let listener = loopback().await;
    let addr = listener.local_addr().unwrap();
    (addr, recording_app(listener, Http::Auto, b"app"))
}

/// One plaintext HTTP/1.1 GET, as the app would send it; `Err` when the
/// connection is closed without an answer.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "orders.shop")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// Starts `cmd` (see [`agent_run`]) as `name`; it, and the address its
/// `{proxy} proxy listening` line names.
async fn start(name: &str, cmd: Command, proxy: &str) -> (Proc, SocketAddr) {
    let mut agent = Proc::spawn(name, "info", cmd);
    let addr = agent
        .wait_for_field(&format!("{proxy} proxy listening"), "listen")
        .await
        .parse()
        .unwrap();
    (agent, addr)
}

/// An outbound agent for web as `name`, listening on loopback for `dest`,
/// with the `--mesh-destination` entry `mesh`.
async fn start_outbound(
    name: &str,
    dir: &Path,
    dest: SocketAddr,
    mesh: &str,
) -> (Proc, SocketAddr) {
    let outbound_arg = format!("127.0.0.1:0={dest}");
    let args = ["--outbound", &outbound_arg, "--mesh-destination", mesh];
    start(name, agent_run(dir, "web", &args), "outbound").await
}

#[tokio::test]
async fn explicit_mode_end_to_end_through_both_agents() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    write_pki(dir.path(), &ca, &[("web", WEB), ("orders", ORDERS)]);
    let policy = dir.path().join("orders.pb");
    write_policy(&policy);
    let (backend, seen) = recording_backend().await;

    let inbound_arg = format!("127.0.0.1:0={backend}");
    let (_inbound, inbound_addr) = start(
        "inbound agent",
        agent_run(
            dir.path(),
            "orders",
            &[
                "--inbound",
                &inbound_arg,
                "--policy-file",
                policy.to_str().unwrap(),
            ],
        ),
        "inbound",
    )
    .await;

    // The client's agent expects orders at the inbound agent.
    let mesh = format!("{inbound_addr}={ORDERS}");
    let (_outbound, outbound_addr) =
        start_outbound("outbound agent", dir.path(), inbound_addr, &mesh).await;

    let (status, body) = http_get(outbound_addr, "/orders/1").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "app"));
    assert_one_request_from_web_at_orders(&seen, "no XFCC: the request did not cross mTLS");

    // HTTP/2 with prior knowledge (as gRPC clients speak it) crosses too.
    let tcp = TcpStream::connect(outbound_addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://orders.shop/orders/h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let headers = seen.lock().clone();
    assert_eq!(headers.len(), 2);
    let xfcc = headers[1]["x-forwarded-client-cert"].to_str().unwrap();
    assert!(xfcc.ends_with(&format!(";URI={WEB}")), "{xfcc}");

    // An agent expecting someone else at the same address refuses to talk.
    let wrong = format!("{inbound_addr}={PAYMENTS}");
    let (mut mistaken, mistaken_addr) =
        start_outbound("mistaken outbound agent", dir.path(), inbound_addr, &wrong).await;
    let refused = http_get(mistaken_addr, "/orders/2").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(seen.lock().len(), 2, "the refused request reached the app");
    let logged = mistaken
        .wait_for_field("mTLS handshake failed", "expected")
        .await;
    assert_eq!(logged, PAYMENTS);
}

/// `palisade-agent run` with a trust bundle that does not exist.
fn run_with_missing_files() -> Command {
    let mut cmd = Command::new(AGENT);
    cmd.args([
        "run",
        "--trust-bundle",
        "/nonexistent",
        "--cert",
        "c",
        "--key",
        "k",
    ]);
    cmd
}

#[test]
fn run_help_describes_the_outbound_and_transparent_flags() {
    let out = Command::new(AGENT)
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--outbound <LISTEN=DEST>",
        "--mesh-destination <ADDR=ID>",
        "--outbound-unmatched",
        "[possible values: passthrough, deny]",
        "--transparent",
        "--inbound-port",
        "[default: 15006]",
        "--outbound-port",
        "[default: 15001]",
        "--outbound-detect-timeout-ms",
        "--outbound-connect-timeout-ms",
        "--inbound <LISTEN=APP>",
        "--advertise-address <IP>",
        "[env: POD_IP",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    // An advertise address nobody can reach is refused by name; an empty
    // POD_IP is no address at all (and gets as far as the trust bundle).
    let advertise = |value: &str, env: &str| {
        run_with_missing_files()
            .env("POD_IP", env)
            .args(["--admin", "", "--outbound", "127.0.0.1:1=127.0.0.1:2"])
            .args(if value.is_empty() {
                vec![]
            } else {
                vec!["--advertise-address", value]
            })
            .output()
            .unwrap()
    };
    for bad in ["0.0.0.0", "::", "224.0.0.1", "pod-ip"] {
        let out = advertise(bad, "");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("--advertise-address") && err.contains(bad),
            "{bad}: {err}"
        );
    }
    let out = advertise("", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("--advertise-address") && err.contains("/nonexistent"),
        "{err}"
    );
    // Without any of --inbound / --transparent / --outbound: a usage error.
    let out = run_with_missing_files().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--inbound") && err.contains("--transparent") && err.contains("--outbound"),
        "{err}"
    );
    // A bad table entry is refused by name.
    let out = run_with_missing_files()
        .args([
            "--outbound",
            "127.0.0.1:1=127.0.0.1:2",
            "--mesh-destination",
            "10.0.0.0/33=*",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"33\""), "{err}");
}
