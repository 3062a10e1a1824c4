//! The identity client and renewal loop against a real tonic identity server
//! over TLS (a test double of the operator), with real HTTP/2 traffic over the
//! agent's TLS configs while certificates change underneath.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::operator::{FakeOperator, Misbehaviour};
use common::{OPERATOR, ORDERS, TD, TestCa, WEB, trust};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_agent::identity::{
    CertStore, CertifyError, IdentityClient, IdentityClientConfig, RenewalConfig, RenewalEvent,
    Renewer, TokenSource,
};
use palisade_agent::tls::{MeshTrust, MtlsMode, VerifyError};
use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::{CertIdentityError, CertificateSummary};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn client_config(addr: SocketAddr, token: &str, operator_id: Option<&str>) -> IdentityClientConfig {
    let mut c = IdentityClientConfig::new(addr.to_string(), TokenSource::Static(token.into()));
    c.operator_id = operator_id.map(|id| SpiffeId::parse(id).unwrap());
    c.timeout = Duration::from_secs(5);
    c
}

/// An identity client of the web workload's token.
fn web_client(addr: SocketAddr, operator_id: Option<&str>, ca: &TestCa) -> IdentityClient {
    IdentityClient::new(client_config(addr, "tok-web", operator_id), trust(&[ca])).unwrap()
}

/// A fake operator with a new mesh CA, issuing `ttl` certificates for the web token.
fn web_operator(ttl: Duration) -> Arc<FakeOperator> {
    FakeOperator::new(TestCa::new("mesh root"), ttl, &[("tok-web", WEB)])
}

/// What a web client gets from an operator that misbehaves as told.
async fn certify_from_misbehaving_operator(misbehaviour: Misbehaviour) -> CertifyError {
    let op = web_operator(Duration::from_secs(60));
    *op.misbehave.lock() = misbehaviour;
    let addr = op.serve_default().await;
    let client = web_client(addr, Some(OPERATOR), &op.ca);
    client.certify().await.unwrap_err()
}

fn fast_renewal() -> RenewalConfig {
    RenewalConfig {
        renew_at: 0.7,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_millis(800),
        min_delay: Duration::from_millis(200),
    }
}

