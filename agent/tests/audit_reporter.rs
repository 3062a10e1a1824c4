//! The audit reporter against a real tonic `Audit` server over real mTLS on
//! loopback: certificates from an rcgen test CA with SPIFFE URI SANs, our
//! client certificate from a `CertStore`, the collector's checked by the
//! agent's SPIFFE verifier. The test collector records every batch it
//! receives (resends included), stores them de-duplicated by (instance,
//! sequence) as the real one does, and acknowledges each once stored.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{ORDERS, TD, TestCa, WEB, trust};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use palisade_agent::audit::{
    self, AuditEvent, AuditReporter, AuditSink, ReporterConfig, ReporterHandle,
};
use palisade_agent::identity::CertStore;
use palisade_agent::tls::{MeshTrust, MtlsMode};
use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::spiffe_id_of_certificate;
use palisade_proto::audit::v1 as pb;
use palisade_proto::audit::v1::audit_server::{Audit, AuditServer};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const COLLECTOR: &str = "spiffe://cluster.local/ns/palisade-system/sa/palisade-collector";

/// What the test collector saw, across its restarts.
#[derive(Default)]
struct Seen {
    /// Every batch as it arrived, resends included.
    received: Vec<pb::AuditBatch>,
    /// De-duplicated by (instance, sequence).
    stored: BTreeMap<(String, u64), pb::AuditBatch>,
    /// The client identity of every completed handshake.
    peers: Vec<String>,
}

struct Collector {
    seen: Mutex<Seen>,
    /// While false, batches are stored but never acknowledged.
    ack: AtomicBool,
    handshakes: AtomicUsize,
    failed_handshakes: AtomicUsize,
    changed: Notify,
}

impl Collector {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Seen::default()),
            ack: AtomicBool::new(true),
            handshakes: AtomicUsize::new(0),
            failed_handshakes: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    fn record(&self, batch: pb::AuditBatch) {
        let mut seen = self.seen.lock();
        seen.received.push(batch.clone());
        let key = (batch.agent_instance_id.clone(), batch.sequence);
        seen.stored.entry(key).or_insert(batch);
        drop(seen);
        self.changed.notify_waiters();
    }

    /// Request ids of the stored (de-duplicated) events, in (instance,
    /// sequence) order.
    fn stored_ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .stored
            .values()
            .flat_map(|b| b.events.iter().map(|e| e.request_id.clone()))
            .collect()
    }

    fn stored(&self) -> Vec<pb::AuditBatch> {
        self.seen.lock().stored.values().cloned().collect()
    }

    fn received(&self) -> Vec<pb::AuditBatch> {
        self.seen.lock().received.clone()
    }
}

#[derive(Clone)]
struct Svc(Arc<Collector>);

