//! The agent's `PolicyWatcher` against a real tonic `Discovery` server over
//! real mutual TLS (a test double of the operator that pushes whatever the
//! test sets and reports what the agent sends back).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{OPERATOR, ORDERS, TD, TestCa, WEB, trust};
use palisade_agent::discovery::{
    PolicySource, PolicyStatus, PolicyStatusSnapshot, PolicyWatcher, PolicyWatcherConfig,
    WorkloadInfo,
};
use palisade_agent::inbound::SharedPolicy;
use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::spiffe_id_of_certificate;
use palisade_policy::wire as pb;
use palisade_proto::discovery::v1::discovery_server::{Discovery, DiscoveryServer};
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{WatchRequest, WatchResponse, WorkloadRef};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Each wait gives up after this long.
const STEP: Duration = Duration::from_secs(10);

/// What the fake operator saw.
#[derive(Debug)]
enum Seen {
    Subscribe {
        workload: WorkloadRef,
        /// SPIFFE ID of the client certificate.
        peer: Option<String>,
    },
    Ack(String),
    Nack(String, String),
}

/// The operator double: pushes the current `policy` to every stream (again
/// on every change), ends every stream when `kill` changes.
struct Fake {
    policy: watch::Sender<Option<pb::WorkloadPolicy>>,
    kill: watch::Sender<u64>,
    seen: mpsc::UnboundedSender<Seen>,
}

impl Fake {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Seen>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Self {
            policy: watch::channel(None).0,
            kill: watch::channel(0).0,
            seen,
        });
        (fake, rx)
    }

    fn push(&self, policy: pb::WorkloadPolicy) {
        self.policy.send_replace(Some(policy));
    }
}

struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl Discovery for Svc {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .and_then(|leaf| spiffe_id_of_certificate(leaf.as_ref(), TD).ok())
            .map(|id| id.to_string());
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no subscribe"))?;
        let Some(Kind::Subscribe(workload)) = first.kind else {
            return Err(Status::invalid_argument("subscribe first"));
        };
        let fake = self.0.clone();
        let _ = fake.seen.send(Seen::Subscribe { workload, peer });
        let (tx, rx) = mpsc::channel(4);
        let mut policy = fake.policy.subscribe();
        let mut kill = fake.kill.subscribe();
        tokio::spawn(async move {
            loop {
                let current = policy.borrow_and_update().clone();
                if let Some(p) = current
                    && tx
                        .send(Ok(WatchResponse {
                            policy: Some(p),
                            destinations: None,
                        }))
                        .await
                        .is_err()
                {
                    return;
                }
                loop {
                    tokio::select! {
                        changed = policy.changed() => {
                            if changed.is_err() { return; }
                            break;
                        }
                        _ = kill.changed() => {
                            let _ = tx.send(Err(Status::unavailable("operator restarting"))).await;
                            return;
                        }
                        msg = inbound.message() => match msg {
                            Ok(Some(WatchRequest { kind: Some(Kind::Ack(a)) })) => {
                                let _ = fake.seen.send(Seen::Ack(a.version));
                            }
                            Ok(Some(WatchRequest { kind: Some(Kind::Nack(n)) })) => {
                                let _ = fake.seen.send(Seen::Nack(n.version, n.reason));
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return,
                        },
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running fake server; `stop` ends its streams and closes the port.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(fake: &Arc<Fake>, ca: &TestCa, server_id: &str, addr: SocketAddr) -> Running {
    let (cert, key) = ca.leaf_cert(&common::Leaf::spiffe(server_id));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert.pem(), key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(&ca.pem));
    let incoming = TcpIncoming::bind(addr).expect("bind");
    let addr = incoming.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)
        .expect("tls config")
        .add_service(DiscoveryServer::new(Svc(fake.clone())))
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
    async fn stop(mut self, fake: &Fake) {
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
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Agent {
    fn start(ca: &TestCa, operator: SocketAddr) -> Self {
        let trust = trust(&[ca]);
        let store = ca.store(ORDERS);
        let policy = SharedPolicy::default();
        let mut workload = WorkloadInfo {
            pod_name: "orders-5c8d7-x2x9q".into(),
            ports: vec![8080],
            agent_instance_id: "agent-1".into(),
            ..Default::default()
        };
        workload.labels.insert("app".into(), "orders".into());
        let mut config = PolicyWatcherConfig::new(operator.to_string(), workload);
        config.operator_id = Some(SpiffeId::parse(OPERATOR).unwrap());
        config.backoff_initial = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(400);
        config.connect_timeout = Duration::from_secs(2);
        let watcher = PolicyWatcher::new(config, &trust, store, policy.clone()).unwrap();
        let status = watcher.status().clone();
        let task = tokio::spawn(watcher.run());
        Self {
            policy,
            status,
            task,
        }
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
    let (fake, mut seen) = Fake::new();
    let server = serve(&fake, &ca, OPERATOR, "127.0.0.1:0".parse().unwrap()).await;
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

    let mut metrics = String::new();
    agent.status.render_prometheus(&mut metrics);
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
    let (fake, mut seen) = Fake::new();
    fake.push(policy("v1", &["/orders"]));
    let server = serve(&fake, &ca, OPERATOR, "127.0.0.1:0".parse().unwrap()).await;
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
    let mut metrics = String::new();
    agent.status.render_prometheus(&mut metrics);
    assert!(
        metrics.contains("palisade_agent_policy_updates_total{result=\"nack\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_restarted_operator_is_reconnected_and_the_policy_stays_meanwhile() {
    let ca = TestCa::new("mesh root");
    let (fake, mut seen) = Fake::new();
    fake.push(policy("v1", &["/orders"]));
    let server = serve(&fake, &ca, OPERATOR, "127.0.0.1:0".parse().unwrap()).await;
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
    let (fake, mut seen) = Fake::new();
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