/// An agent's identity half: bundle trusting `ca`, a store, a running renewer.
struct Agent {
    trust: MeshTrust,
    store: Arc<CertStore>,
    events: broadcast::Receiver<RenewalEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_agent(ca: &TestCa, operator: SocketAddr, token: &str) -> Agent {
    let trust = trust(&[ca]);
    let client = IdentityClient::new(
        client_config(operator, token, Some(OPERATOR)),
        trust.clone(),
    )
    .unwrap();
    let store = Arc::new(CertStore::new());
    let renewer = Renewer::new(client, store.clone(), fast_renewal());
    let events = renewer.subscribe();
    let task = tokio::spawn(renewer.run());
    Agent {
        trust,
        store,
        events,
        task,
    }
}

async fn next_event(events: &mut broadcast::Receiver<RenewalEvent>) -> RenewalEvent {
    tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("no renewal event in time")
        .expect("renewer gone")
}

async fn next_issued(events: &mut broadcast::Receiver<RenewalEvent>) -> String {
    loop {
        if let RenewalEvent::Issued { serial_hex, .. } = next_event(events).await {
            return serial_hex;
        }
    }
}

fn serial_of(der: &[u8]) -> String {
    CertificateSummary::parse(der).unwrap().serial_hex
}

/// An HTTP/2 server over the agent's inbound TLS config. Each response says who
/// the client is (from the verified certificate) and the client cert's serial.
async fn start_h2_server(trust: MeshTrust, store: Arc<CertStore>) -> SocketAddr {
    let config = trust.server_config(store, MtlsMode::Strict).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let trust = trust.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(Some(peer)) = trust.peer_identity(&tls) else {
                    return;
                };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| serial_of(c.as_ref()))
                    .unwrap_or_default();
                let body = format!("{peer} {serial}");
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// A new HTTP/2 connection over the agent's outbound TLS config; returns the
/// sender and the serial of the server's certificate.
async fn h2_connect(addr: SocketAddr, trust: &MeshTrust, store: Arc<CertStore>) -> (H2, String) {
    let config = trust
        .client_config(Some(store), Some(SpiffeId::parse(ORDERS).unwrap()))
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("orders.shop").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let server_serial = serial_of(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    (send, server_serial)
}

async fn get(send: &mut H2) -> Result<String, String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get("http://orders.shop/")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    String::from_utf8(body.to_bytes().to_vec()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_swap_certificates_under_a_live_http2_connection() {
    let ttl = Duration::from_secs(3);
    let op = FakeOperator::new(
        TestCa::new("mesh root"),
        ttl,
        &[("tok-web", WEB), ("tok-orders", ORDERS)],
    );
    let op_addr = op.serve_default().await;
    let mut web = start_agent(&op.ca, op_addr, "tok-web");
    let mut orders = start_agent(&op.ca, op_addr, "tok-orders");
    let first_web = next_issued(&mut web.events).await;
    let first_orders = next_issued(&mut orders.events).await;
    assert!(web.store.is_ready() && orders.store.is_ready());

    let server = start_h2_server(orders.trust.clone(), orders.store.clone()).await;
    let (mut long_lived, first_server_serial) =
        h2_connect(server, &web.trust, web.store.clone()).await;
    assert_eq!(first_server_serial, first_orders);

    let started = Instant::now();
    let mut requests = 0;
    let mut server_serials = BTreeSet::from([first_server_serial]);
    let mut client_serials = BTreeSet::from([first_web.clone()]);
    let mut next_probe = Instant::now();
    // Well past the first certificates' expiry, through several renewals.
    while started.elapsed() < Duration::from_secs(8) {
        let body = get(&mut long_lived).await.unwrap_or_else(|e| {
            panic!("request {requests} on the long-lived connection failed: {e}")
        });
        // The identity and certificate of the handshake that opened the connection.
        assert_eq!(body, format!("{WEB} {first_web}"));
        requests += 1;
        if Instant::now() >= next_probe {
            // A new handshake sees the current certificates on both sides.
            let (mut fresh, server_serial) =
                h2_connect(server, &web.trust, web.store.clone()).await;
            let body = get(&mut fresh).await.unwrap();
            let (peer, client_serial) = body.split_once(' ').unwrap();
            assert_eq!(peer, WEB);
            server_serials.insert(server_serial);
            client_serials.insert(client_serial.to_owned());
            next_probe = Instant::now() + Duration::from_millis(700);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(requests > 50, "only {requests} requests");

    let mut renewals = 0;
    while let Ok(ev) = web.events.try_recv() {
        if matches!(ev, RenewalEvent::Issued { .. }) {
            renewals += 1;
        }
    }
    assert!(renewals >= 3, "web renewed {renewals} times");
    assert!(
        server_serials.len() >= 4,
        "server serials seen: {server_serials:?}"
    );
    assert!(
        client_serials.len() >= 4,
        "client serials seen: {client_serials:?}"
    );
    let now_serial = web.store.current().unwrap().serial_hex().to_owned();
    assert_ne!(now_serial, first_web);
}

#[tokio::test]
async fn renewal_failure_keeps_the_old_certificate_and_backs_off() {
    let op = web_operator(Duration::from_secs(4));
    let op_addr = op.serve_default().await;
    let mut web = start_agent(&op.ca, op_addr, "tok-web");
    let first = next_issued(&mut web.events).await;
    op.set_failing(true);
    let calls_before = op.call_times().len();

    let mut retries = Vec::new();
    while retries.len() < 5 {
        match next_event(&mut web.events).await {
            RenewalEvent::Failed {
                attempt,
                retry_in,
                seconds_to_expiry,
                error,
            } => {
                assert_eq!(attempt as usize, retries.len() + 1);
                assert!(error.contains("bad day"), "{error}");
                // The certificate still in use is the first one, still valid, still served.
                let current = web.store.current().unwrap();
                assert_eq!(current.serial_hex(), first);
                assert!(web.store.is_ready());
                if retries.is_empty() {
                    assert!(
                        seconds_to_expiry.is_some_and(|s| s > 0),
                        "{seconds_to_expiry:?}"
                    );
                }
                retries.push(retry_in);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Jittered exponential: attempt n waits within [c/2, c], c = min(800ms, 200ms·2ⁿ).
    for (n, d) in retries.iter().enumerate() {
        let ceiling = Duration::from_millis(200 * (1 << n)).min(Duration::from_millis(800));
        assert!(
            *d >= ceiling / 2 && *d <= ceiling,
            "retry {n}: {d:?} not in [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
    // …and the operator really saw the requests that far apart.
    let calls = op.call_times()[calls_before..].to_vec();
    for (i, pair) in calls.windows(2).enumerate().take(retries.len() - 1) {
        let gap = pair[1] - pair[0];
        assert!(
            gap + Duration::from_millis(5) >= retries[i],
            "gap {i}: {gap:?} < {:?}",
            retries[i]
        );
    }

    op.set_failing(false);
    let renewed = next_issued(&mut web.events).await;
    assert_ne!(renewed, first);
    assert_eq!(web.store.current().unwrap().serial_hex(), renewed);
}

#[tokio::test]
async fn not_ready_until_the_first_certificate_arrives() {
    let op = web_operator(Duration::from_secs(60));
    op.set_failing(true);
    let op_addr = op.serve_default().await;
    let mut web = start_agent(&op.ca, op_addr, "tok-web");
    for _ in 0..2 {
        match next_event(&mut web.events).await {
            RenewalEvent::Failed {
                seconds_to_expiry, ..
            } => assert_eq!(seconds_to_expiry, None),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!web.store.is_ready());
        assert_eq!(web.store.expiry().seconds_to_expiry(), None);
    }
    op.set_failing(false);
    next_issued(&mut web.events).await;
    assert!(web.store.is_ready());
    let left = web.store.expiry().seconds_to_expiry().unwrap();
    assert!((55..=60).contains(&left), "{left}");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" / ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[tokio::test]
async fn refuses_an_operator_with_the_wrong_identity() {
    let op = web_operator(Duration::from_secs(60));
    // Signed by the trusted CA, but it is a workload, not the operator.
    let addr = op.serve(&op.ca, ORDERS).await;
    let client = web_client(addr, Some(OPERATOR), &op.ca);
    let err = client.certify().await.unwrap_err();
    assert!(matches!(err, CertifyError::Connect(_)), "{err:?}");
    let chain = error_chain(&err);
    assert!(
        chain.contains(&format!("expected: \"{OPERATOR}\"")),
        "{chain}"
    );
    assert!(op.call_times().is_empty(), "the token went to an impostor");

    // Without an expected ID, a trust-domain identity is enough.
    let client = web_client(addr, None, &op.ca);
    assert!(client.certify().await.is_ok());
}

#[tokio::test]
async fn refuses_an_operator_from_a_foreign_ca() {
    let op = web_operator(Duration::from_secs(60));
    let foreign = TestCa::new("foreign root");
    let addr = op.serve(&foreign, OPERATOR).await;
    let client = web_client(addr, None, &op.ca);
    let err = client.certify().await.unwrap_err();
    let chain = error_chain(&err);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("unknown issuer"),
        "{chain}"
    );
    assert!(op.call_times().is_empty());
}

#[tokio::test]
async fn refuses_a_certificate_for_another_key() {
    let err = certify_from_misbehaving_operator(Misbehaviour::SignOtherKey).await;
    assert!(matches!(err, CertifyError::KeyMismatch), "{err:?}");
}

#[tokio::test]
async fn refuses_a_certificate_of_a_foreign_trust_domain() {
    let err = certify_from_misbehaving_operator(Misbehaviour::ForeignTrustDomain).await;
    assert!(
        matches!(
            err,
            CertifyError::Verify(VerifyError::Identity(
                CertIdentityError::WrongTrustDomain { .. }
            ))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn token_file_is_read_for_every_request() {
    let op = web_operator(Duration::from_secs(60));
    let addr = op.serve_default().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "tok-web\n").unwrap();
    let mut config = client_config(addr, "unused", Some(OPERATOR));
    config.token = TokenSource::File(path.clone());
    let client = IdentityClient::new(config, trust(&[&op.ca])).unwrap();
    let issued = client.certify().await.unwrap();
    assert_eq!(issued.cert.spiffe_id().as_str(), WEB);
    assert_eq!(issued.cert.spiffe_id().trust_domain(), TD);
    assert!(issued.trust_bundle.is_some());

    std::fs::write(&path, "revoked").unwrap();
    let err = client.certify().await.unwrap_err();
    assert!(
        matches!(&err, CertifyError::Rpc(s) if s.code() == tonic::Code::Unauthenticated),
        "{err:?}"
    );
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        client.certify().await,
        Err(CertifyError::Token { .. })
    ));
}

#[tokio::test]
async fn unreachable_operator_is_a_connect_error() {
    // Bind and drop to get a port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let ca = TestCa::new("mesh root");
    let client = IdentityClient::new(client_config(addr, "tok", None), trust(&[&ca])).unwrap();
    assert!(matches!(
        client.certify().await,
        Err(CertifyError::Connect(_))
    ));
}
