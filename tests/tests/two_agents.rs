//! Protocols through two real agents: a client app in this process speaks
//! plaintext to an outbound `palisade-agent run --outbound` (as `web`),
//! which tunnels over mTLS, pinning the server identity, to an inbound
//! `palisade-agent run --inbound` (as `orders`, enforcing a policy compiled
//! by the real `palisadectl` from `fixtures/two_agents.yaml`), which hands
//! the traffic to an app server in this process.
//!
//! ```text
//! client ─plain─▶ outbound agent (web) ═mTLS═▶ inbound agent (orders) ─plain─▶ app
//! ```
//!
//! - gRPC unary (tonic client, h2c prior knowledge, to a tonic server) with
//!   the client's identity in `x-forwarded-client-cert`, and a method the
//!   policy denies answered `PERMISSION_DENIED` without reaching the app;
//! - gRPC bidirectional streaming, message by message in lock step, ending
//!   with a status and a custom trailer the client sees;
//! - WebSocket (HTTP/1.1 Upgrade, frames both ways, close), and a denied
//!   WebSocket path answered 403 without reaching the app;
//! - opaque TCP on an app port the policy declares `tcp`: bytes both ways and
//!   half-close, and an identity the policy denies cut off before the app
//!   sees a byte.
//!
//! Each test starts its own pair of agents (an inbound agent serves one
//! app), so the tests run in parallel.

mod fixtures;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixtures::{ORDERS, OTHER, Pki, WEB, agent_command, bounded, compile_policy};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use palisade_e2e::{AppHttp, Proc, log_field, serve_app};
use palisade_proto::audit::v1::audit_client::AuditClient;
use palisade_proto::audit::v1::audit_server::{Audit, AuditServer};
use palisade_proto::audit::v1::{AuditBatch, ReportAck};
use palisade_proto::discovery::v1::discovery_client::DiscoveryClient;
use palisade_proto::discovery::v1::discovery_server::{Discovery, DiscoveryServer};
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{WatchRequest, WatchResponse, WorkloadRef};
use palisade_proto::identity::v1::identity_client::IdentityClient;
use palisade_proto::identity::v1::identity_server::{Identity, IdentityServer};
use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use palisade_proto::policy::v1::WorkloadPolicy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::Service as _;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on any one exchange, so a hung agent fails the test instead of
/// hanging it.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on an agent's start-up.
const STARTUP: Duration = Duration::from_secs(20);
const XFCC: &str = "x-forwarded-client-cert";

/// What an app received, in order.
type Log = Arc<Mutex<Vec<String>>>;

