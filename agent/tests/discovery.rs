//! The agent's `PolicyWatcher` against a real tonic `Discovery` server over
//! real mutual TLS (a test double of the operator that pushes whatever the
//! test sets and reports what the agent sends back).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::discovery::{DiscoverySvc, FakeDiscovery, Seen, mesh_destinations};
use common::{OPERATOR, ORDERS, TD, TestCa, WEB, trust};
use palisade_agent::discovery::{
    AdvertisedEndpoint, PolicySource, PolicyStatus, PolicyStatusSnapshot, PolicyWatcher,
    PolicyWatcherConfig, WorkloadInfo,
};
use palisade_agent::inbound::SharedPolicy;
use palisade_agent::outbound::{DiscoveredDestinations, ExpectedPeer};
use palisade_agent::tls::MtlsMode;
use palisade_policy::identity::SpiffeId;
use palisade_policy::wire as pb;
use palisade_proto::discovery::v1::WorkloadRef;
use palisade_proto::discovery::v1::discovery_server::DiscoveryServer;
use palisade_proto::identity::v1::identity_server::{Identity, IdentityServer};
use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Each wait gives up after this long.
const STEP: Duration = Duration::from_secs(10);

/// A running fake server; `stop` ends its streams and closes the port.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Server TLS presenting a leaf for `server_id` from `ca`, verifying clients
/// against `ca`.
fn server_tls(ca: &TestCa, server_id: &str) -> ServerTlsConfig {
    let (cert, key) = ca.leaf_cert(&common::Leaf::spiffe(server_id));
    ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(cert.pem(), key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(&ca.pem))
}

/// The fake as the operator (`OPERATOR`) on an ephemeral loopback port.
async fn serve_as_operator(fake: &Arc<FakeDiscovery>, ca: &TestCa) -> Running {
    serve(fake, ca, OPERATOR, "127.0.0.1:0".parse().unwrap()).await
}