#[tonic::async_trait]
impl Audit for Svc {
    type ReportStream = ReceiverStream<Result<pb::ReportAck, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<pb::AuditBatch>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut batches = request.into_inner();
        let collector = self.0.clone();
        let (acks, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(batch)) = batches.message().await {
                let sequence = batch.sequence;
                collector.record(batch);
                if collector.ack.load(Ordering::SeqCst)
                    && acks.send(Ok(pb::ReportAck { sequence })).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running collector on one port; [`stop`](Self::stop) kills it and
/// every connection at once, like a crashed process.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `collector` on `addr` (port 0: any) with mTLS: its own
    /// certificate for `id` from `ca`, clients must be workloads of `trust`.
    async fn start(
        collector: &Arc<Collector>,
        addr: SocketAddr,
        trust: &MeshTrust,
        ca: &TestCa,
        id: &str,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind collector");
        let addr = listener.local_addr().expect("collector address");
        let config = trust
            .server_config(ca.store(id), MtlsMode::Strict)
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let collector = collector.clone();
        let task = tokio::spawn(async move {
            // Owned here: aborting the task drops the set, which aborts
            // every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let collector = collector.clone();
                connections.spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            collector.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                            collector.changed.notify_waiters();
                            return;
                        }
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| spiffe_id_of_certificate(c.as_ref(), TD).ok())
                        .map_or_else(|| "-".to_owned(), |id| id.to_string());
                    collector.seen.lock().peers.push(peer);
                    collector.handshakes.fetch_add(1, Ordering::SeqCst);
                    let service = TowerToHyperService::new(AuditServer::new(Svc(collector)));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The mesh of a test: one CA, our workload's certificate store (ORDERS).
struct Mesh {
    ca: TestCa,
    trust: MeshTrust,
    store: Arc<CertStore>,
}

impl Mesh {
    fn new() -> Self {
        let ca = TestCa::new("mesh root");
        let trust = trust(&[&ca]);
        let store = ca.store(ORDERS);
        Self { ca, trust, store }
    }

    /// A reporter to `addr` with small, fast settings; `tune` adjusts them.
    fn reporter(
        &self,
        addr: SocketAddr,
        queue_events: usize,
        tune: impl FnOnce(&mut ReporterConfig),
    ) -> (AuditSink, ReporterHandle) {
        let mut config = ReporterConfig::new(addr.to_string());
        config.collector_id = Some(SpiffeId::parse(COLLECTOR).expect("collector id"));
        config.batch_events = 10;
        config.batch_wait = Duration::from_millis(10);
        config.backoff_initial = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(50);
        config.connect_timeout = Duration::from_secs(5);
        tune(&mut config);
        let (sink, queue) = audit::channel(queue_events);
        let reporter =
            AuditReporter::new(config, queue, &self.trust, self.store.clone()).expect("reporter");
        (sink, reporter.spawn())
    }
}

/// A port nothing listens on (until a test starts a server there).
async fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// Waits (bounded) until `cond` holds, re-checking whenever the collector
/// records something and every few milliseconds for the reporter's side.
async fn until(collector: &Collector, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::select! {
            () = collector.changed.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

fn submit(sink: &AuditSink, request_id: &str) {
    AuditEvent {
        request_id,
        source_identity: Some(WEB),
        source_ip: Some("10.0.0.7".parse().expect("ip")),
        destination_port: 8080,
        method: "GET",
        path: Some("/orders/1"),
        allowed: false,
        reason: "authz.denied",
        rule: Some("shop/orders routes[0].deny[0]"),
        status: 403,
        ..AuditEvent::under(None)
    }
    .write(sink);
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("{prefix}-{n:04}")).collect()
}

#[tokio::test]
async fn every_event_arrives_once_in_order_with_sequences_from_one() {
    let mesh = Mesh::new();
    let collector = Collector::new();
    let server = Server::start(
        &collector,
        "127.0.0.1:0".parse().unwrap(),
        &mesh.trust,
        &mesh.ca,
        COLLECTOR,
    )
    .await;
    let (sink, reporter) = mesh.reporter(server.addr, 10_000, |_| {});
    let submitted = ids("a", 0..1000);
    for (n, id) in submitted.iter().enumerate() {
        submit(&sink, id);
        if n % 97 == 0 {
            // Let batches go out while more are submitted.
            tokio::task::yield_now().await;
        }
    }
    until(&collector, "all 1000 events stored", || {
        collector.stored_ids().len() == submitted.len()
    })
    .await;
    let metrics = reporter.metrics().clone();
    until(&collector, "every batch acknowledged", || {
        metrics.batches_acked_total() == collector.received().len() as u64
    })
    .await;

    let received = collector.received();
    // Once each: what arrived is what was stored, nothing resent.
    assert_eq!(received.len(), collector.stored().len());
    let sequences: Vec<u64> = received.iter().map(|b| b.sequence).collect();
    assert_eq!(sequences, (1..=received.len() as u64).collect::<Vec<_>>());
    // In order, each event once.
    let arrived: Vec<String> = received
        .iter()
        .flat_map(|b| b.events.iter().map(|e| e.request_id.clone()))
        .collect();
    assert_eq!(arrived, submitted);
    assert!(received.iter().all(|b| b.events.len() <= 10));
    assert!(
        received
            .iter()
            .all(|b| b.agent_instance_id == reporter.instance_id() && b.dropped_since_last == 0)
    );
    // Each event is stamped with our identity and carries the decision.
    let first = &received[0].events[0];
    assert_eq!(first.reporter, ORDERS);
    assert_eq!(first.source_principal, WEB);
    assert_eq!(first.source_ip, "10.0.0.7");
    assert_eq!(first.verdict, pb::Verdict::Deny as i32);
    assert_eq!(
        (first.status, first.reason.as_str(), first.destination_port),
        (403, "authz.denied", 8080)
    );
    assert!(first.time.is_some());
    // The collector saw our certificate's identity.
    assert!(collector.seen.lock().peers.iter().all(|p| p == ORDERS));
    assert_eq!(metrics.events_dropped_total(), 0);
    assert_eq!(metrics.batches_sent_total(), received.len() as u64);
    assert!(metrics.collector_connected());
    assert_eq!(metrics.queue_depth(), 0);

    let mut text = String::new();
    metrics.render_prometheus(&mut text);
    assert!(
        text.contains("palisade_audit_collector_connected 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "palisade_audit_batches_acked_total {}",
            received.len()
        )),
        "{text}"
    );
    reporter.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_collector_restart_loses_nothing_and_resends_what_was_not_acknowledged() {
    let mesh = Mesh::new();
    let spool = tempfile::tempdir().unwrap();
    let collector = Collector::new();
    let server = Server::start(
        &collector,
        "127.0.0.1:0".parse().unwrap(),
        &mesh.trust,
        &mesh.ca,
        COLLECTOR,
    )
    .await;
    let addr = server.addr;
    let (sink, reporter) = mesh.reporter(addr, 10_000, |c| {
        c.spool_dir = Some(spool.path().to_owned());
    });
    let metrics = reporter.metrics().clone();

    // Acknowledged.
    let first = ids("b", 0..50);
    first.iter().for_each(|id| submit(&sink, id));
    until(&collector, "first events stored", || {
        collector.stored_ids().len() == 50
    })
    .await;
    until(&collector, "first events acknowledged", || {
        metrics.batches_acked_total() == 5
    })
    .await;

    // Received but never acknowledged: must be sent again.
    collector.ack.store(false, Ordering::SeqCst);
    let second = ids("b", 50..100);
    second.iter().for_each(|id| submit(&sink, id));
    until(&collector, "unacknowledged events received", || {
        collector.stored_ids().len() == 100
    })
    .await;
    server.stop().await;
    until(&collector, "the reporter noticing", || {
        !metrics.collector_connected()
    })
    .await;

    // The collector is away.
    let third = ids("b", 100..150);
    third.iter().for_each(|id| submit(&sink, id));
    until(&collector, "the third part spooled", || {
        metrics.queue_depth() == 0 && metrics.spool_bytes() > 0
    })
    .await;

    collector.ack.store(true, Ordering::SeqCst);
    let server = Server::start(&collector, addr, &mesh.trust, &mesh.ca, COLLECTOR).await;
    until(&collector, "all 150 events stored", || {
        collector.stored_ids().len() == 150
    })
    .await;
    until(
        &collector,
        "everything acknowledged and the spool empty",
        || metrics.spool_bytes() == 0 && metrics.batches_acked_total() == 15,
    )
    .await;

    let submitted: Vec<String> = [first, second, third].concat();
    // Stored (de-duplicated) = submitted, in order, each once.
    assert_eq!(collector.stored_ids(), submitted);
    let stored = collector.stored();
    let sequences: Vec<u64> = stored.iter().map(|b| b.sequence).collect();
    assert_eq!(sequences, (1..=15).collect::<Vec<_>>());
    // The unacknowledged batches (6..=10) arrived twice; the others once.
    let mut arrivals: BTreeMap<u64, usize> = BTreeMap::new();
    for b in collector.received() {
        *arrivals.entry(b.sequence).or_default() += 1;
    }
    for seq in 1..=15 {
        let expected = if (6..=10).contains(&seq) { 2 } else { 1 };
        assert_eq!(arrivals[&seq], expected, "arrivals of batch {seq}");
    }
    // Every copy of a batch is the same batch.
    for b in collector.received() {
        assert_eq!(
            collector.seen.lock().stored[&(b.agent_instance_id.clone(), b.sequence)],
            b
        );
    }
    assert_eq!(metrics.events_dropped_total(), 0);
    assert!(metrics.connect_failures_total() >= 1);
    reporter.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn when_queue_and_spool_are_full_events_are_dropped_counted_and_reported_as_a_gap() {
    let mesh = Mesh::new();
    let spool = tempfile::tempdir().unwrap();
    let addr = free_port().await;
    const QUEUE: usize = 4;
    let (sink, reporter) = mesh.reporter(addr, QUEUE, |c| {
        c.batch_events = 2;
        c.batch_wait = Duration::from_millis(5);
        c.spool_dir = Some(spool.path().to_owned());
        // Room for a handful of two-event batches.
        c.spool_max_bytes = 2_000;
    });
    let metrics = reporter.metrics().clone();
    let collector = Collector::new();
    let mut submitted = Vec::new();
    let mut next = 0usize;
    let mut burst = |sink: &AuditSink, n: usize, submitted: &mut Vec<String>| {
        // No await in here: the reporter cannot drain while we submit.
        for _ in 0..n {
            let id = format!("c-{next:05}");
            next += 1;
            submit(sink, &id);
            submitted.push(id);
        }
    };

    // The queue takes QUEUE events, the rest of the burst is dropped at
    // once, on the request path, without waiting.
    burst(&sink, QUEUE + 96, &mut submitted);
    assert_eq!(metrics.events_dropped_total(), 96);
    assert_eq!(metrics.queue_depth(), QUEUE);
    let lost_on_the_request_path = 96;

    // Fill the spool until batches are dropped too.
    for _ in 0..500 {
        until(&collector, "the queue drained", || {
            metrics.queue_depth() == 0
        })
        .await;
        if metrics.events_dropped_total() > lost_on_the_request_path {
            break;
        }
        burst(&sink, QUEUE, &mut submitted);
    }
    until(&collector, "the queue drained", || {
        metrics.queue_depth() == 0
    })
    .await;
    let dropped = metrics.events_dropped_total();
    assert!(dropped > lost_on_the_request_path, "the spool never filled");
    assert!(metrics.spool_bytes() <= 2_000);

    let server = Server::start(&collector, addr, &mesh.trust, &mesh.ca, COLLECTOR).await;
    let stored_gap = || {
        collector
            .stored()
            .iter()
            .map(|b| b.dropped_since_last)
            .sum::<u64>()
    };
    until(
        &collector,
        "every kept event and every loss reported",
        || {
            collector.stored_ids().len() as u64 + dropped == submitted.len() as u64
                && stored_gap() == dropped
        },
    )
    .await;

    // Nothing lost beyond what was counted, nothing counted twice.
    let delivered: BTreeSet<String> = collector.stored_ids().into_iter().collect();
    assert_eq!(delivered.len(), collector.stored_ids().len());
    assert_eq!(delivered.len() as u64 + dropped, submitted.len() as u64);
    assert!(delivered.iter().all(|id| submitted.contains(id)));
    assert_eq!(metrics.events_dropped_total(), dropped);
    let stored = collector.stored();
    let sequences: Vec<u64> = stored.iter().map(|b| b.sequence).collect();
    assert_eq!(sequences, (1..=stored.len() as u64).collect::<Vec<_>>());
    // The first batch after the request-path loss says exactly how many.
    assert_eq!(stored[0].dropped_since_last, lost_on_the_request_path);
    // The batches after it account for exactly what the full spool lost.
    assert_eq!(
        stored[1..]
            .iter()
            .map(|b| b.dropped_since_last)
            .sum::<u64>(),
        dropped - lost_on_the_request_path
    );
    reporter.shutdown().await;
    server.stop().await;
}

/// The batches of `spool` as the reporter left them, for a reopen.
fn spooled_files(spool: &Path) -> usize {
    std::fs::read_dir(spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count()
}

#[tokio::test]
async fn the_spool_survives_a_restart_and_is_sent_first_under_its_instance_and_sequence() {
    let mesh = Mesh::new();
    let spool = tempfile::tempdir().unwrap();
    let addr = free_port().await;
    let spool_at = |c: &mut ReporterConfig| {
        c.batch_events = 2;
        c.spool_dir = Some(spool.path().to_owned());
    };

    // First run: no collector; ten events, five batches, all spooled; then
    // the agent dies without any chance to clean up.
    let (sink, reporter) = mesh.reporter(addr, 100, spool_at);
    let first_instance = reporter.instance_id().to_owned();
    let first = ids("d", 0..10);
    first.iter().for_each(|id| submit(&sink, id));
    let metrics = reporter.metrics().clone();
    let collector = Collector::new();
    until(&collector, "five batches spooled", || {
        metrics.queue_depth() == 0 && spooled_files(spool.path()) > 0
    })
    .await;
    reporter.abort().await;
    drop(sink);

    // Second run over the same spool, a collector there.
    let server = Server::start(&collector, addr, &mesh.trust, &mesh.ca, COLLECTOR).await;
    let (sink, reporter) = mesh.reporter(addr, 100, spool_at);
    assert_eq!(reporter.instance_id(), first_instance);
    let second = ids("d", 10..14);
    second.iter().for_each(|id| submit(&sink, id));
    until(&collector, "all 14 events stored", || {
        collector.stored_ids().len() == 14
    })
    .await;

    let received = collector.received();
    // Spooled first, with their original instance and sequences 1..=5;
    // the new run continues the sequence.
    assert!(
        received
            .iter()
            .all(|b| b.agent_instance_id == first_instance)
    );
    let sequences: Vec<u64> = received.iter().map(|b| b.sequence).collect();
    assert_eq!(sequences, (1..=7).collect::<Vec<_>>());
    let arrived: Vec<String> = received
        .iter()
        .flat_map(|b| b.events.iter().map(|e| e.request_id.clone()))
        .collect();
    assert_eq!(arrived, [first, second].concat());
    let metrics = reporter.metrics().clone();
    until(&collector, "the spool emptied", || {
        metrics.spool_bytes() == 0 && metrics.batches_acked_total() == 7
    })
    .await;
    assert_eq!(spooled_files(spool.path()), 0);
    reporter.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn on_shutdown_unacknowledged_batches_are_spooled_and_resent_by_the_next_run() {
    let mesh = Mesh::new();
    let spool = tempfile::tempdir().unwrap();
    let collector = Collector::new();
    collector.ack.store(false, Ordering::SeqCst);
    let server = Server::start(
        &collector,
        "127.0.0.1:0".parse().unwrap(),
        &mesh.trust,
        &mesh.ca,
        COLLECTOR,
    )
    .await;
    let tune = |c: &mut ReporterConfig| {
        c.batch_events = 5;
        c.spool_dir = Some(spool.path().to_owned());
        c.flush_timeout = Duration::from_millis(50);
    };
    let (sink, reporter) = mesh.reporter(server.addr, 100, tune);
    let instance = reporter.instance_id().to_owned();
    let metrics = reporter.metrics().clone();
    until(&collector, "connected", || metrics.collector_connected()).await;
    let events = ids("s", 0..20);
    events.iter().for_each(|id| submit(&sink, id));
    until(&collector, "four batches received", || {
        collector.received().len() == 4
    })
    .await;
    // Connected, so they were held in memory; shutdown spools them.
    assert_eq!(reporter.metrics().spool_bytes(), 0);
    reporter.shutdown().await;
    assert!(spooled_files(spool.path()) > 0);

    collector.ack.store(true, Ordering::SeqCst);
    let (_sink, reporter) = mesh.reporter(server.addr, 100, tune);
    let metrics = reporter.metrics().clone();
    until(&collector, "the four batches acknowledged", || {
        metrics.batches_acked_total() == 4
    })
    .await;
    let received = collector.received();
    assert_eq!(received.len(), 8);
    assert!(received.iter().all(|b| b.agent_instance_id == instance));
    let sequences: Vec<u64> = received.iter().map(|b| b.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 1, 2, 3, 4]);
    assert_eq!(collector.stored_ids(), events);
    drop(sink);
    reporter.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_collector_with_the_wrong_identity_is_refused_and_gets_nothing() {
    let mesh = Mesh::new();
    let other_ca = TestCa::new("another mesh");
    for (ca, id, what) in [
        (&mesh.ca, WEB, "a workload that is not the collector"),
        (
            &other_ca,
            COLLECTOR,
            "the collector's name from a foreign CA",
        ),
    ] {
        let collector = Collector::new();
        let server = Server::start(
            &collector,
            "127.0.0.1:0".parse().unwrap(),
            &mesh.trust,
            ca,
            id,
        )
        .await;
        let (sink, reporter) = mesh.reporter(server.addr, 100, |_| {});
        ids("e", 0..20).iter().for_each(|i| submit(&sink, i));
        let metrics = reporter.metrics().clone();
        until(&collector, "repeated refused attempts", || {
            metrics.connect_failures_total() >= 3
                && collector.failed_handshakes.load(Ordering::SeqCst) >= 3
        })
        .await;
        assert_eq!(collector.handshakes.load(Ordering::SeqCst), 0, "{what}");
        assert!(collector.received().is_empty(), "{what}");
        assert!(!metrics.collector_connected(), "{what}");
        assert_eq!(metrics.batches_sent_total(), 0, "{what}");
        // Nothing lost either: the events wait for the right collector.
        assert_eq!(metrics.events_dropped_total(), 0, "{what}");
        reporter.abort().await;
        server.stop().await;
    }
}

/// One HTTP/1.1 GET over `io`; the status and the body.
async fn get<IO>(io: IO, path: &str) -> (u16, String)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "orders.shop")
        .body(Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_agent_binary_streams_its_denials_to_the_collector_and_reports_metrics() {
    use common::proc::Proc;
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &mesh.ca.pem).unwrap();
    let (cert, key) = mesh.ca.leaf_cert(&common::Leaf::spiffe(ORDERS));
    std::fs::write(dir.path().join("orders.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("orders.key"), key.serialize_pem()).unwrap();
    let collector = Collector::new();
    let server = Server::start(
        &collector,
        "127.0.0.1:0".parse().unwrap(),
        &mesh.trust,
        &mesh.ca,
        COLLECTOR,
    )
    .await;
    let app = free_port().await;
    let spool = dir.path().join("spool");
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let mut cmd = std::process::Command::new(common::AGENT);
    cmd.arg("run")
        .args(["--inbound", &format!("127.0.0.1:0={app}")])
        .args(["--trust-bundle", &file("ca.pem")])
        .args(["--cert", &file("orders.pem"), "--key", &file("orders.key")])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--collector", &server.addr.to_string()])
        .args(["--collector-id", COLLECTOR])
        .args(["--audit-spool-dir", spool.to_str().unwrap()])
        .args(["--audit-batch-ms", "10"]);
    let mut agent = Proc::spawn("agent", "info", cmd);
    let inbound: SocketAddr = agent
        .wait_for_field("inbound proxy listening", "listen")
        .await
        .parse()
        .unwrap();
    let admin: SocketAddr = agent
        .wait_for_field("admin endpoint listening", "addr")
        .await
        .parse()
        .unwrap();

    // No policy: the request is denied, and the denial is audited.
    let mut config = mesh
        .trust
        .client_config(
            Some(mesh.ca.store(WEB)),
            Some(SpiffeId::parse(ORDERS).unwrap()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("orders.shop".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (status, body) = get(tls, "/orders/1?secret=x").await;
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let request_id = body["request_id"].as_str().unwrap().to_owned();

    until(&collector, "the denial stored", || {
        collector.stored_ids().contains(&request_id)
    })
    .await;
    let stored = collector.stored();
    let event = stored
        .iter()
        .flat_map(|b| &b.events)
        .find(|e| e.request_id == request_id)
        .unwrap();
    assert_eq!(event.verdict, pb::Verdict::Deny as i32);
    assert_eq!((event.status, event.reason.as_str()), (403, "policy.none"));
    assert_eq!(event.source_principal, WEB);
    assert_eq!(event.reporter, ORDERS);
    assert_eq!(event.destination_port, u32::from(app.port()));
    assert_eq!(event.method, "GET");
    // The query never leaves the agent.
    assert!(!event.path.contains("secret"), "{}", event.path);
    assert!(collector.seen.lock().peers.iter().all(|p| p == ORDERS));
    // The log line is still written.
    agent.wait_for(&["palisade::audit", &request_id]).await;

    let mut metrics = String::new();
    until(
        &collector,
        "the metrics showing the acknowledged batch",
        || {
            let text = scrape_metrics(admin);
            let done = text.contains("palisade_audit_collector_connected 1")
                && text.contains("palisade_audit_batches_acked_total 1");
            metrics = text;
            done
        },
    )
    .await;
    for line in [
        "palisade_audit_queue_depth 0",
        "palisade_audit_spool_bytes 0",
        "palisade_audit_events_dropped_total 0",
        "palisade_audit_batches_sent_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} in\n{metrics}");
    }
    drop(agent);
    server.stop().await;
}

/// `/metrics` of the admin endpoint at `admin`, fetched on a thread of its
/// own (the condition closure of [`until`] is synchronous).
fn scrape_metrics(admin: SocketAddr) -> String {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(admin).expect("admin");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = tcp.read_to_string(&mut text);
        text
    })
    .join()
    .expect("metrics thread")
}

#[test]
fn run_help_documents_the_audit_flags_and_their_defaults() {
    let out = std::process::Command::new(common::AGENT)
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "--collector <HOST:PORT>",
        "--collector-id <spiffe://…>",
        "--audit-spool-dir <DIR>",
        "--audit-spool-max-bytes <BYTES>",
        "[default: 67108864]",
        "--audit-queue-events <N>",
        "[default: 10000]",
        "--audit-batch-events <N>",
        "[default: 500]",
        "--audit-batch-ms <MS>",
        "[default: 1000]",
    ] {
        assert!(help.contains(expected), "{expected:?} missing in\n{help}");
    }
}

#[test]
fn audit_flags_need_a_collector() {
    let out = std::process::Command::new(common::AGENT)
        .args(["run", "--inbound", "127.0.0.1:1=127.0.0.1:2"])
        .args([
            "--trust-bundle",
            "/nonexistent",
            "--cert",
            "/x",
            "--key",
            "/y",
        ])
        .args(["--audit-spool-dir", "/tmp/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--collector"), "{err}");
}