fn snapshot(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

// --- the two agents ----------------------------------------------------------

/// An inbound agent (as `orders`) in front of `app` and an outbound agent
/// (as `web`) tunnelling to it, pinned to `orders`.
struct Mesh {
    _dir: tempfile::TempDir,
    inbound: Proc,
    outbound: Proc,
    /// The outbound agent's listener: where the client app connects.
    addr: SocketAddr,
}

impl Mesh {
    /// `denied`: the identity the policy's catch-all route denies;
    /// `opaque`: the policy declares the app's port `tcp` (and gives it no
    /// HTTP rules), so the inbound agent proxies it opaquely.
    async fn start(app: SocketAddr, denied: &str, opaque: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let (orders_crt, orders_key) = pki.write_leaf(ORDERS, "orders");
        let (web_crt, web_key) = pki.write_leaf(WEB, "web");
        let port = app.port().to_string();
        let policy = if opaque {
            let vars = [("DENIED", denied), ("PORT", port.as_str())];
            compile_policy("two_agents_tcp.yaml", &vars, dir.path())
        } else {
            compile_policy("two_agents.yaml", &[("DENIED", denied)], dir.path())
        };

        let mut cmd = agent_command(&pki.bundle, &orders_crt, &orders_key, "");
        cmd.arg("--inbound")
            .arg(format!("127.0.0.1:0={app}"))
            .arg("--policy-file")
            .arg(&policy);
        let mut inbound = Proc::spawn("inbound agent (orders)", cmd);
        let inbound_addr = listening(&mut inbound, "inbound proxy listening").await;

        let mut cmd = agent_command(&pki.bundle, &web_crt, &web_key, "");
        cmd.arg("--outbound")
            .arg(format!("127.0.0.1:0={inbound_addr}"))
            .arg("--mesh-destination")
            .arg(format!("{inbound_addr}={ORDERS}"))
            // Which ALPN each tunnel offered (the silent-app test waits on it).
            .env("RUST_LOG", "info,palisade_agent::outbound=debug");
        let mut outbound = Proc::spawn("outbound agent (web)", cmd);
        let addr = listening(&mut outbound, "outbound proxy listening").await;
        Self {
            _dir: dir,
            inbound,
            outbound,
            addr,
        }
    }
}

/// The `listen=` address of the agent's start-up line `message`.
async fn listening(proc: &mut Proc, message: &str) -> SocketAddr {
    let line = proc
        .wait_for_line(STARTUP, |l| l.contains(message))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log_field(&line, "listen")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listen= address in {line:?}"))
}

/// The XFCC the inbound agent (orders) sets for the outbound agent (web):
/// `By=<orders>;Hash=<sha256 of web's certificate>;URI=<web>`.
fn assert_xfcc_names_web(xfcc: &str) {
    assert!(xfcc.starts_with(&format!("By={ORDERS};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={WEB}")), "{xfcc}");
}

// --- the gRPC app ------------------------------------------------------------

/// A tonic app implementing Identity (unary), Discovery (bidirectional
/// streaming) and Audit (denied by the policy). `requests` records every
/// HTTP request that reached the app (`<path> <xfcc>`), matched to a
/// service or not; `events` what the service implementations did.
#[derive(Clone, Default)]
struct GrpcApp {
    requests: Log,
    events: Log,
}

fn xfcc_of(metadata: &MetadataMap) -> String {
    let all: Vec<_> = metadata
        .get_all(XFCC)
        .iter()
        .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned())
        .collect();
    match all.as_slice() {
        [] => "<none>".to_owned(),
        [one] => one.clone(),
        many => panic!("{} XFCC values: {many:?}", many.len()),
    }
}