async fn serve(
    fake: &Arc<FakeDiscovery>,
    ca: &TestCa,
    server_id: &str,
    addr: SocketAddr,
) -> Running {
    let tls = server_tls(ca, server_id);
    let incoming = TcpIncoming::bind(addr).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)
        .expect("tls config")
        .add_service(DiscoveryServer::new(DiscoverySvc(fake.clone())))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn stop(mut self, fake: &FakeDiscovery) {
        fake.kill.send_modify(|n| *n += 1);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(STEP, &mut self.task).await.is_err() {
            // Graceful shutdown stuck on a connection: dropping the server
            // future still closes the listening socket.
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

fn policy(version: &str, prefixes: &[&str]) -> pb::WorkloadPolicy {
    pb::WorkloadPolicy {
        version: version.into(),
        workload: ORDERS.into(),
        trust_domain: TD.into(),
        default_action: pb::DefaultAction::AllAuthenticated as i32,
        default_mtls: pb::MtlsMode::Strict as i32,
        routes: prefixes
            .iter()
            .map(|p| pb::Route {
                id: format!("shop/orders/routes{p}"),
                path: Some(pb::PathMatch {
                    kind: Some(pb::path_match::Kind::Prefix((*p).into())),
                }),
                allow: vec![pb::Rule {
                    id: "web".into(),
                    namespaces: vec!["web".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A version `LoadedPolicy::load` refuses: an inline JWKS that is not one.
fn unloadable(version: &str) -> pb::WorkloadPolicy {
    let mut p = policy(version, &["/broken"]);
    p.jwt_providers = vec![pb::JwtProvider {
        id: "shop/orders/jwt[0]".into(),
        issuer: "https://issuer.example".into(),
        keys: Some(pb::jwt_provider::Keys::JwksJson("{\"keys\": 42}".into())),
        header: "authorization".into(),
        prefix: "Bearer ".into(),
        algorithms: vec!["ES256".into()],
        ..Default::default()
    }];
    p
}

struct Agent {
    policy: SharedPolicy,
    status: Arc<PolicyStatus>,
    destinations: DiscoveredDestinations,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Agent {
    fn start(ca: &TestCa, operator: SocketAddr) -> Self {
        Self::start_advertising(ca, operator, Vec::new())
    }

    fn start_advertising(
        ca: &TestCa,
        operator: SocketAddr,
        endpoints: Vec<AdvertisedEndpoint>,
    ) -> Self {
        let trust = trust(&[ca]);
        let store = ca.store(ORDERS);
        let policy = SharedPolicy::default();
        let mut workload = WorkloadInfo {
            pod_name: "orders-5c8d7-x2x9q".into(),
            ports: vec![8080],
            agent_instance_id: "agent-1".into(),
            endpoints,
            ..Default::default()
        };
        workload.labels.insert("app".into(), "orders".into());
        let mut config = PolicyWatcherConfig::new(operator.to_string(), workload);
        config.operator_id = Some(SpiffeId::parse(OPERATOR).unwrap());
        config.backoff_initial = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(400);
        config.connect_timeout = Duration::from_secs(2);
        let destinations = DiscoveredDestinations::new();
        let watcher = PolicyWatcher::new(config, &trust, store, policy.clone())
            .unwrap()
            .with_destinations(destinations.clone());
        let status = watcher.status().clone();
        let task = tokio::spawn(watcher.run());
        Self {
            policy,
            status,
            destinations,
            task,
        }
    }

    /// Waits until discovered destinations `version` are in force.
    async fn wait_destinations(&self, version: &str) {
        let deadline = Instant::now() + STEP;
        while self.destinations.version().as_deref() != Some(version) {
            assert!(
                Instant::now() < deadline,
                "destinations {version} not applied within {STEP:?}: {:?}",
                self.destinations.current()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The watcher's metrics, in Prometheus text.
    fn metrics(&self) -> String {
        let mut text = String::new();
        self.status.render_prometheus(&mut text);
        text
    }

    fn version(&self) -> Option<String> {
        self.policy.current().map(|p| p.engine.version().to_owned())
    }

    async fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&PolicyStatusSnapshot) -> bool,
    ) -> PolicyStatusSnapshot {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.status.snapshot();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {STEP:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn next(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(STEP, seen.recv())
        .await
        .expect("the fake operator saw nothing in time")
        .expect("fake operator gone")
}

async fn expect_ack(seen: &mut mpsc::UnboundedReceiver<Seen>, version: &str) {
    match next(seen).await {
        Seen::Ack(v) => assert_eq!(v, version),
        other => panic!("expected ACK {version}, got {other:?}"),
    }
}

async fn expect_subscribe(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
) -> (WorkloadRef, Option<String>) {
    match next(seen).await {
        Seen::Subscribe { workload, peer } => (workload, peer),
        other => panic!("expected subscribe, got {other:?}"),
    }
}

#[tokio::test]
async fn a_good_policy_is_swapped_in_and_acked_with_its_version() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    let server = serve_as_operator(&fake, &ca).await;
    let agent = Agent::start(&ca, server.addr);

    // The agent names itself, with its certificate's identity.
    let (workload, peer) = expect_subscribe(&mut seen).await;
    assert_eq!(
        peer.as_deref(),
        Some(ORDERS),
        "client certificate presented"
    );
    assert_eq!(workload.spiffe_id, ORDERS);
    assert_eq!(workload.namespace, "shop");
    assert_eq!(workload.service_account, "orders");
    assert_eq!(workload.pod_name, "orders-5c8d7-x2x9q");
    assert_eq!(workload.ports, vec![8080]);
    assert_eq!(workload.agent_instance_id, "agent-1");
    assert_eq!(
        workload.labels.get("app").map(String::as_str),
        Some("orders")
    );
    let s = agent.wait_status("connected", |s| s.connected).await;
    assert_eq!(s.source, PolicySource::None);
    assert!(
        agent.policy.current().is_none(),
        "nothing in force yet: deny all"
    );

    fake.push(policy("v1", &["/orders"]));
    expect_ack(&mut seen, "v1").await;
    assert_eq!(agent.version().as_deref(), Some("v1"));
    let s = agent.status.snapshot();
    assert_eq!(s.version.as_deref(), Some("v1"));
    assert_eq!(s.source, PolicySource::Discovery);
    assert_eq!((s.acks, s.nacks), (1, 0));

    fake.push(policy("v2", &["/orders", "/admin"]));
    expect_ack(&mut seen, "v2").await;
    let current = agent.policy.current().unwrap();
    assert_eq!(current.engine.version(), "v2");
    assert_eq!(current.engine.policy().routes.len(), 2);

    let metrics = agent.metrics();
    assert!(
        metrics.contains("palisade_agent_policy_updates_total{result=\"ack\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("palisade_agent_policy_connected 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unloadable_policy_is_nacked_and_the_previous_one_stays() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    fake.push(policy("v1", &["/orders"]));
    let server = serve_as_operator(&fake, &ca).await;
    let agent = Agent::start(&ca, server.addr);
    expect_subscribe(&mut seen).await;
    expect_ack(&mut seen, "v1").await;

    fake.push(unloadable("v2"));
    match next(&mut seen).await {
        Seen::Nack(version, reason) => {
            assert_eq!(version, "v2");
            assert!(reason.contains("shop/orders/jwt[0]"), "{reason}");
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    assert_eq!(agent.version().as_deref(), Some("v1"), "v1 stays in force");
    let s = agent.status.snapshot();
    assert_eq!(s.version.as_deref(), Some("v1"));
    assert_eq!((s.acks, s.nacks), (1, 1));
    let nack = s.last_nack.expect("last NACK recorded");
    assert_eq!(nack.version, "v2");
    assert!(
        nack.reason.contains("shop/orders/jwt[0]"),
        "{}",
        nack.reason
    );

    // The stream goes on: the next good version is taken.
    fake.push(policy("v3", &["/v3"]));
    expect_ack(&mut seen, "v3").await;
    assert_eq!(agent.version().as_deref(), Some("v3"));
    let metrics = agent.metrics();
    assert!(
        metrics.contains("palisade_agent_policy_updates_total{result=\"nack\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_restarted_operator_is_reconnected_and_the_policy_stays_meanwhile() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    fake.push(policy("v1", &["/orders"]));
    let server = serve_as_operator(&fake, &ca).await;
    let addr = server.addr;
    let agent = Agent::start(&ca, addr);
    expect_subscribe(&mut seen).await;
    expect_ack(&mut seen, "v1").await;

    // Down: the stream ends, reconnects fail, v1 stays in force.
    server.stop(&fake).await;
    let s = agent
        .wait_status("disconnected, and a failed reconnect", |s| {
            !s.connected && s.stream_failures >= 2
        })
        .await;
    assert_eq!(s.version.as_deref(), Some("v1"));
    assert_eq!(agent.version().as_deref(), Some("v1"));

    // Back on the same address, still with v1: re-subscribed, re-ACKed
    // without a reload.
    let server = serve(&fake, &ca, OPERATOR, addr).await;
    let (workload, _) = expect_subscribe(&mut seen).await;
    assert_eq!(workload.spiffe_id, ORDERS);
    expect_ack(&mut seen, "v1").await;
    agent.wait_status("connected again", |s| s.connected).await;
    assert_eq!(agent.version().as_deref(), Some("v1"));

    // And new versions flow again.
    fake.push(policy("v2", &["/v2"]));
    expect_ack(&mut seen, "v2").await;
    assert_eq!(agent.version().as_deref(), Some("v2"));
    drop(server);
}

#[tokio::test]
async fn an_operator_with_the_wrong_identity_is_never_subscribed_to() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    fake.push(policy("v1", &["/orders"]));
    // A workload of the mesh posing as the operator.
    let server = serve(&fake, &ca, WEB, "127.0.0.1:0".parse().unwrap()).await;
    let agent = Agent::start(&ca, server.addr);
    agent
        .wait_status("two refused attempts", |s| s.stream_failures >= 2)
        .await;
    assert!(seen.try_recv().is_err(), "the impostor saw a subscribe");
    assert!(agent.policy.current().is_none());
    assert!(!agent.status.snapshot().connected);
}

/// The endpoints a subscription advertised, as (IP, port).
fn advertised(workload: &WorkloadRef) -> Vec<(&str, u32)> {
    workload
        .endpoints
        .iter()
        .map(|e| (e.ip.as_str(), e.port))
        .collect()
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn the_subscription_advertises_our_mesh_endpoints() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    let server = serve_as_operator(&fake, &ca).await;
    let endpoints = vec![
        AdvertisedEndpoint {
            ip: ip("10.0.0.5"),
            port: Some(8443),
        },
        AdvertisedEndpoint {
            ip: ip("fd00::5"),
            port: None,
        },
    ];
    let _agent = Agent::start_advertising(&ca, server.addr, endpoints);
    let (workload, _) = expect_subscribe(&mut seen).await;
    let got = advertised(&workload);
    // Port 0 on the wire: every port (transparent capture).
    assert_eq!(got, vec![("10.0.0.5", 8443), ("fd00::5", 0)]);

    // Nothing to advertise: nothing sent.
    let (fake, mut seen) = FakeDiscovery::new();
    let server = serve_as_operator(&fake, &ca).await;
    let _agent = Agent::start(&ca, server.addr);
    let (workload, _) = expect_subscribe(&mut seen).await;
    assert!(workload.endpoints.is_empty(), "{:?}", workload.endpoints);
}

#[tokio::test]
async fn destinations_are_applied_without_an_answer_and_policies_still_acked() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    let server = serve_as_operator(&fake, &ca).await;
    let agent = Agent::start(&ca, server.addr);
    expect_subscribe(&mut seen).await;
    agent.wait_status("connected", |s| s.connected).await;

    fake.push_destinations(mesh_destinations("d1", &[("10.0.0.5/32", 8443, ORDERS)]));
    agent.wait_destinations("d1").await;
    let current = agent.destinations.current();
    assert_eq!(
        current.table.lookup(ip("10.0.0.5"), 8443),
        Some(&ExpectedPeer::Id(SpiffeId::parse(ORDERS).unwrap()))
    );
    assert!(agent.policy.current().is_none(), "no policy came with it");

    // The next thing the operator hears is the policy's ACK: nothing was
    // sent for the destinations (replies keep the stream's order).
    fake.push(policy("v1", &["/orders"]));
    expect_ack(&mut seen, "v1").await;
    let s = agent.status.snapshot();
    assert_eq!((s.acks, s.nacks), (1, 0));

    // A new table replaces the whole previous one; still no answer.
    fake.push_destinations(mesh_destinations("d2", &[("10.0.0.6/32", 0, "*")]));
    agent.wait_destinations("d2").await;
    let current = agent.destinations.current();
    assert_eq!(current.table.lookup(ip("10.0.0.5"), 8443), None);
    assert_eq!(
        current.table.lookup(ip("10.0.0.6"), 1),
        Some(&ExpectedPeer::AnyInTrustDomain)
    );
    fake.push(policy("v2", &["/v2"]));
    expect_ack(&mut seen, "v2").await;

    // The operator goes away: the last table stays in force.
    server.stop(&fake).await;
    agent
        .wait_status("disconnected", |s| !s.connected && s.stream_failures >= 1)
        .await;
    assert_eq!(agent.destinations.version().as_deref(), Some("d2"));
    assert_eq!(agent.destinations.current().table.len(), 1);
}

#[tokio::test]
async fn garbage_destinations_are_skipped_and_the_valid_ones_apply() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = FakeDiscovery::new();
    fake.push(policy("v1", &["/orders"]));
    fake.push_destinations(mesh_destinations(
        "d1",
        &[
            ("10.0.0.5/32", 8443, ORDERS),
            ("not-an-address", 80, ORDERS),
            ("10.0.0.0/99", 0, ORDERS),
            ("10.0.0.7", 70000, ORDERS),
            // Another trust domain: its certificate could never verify here.
            ("10.0.0.8/32", 0, "spiffe://evil.example/ns/shop/sa/orders"),
            ("10.0.0.9/32", 0, "not a spiffe id"),
            ("10.0.1.0/24", 0, WEB),
        ],
    ));
    let server = serve_as_operator(&fake, &ca).await;
    let agent = Agent::start(&ca, server.addr);
    expect_subscribe(&mut seen).await;
    // Both came in one response: the policy is ACKed as usual.
    expect_ack(&mut seen, "v1").await;
    agent.wait_destinations("d1").await;
    let current = agent.destinations.current();
    assert_eq!(current.skipped, 5);
    assert_eq!(current.table.len(), 2);
    let pinned = |s: &str| Some(ExpectedPeer::Id(SpiffeId::parse(s).unwrap()));
    assert_eq!(
        current.table.lookup(ip("10.0.0.5"), 8443).cloned(),
        pinned(ORDERS)
    );
    assert_eq!(
        current.table.lookup(ip("10.0.1.77"), 80).cloned(),
        pinned(WEB)
    );
    for skipped in ["10.0.0.7", "10.0.0.8", "10.0.0.9"] {
        assert_eq!(current.table.lookup(ip(skipped), 80), None, "{skipped}");
    }
    // The stream goes on.
    fake.push(policy("v2", &["/v2"]));
    expect_ack(&mut seen, "v2").await;
    drop(server);
}

// ---------------------------------------------------------------------------
// The real binary: `run --operator` advertises its inbound endpoint and pins
// its `--outbound` destination from the pushed table.

/// Certifies every CSR as `WEB` (the token is not checked: one agent only).
struct CertifyAsWeb(Arc<TestCa>);

#[tonic::async_trait]
impl Identity for CertifyAsWeb {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(WEB.try_into().unwrap())];
        let now = std::time::SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + Duration::from_secs(3600)).into();
        csr.params = params;
        let cert = csr
            .signed_by(&self.0.issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: vec![cert.pem()],
            trust_bundle_pem: vec![self.0.pem.clone()],
            spiffe_id: WEB.into(),
            ..Default::default()
        }))
    }
}

/// Identity and Discovery on one TLS port, as the operator serves them
/// (client certificates optional: the first Certify has none).
async fn serve_operator(fake: &Arc<FakeDiscovery>, ca: &Arc<TestCa>) -> SocketAddr {
    let tls = server_tls(ca, OPERATOR).client_auth_optional(true);
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let server = Server::builder()
        .tls_config(tls)
        .expect("tls config")
        .add_service(IdentityServer::new(CertifyAsWeb(ca.clone())))
        .add_service(DiscoveryServer::new(DiscoverySvc(fake.clone())))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    addr
}

/// Connects through the outbound proxy; the echo server's first line is the
/// client identity it saw. `None`: closed without a byte.
async fn first_line(proxy: SocketAddr) -> Option<String> {
    let mut app = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let got = common::outbound::read_until(
        &mut app,
        STEP,
        "the proxy left the app's connection open",
        |got| got.contains(&b'\n'),
    )
    .await;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim().to_owned())
}

#[tokio::test]
async fn the_sidecar_advertises_its_endpoint_and_pins_from_discovery() {
    let ca = Arc::new(TestCa::new("mesh root"));
    let mesh_trust = trust(&[&ca]);
    let mut orders = common::EchoServer::start(
        mesh_trust
            .server_config(ca.store(ORDERS), MtlsMode::Strict)
            .unwrap(),
        mesh_trust.clone(),
    )
    .await;
    let network = format!("{}/32", orders.addr.ip());
    let port = u32::from(orders.addr.port());
    let (fake, mut seen) = FakeDiscovery::new();
    fake.push_destinations(mesh_destinations("d1", &[(network.as_str(), port, ORDERS)]));
    let operator = serve_operator(&fake, &ca).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    std::fs::write(dir.path().join("token"), "tok-web\n").unwrap();
    let mut cmd = std::process::Command::new(common::AGENT);
    cmd.arg("run")
        .args([
            "--operator",
            &operator.to_string(),
            "--operator-id",
            OPERATOR,
        ])
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .arg("--trust-bundle")
        .arg(dir.path().join("ca.pem"))
        .args(["--admin", "", "--advertise-address", "10.0.0.5"])
        .args(["--inbound", "0.0.0.0:0=127.0.0.1:1"])
        .args(["--outbound", &format!("127.0.0.1:0={}", orders.addr)])
        .env_remove("POD_IP");
    let mut agent = common::proc::Proc::spawn("agent", "info", cmd);
    let inbound: SocketAddr = agent
        .wait_for_field("inbound proxy listening", "listen")
        .await
        .parse()
        .unwrap();
    let proxy: SocketAddr = agent
        .wait_for_field("outbound proxy listening", "listen")
        .await
        .parse()
        .unwrap();

    // Advertised: the pod address with the inbound listener's real port.
    let (workload, peer) = expect_subscribe(&mut seen).await;
    assert_eq!(peer.as_deref(), Some(WEB));
    assert_eq!(
        advertised(&workload),
        vec![("10.0.0.5", u32::from(inbound.port()))]
    );

    // No flag covers the destination; discovery says orders, and it is.
    agent.wait_for(&["mesh destinations applied", "d1"]).await;
    assert_eq!(first_line(proxy).await.as_deref(), Some(WEB));
    assert!(orders.next().await.is_ok());

    // Discovery now says payments is there: the next connection is refused.
    fake.push_destinations(mesh_destinations(
        "d2",
        &[(
            network.as_str(),
            port,
            "spiffe://cluster.local/ns/shop/sa/payments",
        )],
    ));
    agent.wait_for(&["mesh destinations applied", "d2"]).await;
    assert_eq!(first_line(proxy).await, None);
    assert!(orders.next().await.is_err(), "the handshake must fail");
    // Never answered: the operator heard nothing after the subscribe.
    assert!(seen.try_recv().is_err(), "{:?}", seen.try_recv());
}