#[tonic::async_trait]
impl Identity for GrpcApp {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, Status> {
        let xfcc = xfcc_of(request.metadata());
        let token = request.into_inner().token;
        self.events.lock().unwrap().push(format!("certify {token}"));
        Ok(tonic::Response::new(CertifyResponse {
            spiffe_id: format!("certified:{token}"),
            // The caller as the app saw it, for the client to check.
            cert_chain_pem: vec![xfcc],
            ..Default::default()
        }))
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for GrpcApp {
    type WatchStream = Responses<WatchResponse>;

    /// Answers each request as it arrives (`echo <n> <pod name>`); when the
    /// client closes its side, ends with `OUT_OF_RANGE` and a custom trailer
    /// `x-watch-summary` listing what it received.
    async fn watch(
        &self,
        request: tonic::Request<tonic::Streaming<WatchRequest>>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        self.events
            .lock()
            .unwrap()
            .push(format!("watch xfcc={}", xfcc_of(request.metadata())));
        let mut incoming = request.into_inner();
        let events = self.events.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut names = Vec::new();
            loop {
                match incoming.message().await {
                    Ok(Some(req)) => {
                        let name = match req.kind {
                            Some(Kind::Subscribe(w)) => w.pod_name,
                            other => format!("{other:?}"),
                        };
                        events.lock().unwrap().push(format!("recv {name}"));
                        let reply = WatchResponse {
                            policy: Some(WorkloadPolicy {
                                version: names.len().to_string(),
                                workload: format!("echo {} {name}", names.len()),
                                ..Default::default()
                            }),
                            destinations: None,
                        };
                        names.push(name);
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        events.lock().unwrap().push("client closed".into());
                        let mut trailers = MetadataMap::new();
                        trailers.insert(
                            "x-watch-summary",
                            format!("received={}", names.join(",")).parse().unwrap(),
                        );
                        let status = Status::with_metadata(
                            Code::OutOfRange,
                            format!("nothing more to watch after {} requests", names.len()),
                            trailers,
                        );
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(status) => {
                        events.lock().unwrap().push(format!("error {status}"));
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Audit for GrpcApp {
    type ReportStream = Responses<ReportAck>;

    async fn report(
        &self,
        request: tonic::Request<tonic::Streaming<AuditBatch>>,
    ) -> Result<tonic::Response<Self::ReportStream>, Status> {
        self.events.lock().unwrap().push("report".into());
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(batch)) = incoming.message().await {
                let ack = ReportAck {
                    sequence: batch.sequence,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the gRPC app over h2c (HTTP/2 with prior knowledge, what the
/// inbound agent speaks to an app when its client spoke HTTP/2).
async fn start_grpc_app() -> (GrpcApp, SocketAddr) {
    let app = GrpcApp::default();
    let routes = Routes::new(IdentityServer::new(app.clone()))
        .add_service(DiscoveryServer::new(app.clone()))
        .add_service(AuditServer::new(app.clone()))
        .prepare();
    let state = (routes, app.requests.clone());
    let addr = serve_app(
        AppHttp::H2,
        state,
        |(mut routes, requests): (Routes, Log), req| {
            let xfcc: Vec<_> = req
                .headers()
                .get_all(XFCC)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            requests
                .lock()
                .unwrap()
                .push(format!("{} {}", req.uri().path(), xfcc.join(" | ")));
            let answer = routes.call(req);
            async move {
                let Ok(resp) = answer.await;
                resp
            }
        },
    )
    .await;
    (app, addr)
}

/// A tonic channel to the outbound agent: plaintext HTTP/2 with prior
/// knowledge, as any gRPC client in a meshed pod.
async fn channel(mesh: &Mesh) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{}", mesh.addr)).unwrap();
    let connect = endpoint.connect();
    tokio::time::timeout(WAIT, connect)
        .await
        .expect("gRPC connect in time")
        .expect("gRPC connect")
}

#[tokio::test]
async fn grpc_unary_crosses_both_agents_with_the_callers_identity_and_denials_are_permission_denied()
 {
    bounded("gRPC unary", 60, async {
        let (app, app_addr) = start_grpc_app().await;
        let mesh = Mesh::start(app_addr, OTHER, false).await;
        let channel = channel(&mesh).await;
        let mut identity = IdentityClient::new(channel.clone());

        // Allowed unary call. The client tries to pass itself off as someone
        // else in XFCC; the app must see only what the inbound agent set.
        let mut request = tonic::Request::new(CertifyRequest {
            token: "tok-1".into(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            XFCC,
            "By=spiffe://cluster.local/ns/shop/sa/orders;URI=spiffe://cluster.local/ns/shop/sa/admin"
                .parse()
                .unwrap(),
        );
        let reply = tokio::time::timeout(WAIT, identity.certify(request))
            .await
            .expect("reply in time")
            .unwrap_or_else(|status| panic!("Certify failed: {status:?}"))
            .into_inner();
        assert_eq!(reply.spiffe_id, "certified:tok-1");
        let [xfcc] = reply.cert_chain_pem.as_slice() else {
            panic!("{:?}", reply.cert_chain_pem)
        };
        assert_xfcc_names_web(xfcc);
        assert!(!xfcc.contains("sa/admin"), "spoofed XFCC kept: {xfcc}");

        // Denied method: a trailers-only PERMISSION_DENIED from the inbound
        // agent; the app never sees the request.
        let mut audit = AuditClient::new(channel.clone());
        let batch = AuditBatch {
            sequence: 7,
            ..Default::default()
        };
        let denied = tokio::time::timeout(WAIT, audit.report(tokio_stream::iter(vec![batch])))
            .await
            .expect("answer in time");
        let status = match denied {
            Ok(resp) => panic!("Audit.Report was let through: {:?}", resp.metadata()),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(status.message(), "forbidden", "{status:?}");

        // The connection still serves allowed calls afterwards.
        let reply = tokio::time::timeout(
            WAIT,
            identity.certify(CertifyRequest {
                token: "tok-2".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("reply in time")
        .expect("second Certify")
        .into_inner();
        assert_eq!(reply.spiffe_id, "certified:tok-2");

        let requests = snapshot(&app.requests);
        assert_eq!(requests.len(), 2, "{requests:?}");
        for r in &requests {
            let (path, xfcc) = r.split_once(' ').unwrap();
            assert_eq!(path, "/palisade.identity.v1.Identity/Certify");
            assert_xfcc_names_web(xfcc);
        }
        assert_eq!(snapshot(&app.events), ["certify tok-1", "certify tok-2"]);
    })
    .await;
}

#[tokio::test]
async fn grpc_bidirectional_streaming_interleaves_through_both_agents_and_trailers_arrive() {
    bounded("gRPC streaming", 60, async {
        let (app, app_addr) = start_grpc_app().await;
        let mesh = Mesh::start(app_addr, OTHER, false).await;
        let mut discovery = DiscoveryClient::new(channel(&mesh).await);

        let names = ["alpha", "bravo", "charlie", "delta"];
        let subscribe = |name: &str| WatchRequest {
            kind: Some(Kind::Subscribe(WorkloadRef {
                pod_name: name.to_owned(),
                ..Default::default()
            })),
        };
        let (tx, rx) = mpsc::channel(1);
        // The first message is under way before the call returns (the app
        // answers the headers at once; either order must work).
        tx.send(subscribe(names[0])).await.unwrap();
        let mut replies = tokio::time::timeout(WAIT, discovery.watch(ReceiverStream::new(rx)))
            .await
            .expect("response headers in time")
            .expect("Watch accepted")
            .into_inner();
        // Lock step: message i+1 is only sent once reply i came back, so
        // neither agent can be buffering a direction until the stream ends.
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                tx.send(subscribe(name)).await.unwrap();
            }
            let reply = tokio::time::timeout(WAIT, replies.message())
                .await
                .unwrap_or_else(|_| panic!("no reply to message {i} ({name}): buffered?"))
                .unwrap_or_else(|status| panic!("stream failed at {i}: {status:?}"))
                .unwrap_or_else(|| panic!("stream ended at {i}"));
            let policy = reply.policy.expect("policy");
            assert_eq!(policy.workload, format!("echo {i} {name}"));
            assert_eq!(policy.version, i.to_string());
        }
        let events = snapshot(&app.events);
        assert_eq!(
            events.iter().filter(|e| e.starts_with("recv ")).count(),
            names.len(),
            "{events:?}"
        );
        assert!(!events.contains(&"client closed".to_owned()), "{events:?}");

        // The client closes its side; the app ends the stream with its
        // status and a custom trailer, which reach the client unchanged.
        drop(tx);
        let end = tokio::time::timeout(WAIT, replies.message())
            .await
            .expect("end of stream in time");
        let status = match end {
            Err(status) => status,
            Ok(other) => panic!("expected the app's status, got {other:?}"),
        };
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert_eq!(
            status.message(),
            "nothing more to watch after 4 requests",
            "{status:?}"
        );
        assert_eq!(
            status
                .metadata()
                .get("x-watch-summary")
                .and_then(|v| v.to_str().ok()),
            Some("received=alpha,bravo,charlie,delta"),
            "{status:?}"
        );

        let events = snapshot(&app.events);
        let xfcc = events[0]
            .strip_prefix("watch xfcc=")
            .unwrap_or_else(|| panic!("{events:?}"));
        assert_xfcc_names_web(xfcc);
        assert_eq!(
            events[1..],
            [
                "recv alpha",
                "recv bravo",
                "recv charlie",
                "recv delta",
                "client closed"
            ]
        );
        let requests = snapshot(&app.requests);
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert!(
            requests[0].starts_with("/palisade.discovery.v1.Discovery/Watch "),
            "{requests:?}"
        );
    })
    .await;
}

// --- WebSocket ---------------------------------------------------------------

/// An HTTP/1.1 WebSocket app: logs `<method> <target> upgrade=<..> <xfcc>`
/// per request, answers the upgrade with 101, then sends a `hello` text
/// frame, echoes each text frame as `echo:<payload>`, and logs
/// `ws closed` when the client's side ends.
async fn websocket_app() -> (Log, SocketAddr) {
    let log = Log::default();
    let addr = serve_app(AppHttp::H1, log.clone(), |seen: Log, mut req| async move {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        seen.lock().unwrap().push(format!(
            "{} {} upgrade={} {}",
            req.method(),
            req.uri(),
            header("upgrade"),
            header(XFCC)
        ));
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = upgrade.await else { return };
            let mut io = TokioIo::new(up);
            let _ = io.write_all(&ws_frame(b"hello", None)).await;
            while let Ok(payload) = read_ws_frame(&mut io).await {
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&payload);
                if io.write_all(&ws_frame(&reply, None)).await.is_err() {
                    return;
                }
            }
            seen.lock().unwrap().push("ws closed".into());
            let _ = io.shutdown().await;
        });
        http::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    (log, addr)
}

/// A final text frame (payload < 126 bytes), masked when `mask` is given.
fn ws_frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![
        0x81,
        payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 },
    ];
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one frame (payload < 126 bytes) and returns its unmasked payload.
async fn read_ws_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let len = usize::from(head[1] & 0x7f);
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if head[1] & 0x80 != 0 {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(payload)
}

/// Reads an HTTP/1.1 response head, byte by byte (nothing after it).
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(WAIT, r.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn ws_upgrade(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: orders.shop\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

#[tokio::test]
async fn websocket_upgrades_through_both_agents_and_denied_paths_never_reach_the_app() {
    bounded("WebSocket", 60, async {
        let (log, app_addr) = websocket_app().await;
        let mesh = Mesh::start(app_addr, OTHER, false).await;

        let mut tcp = TcpStream::connect(mesh.addr).await.unwrap();
        tcp.write_all(ws_upgrade("/ws/chat").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut tcp).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(
            head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{head}"
        );
        // App → client unprompted, then client → app → client, three times.
        let hello = tokio::time::timeout(WAIT, read_ws_frame(&mut tcp))
            .await
            .expect("hello in time")
            .unwrap();
        assert_eq!(hello, b"hello");
        for (i, msg) in [&b"ping 1"[..], b"ping 2", b"\x00binary-ish\xff"]
            .into_iter()
            .enumerate()
        {
            tcp.write_all(&ws_frame(msg, Some([1, 2, 3, i as u8])))
                .await
                .unwrap();
            let reply = tokio::time::timeout(WAIT, read_ws_frame(&mut tcp))
                .await
                .unwrap_or_else(|_| panic!("no echo of frame {i}"))
                .unwrap();
            assert_eq!(reply, [b"echo:", msg].concat());
        }
        // The client ends its side: the end crosses both agents, the app
        // closes too, and the client sees the end.
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await;
        assert!(
            matches!(end, Ok(Ok(_))),
            "connection not closed after the client's close: {end:?}"
        );
        assert!(rest.is_empty(), "{rest:?}");

        // A denied path: the inbound agent's 403; the app sees nothing.
        let mut tcp = TcpStream::connect(mesh.addr).await.unwrap();
        tcp.write_all(ws_upgrade("/ws-denied/chat").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
            .await
            .expect("the denied upgrade is answered and closed in time");
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 403"), "{read:?} {text}");
        assert!(text.contains("\"error\":\"forbidden\""), "{text}");

        let log = snapshot(&log);
        assert_eq!(log.len(), 2, "{log:?}");
        let xfcc = log[0]
            .strip_prefix("GET /ws/chat upgrade=websocket ")
            .unwrap_or_else(|| panic!("{log:?}"));
        assert_xfcc_names_web(xfcc);
        assert_eq!(log[1], "ws closed");
    })
    .await;
}

/// The fallback attack through an outbound agent: an app that is silent
/// past the outbound agent's detection timeout gets a tunnel without ALPN;
/// the inbound agent still reads HTTP on its HTTP port, so the request it
/// then sends meets every HTTP rule (here, a denied path) instead of being
/// tunnelled to the app.
#[tokio::test]
async fn a_silent_app_behind_the_outbound_agent_cannot_tunnel_past_http_rules() {
    bounded("silent app", 60, async {
        let (log, app_addr) = websocket_app().await;
        let mut mesh = Mesh::start(app_addr, OTHER, false).await;
        let mut tcp = TcpStream::connect(mesh.addr).await.unwrap();
        // Wait (on the event, not the clock) until the outbound agent has
        // given up detecting and opened the tunnel without ALPN.
        mesh.outbound
            .wait_for_line(WAIT, |l| {
                l.contains("mTLS tunnel established") && l.contains("none")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tcp.write_all(
            b"GET /ws-denied/secrets HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
            .await
            .expect("answered and closed in time")
            .unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 403"), "{text}");
        assert!(snapshot(&log).is_empty(), "{:?}", snapshot(&log));
    })
    .await;
}

// --- opaque TCP --------------------------------------------------------------

const BANNER: &[u8] = b"HELLO opaque\n";

/// A raw TCP app, server-first: logs `connect`, sends [`BANNER`], echoes
/// what it receives (logged as `data <n>`), and when the client's side ends
/// (half-close) logs `eof`, sends `BYE <total bytes>\n` and closes.
async fn tcp_app() -> (Log, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                seen.lock().unwrap().push("connect".into());
                if tcp.write_all(BANNER).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                let mut total = 0;
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            seen.lock().unwrap().push(format!("error {e}"));
                            return;
                        }
                    };
                    total += n;
                    seen.lock().unwrap().push(format!("data {n}"));
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                seen.lock().unwrap().push("eof".into());
                let _ = tcp.write_all(format!("BYE {total}\n").as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (log, addr)
}

async fn read_exactly(tcp: &mut TcpStream, n: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, tcp.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing in time"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    buf
}

#[tokio::test]
async fn opaque_tcp_flows_both_ways_with_half_close_and_a_denied_identity_is_cut_off() {
    bounded("opaque TCP", 60, async {
        let (log, app_addr) = tcp_app().await;
        let (denied_log, denied_app_addr) = tcp_app().await;
        // Same policy, except that the second one denies `web` by identity.
        let (mesh, mut denied_mesh) = tokio::join!(
            Mesh::start(app_addr, OTHER, true),
            Mesh::start(denied_app_addr, WEB, true)
        );

        // Admitted. The first bytes look like HTTP/1.1 (the outbound agent
        // offers ALPN http/1.1 for them): on an opaque port they must still
        // reach the app byte for byte, not as a proxied HTTP request.
        let mut tcp = TcpStream::connect(mesh.addr).await.unwrap();
        let http_like = b"GET /raw HTTP/1.1\r\nHost: orders.shop\r\n\r\n";
        tcp.write_all(http_like).await.unwrap();
        assert_eq!(read_exactly(&mut tcp, BANNER.len(), "banner").await, BANNER);
        assert_eq!(
            read_exactly(&mut tcp, http_like.len(), "echo 1").await,
            http_like
        );
        let binary = b"\x00\x01\x02\x16\x03\x01binary\xff\xfe";
        tcp.write_all(binary).await.unwrap();
        assert_eq!(read_exactly(&mut tcp, binary.len(), "echo 2").await, binary);
        // Half-close: our end of sending reaches the app, which still answers
        // after it; then its end reaches us.
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
            .await
            .expect("the app's answer after half-close, then its end, in time")
            .expect("read after half-close");
        let total = http_like.len() + binary.len();
        assert_eq!(
            String::from_utf8_lossy(&rest),
            format!("BYE {total}\n"),
            "app log: {:?}",
            snapshot(&log)
        );
        let seen = snapshot(&log);
        assert_eq!(
            seen.first().map(String::as_str),
            Some("connect"),
            "{seen:?}"
        );
        assert_eq!(seen.last().map(String::as_str), Some("eof"), "{seen:?}");
        assert_eq!(
            seen.iter().filter(|l| *l == "connect").count(),
            1,
            "{seen:?}"
        );

        // Denied by identity: the inbound agent refuses the connection
        // before connecting to the app; the client gets no byte (not even
        // the banner, which the app would send at once) and is closed.
        let mut tcp = TcpStream::connect(denied_mesh.addr).await.unwrap();
        let _ = tcp.write_all(b"let me in\n").await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
            .await
            .expect("the denied connection is closed in time");
        assert!(
            got.is_empty(),
            "{read:?} {:?}",
            String::from_utf8_lossy(&got)
        );
        let refused = denied_mesh
            .inbound
            .wait_for_line(WAIT, |l| l.contains("opaque connection refused"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            log_field(&refused, "identity").as_deref(),
            Some(WEB),
            "{refused}"
        );
        assert!(
            snapshot(&denied_log).is_empty(),
            "the app saw a denied connection: {:?}",
            snapshot(&denied_log)
        );
        // The admitted side is unaffected: one connection, nothing refused.
        assert!(
            mesh.inbound
                .lines_matching(|l| l.contains("opaque connection refused"))
                .is_empty()
        );
    })
    .await;
}
