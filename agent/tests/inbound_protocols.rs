//! Protocols through the inbound proxy on loopback with real mTLS: HTTP/2
//! to an h2c app with streaming and trailers, gRPC-shaped exchanges and
//! denials, WebSocket upgrades, opaque TCP on ports declared so, and
//! detection on HTTP ports (never a fallback to opaque).
//! Every app here records what it received.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::WEB;
use common::backend::{Http, loopback, serve};
use common::inbound::{TestProxy, exchange, mesh_policy, route_prefix, shared};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::rt::TokioIo;
use palisade_agent::inbound::{InboundConfig, PortProtocol};
use palisade_policy::wire as pb;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);
const EVIL: &str = "spiffe://cluster.local/ns/shop/sa/evil";

/// What an app received.
type Log = Arc<Mutex<Vec<String>>>;

/// A request body fed from a channel, so the test controls when each frame
/// goes out (streaming, not buffering).
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// The h2c app: records `METHOD path content-type`, then echoes every
/// request data frame as it arrives and ends with trailers
/// `grpc-status: 0`, `x-custom: done`.
async fn h2c_app() -> (Log, SocketAddr) {
    let log = Log::default();
    let addr = serve(
        loopback().await,
        Http::H2,
        log.clone(),
        |seen: Log, req| async move {
            let ct = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            seen.lock().push(format!(
                "{} {} {} {:?}",
                req.method(),
                req.uri().path(),
                ct,
                req.version()
            ));
            let (tx, rx) = mpsc::channel(8);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data()
                        && tx.send(Frame::data(data)).await.is_err()
                    {
                        return;
                    }
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                trailers.insert("x-custom", "done".parse().unwrap());
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            let mut resp = Response::new(ChanBody(rx));
            resp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            resp
        },
    );
    (log, addr)
}

fn route(id: &str, prefix: &str, deny_principals: &[&str]) -> pb::Route {
    let mut route = route_prefix(id, prefix);
    route.deny = vec![pb::Rule {
        id: "deny".into(),
        principals: deny_principals.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    }];
    route
}

/// Mesh default; `/admin` and `/pkg.Admin/` denied to everyone; the EVIL
/// identity denied everywhere (a catch-all route: identity-level, so it
/// applies to opaque connections too).
fn policy() -> pb::WorkloadPolicy {
    let mut evil = route("no-evil", "/", &[EVIL]);
    evil.path = None;
    mesh_policy(vec![
        route("admin", "/admin", &[]),
        route("grpc-admin", "/pkg.Admin/", &[]),
        evil,
    ])
}

/// The proxy in front of `app` under [`policy`], its config adjusted by
/// `configure`.
async fn proxy(app: SocketAddr, configure: impl FnOnce(&mut InboundConfig)) -> TestProxy {
    TestProxy::start(app, shared(Some(policy())), configure).await
}

/// A gRPC message: uncompressed flag, big-endian length, payload.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut f = vec![0u8];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f.into()
}

async fn next_frame(body: &mut Incoming) -> Frame<Bytes> {
    tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("a frame in time")
        .expect("a frame")
        .expect("not an error")
}

/// Sends `messages` one at a time on one stream, each only after the echo
/// of the previous one came back (so both directions stream), and returns
/// the response's trailers.
async fn streaming_exchange(
    sender: &mut hyper::client::conn::http2::SendRequest<ChanBody>,
    path: &str,
    content_type: &str,
    messages: &[&[u8]],
) -> (StatusCode, HeaderMap) {
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post(format!("https://orders.shop{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(ChanBody(rx))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, async {
        let send = sender.send_request(req);
        // The first message goes out before the response head exists: the
        // app only answers once the request is under way.
        tx.send(Frame::data(grpc_frame(messages[0]))).await.unwrap();
        send.await
    })
    .await
    .expect("response in time")
    .expect("response");
    let status = resp.status();
    let mut body = resp.into_body();
    for (i, msg) in messages.iter().enumerate() {
        if i > 0 {
            tx.send(Frame::data(grpc_frame(msg))).await.unwrap();
        }
        let echoed = next_frame(&mut body).await.into_data().expect("data");
        assert_eq!(echoed, grpc_frame(msg), "message {i}");
    }
    drop(tx);
    let trailers = loop {
        let frame = next_frame(&mut body).await;
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    (status, trailers)
}

#[tokio::test]
async fn http2_streams_both_ways_to_an_h2c_app_with_trailers() {
    let (log, app) = h2c_app().await;
    let p = proxy(app, |_| {}).await;
    let mut sender = p.h2().await;
    let (status, trailers) = streaming_exchange(
        &mut sender,
        "/stream",
        "application/octet-stream",
        &[b"one", b"two", b"three"],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-custom"], "done");
    assert_eq!(
        *log.lock(),
        ["POST /stream application/octet-stream HTTP/2.0"]
    );
}

#[tokio::test]
async fn grpc_unary_and_bidi_streaming_pass_and_denials_are_grpc_shaped() {
    let (log, app) = h2c_app().await;
    let p = proxy(app, |_| {}).await;
    let mut sender = p.h2().await;

    // Unary.
    let (status, trailers) = streaming_exchange(
        &mut sender,
        "/pkg.Orders/Get",
        "application/grpc",
        &[b"\x08\x01"],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(trailers["grpc-status"], "0");

    // Bidirectional streaming on the same connection.
    let (_, trailers) = streaming_exchange(
        &mut sender,
        "/pkg.Orders/Chat",
        "application/grpc+proto",
        &[b"a", b"bb", b"ccc", b"dddd"],
    )
    .await;
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-custom"], "done");

    // Denied: trailers-only, HTTP 200, grpc-status 7 (PERMISSION_DENIED).
    let (_tx, rx) = mpsc::channel(1);
    let req = Request::post("https://orders.shop/pkg.Admin/Drop")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-request-id", "grpc-req-1")
        .body(ChanBody(rx))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "7");
    assert_eq!(h["grpc-message"], "forbidden");
    assert_eq!(h["x-request-id"], "grpc-req-1");
    assert!(resp.body().is_end_stream(), "trailers-only response");

    assert_eq!(
        *log.lock(),
        [
            "POST /pkg.Orders/Get application/grpc HTTP/2.0",
            "POST /pkg.Orders/Chat application/grpc+proto HTTP/2.0",
        ]
    );
}

/// An HTTP/1.1 WebSocket app: answers the upgrade with 101, then sends a
/// `hello` text frame and echoes each (unmasked) text frame back as
/// `echo:<payload>`, recording `frame <payload>`.
async fn websocket_app() -> (Log, SocketAddr) {
    let log = Log::default();
    let addr = serve(
        loopback().await,
        Http::H1Upgrades,
        log.clone(),
        |seen: Log, mut req| async move {
            seen.lock().push(format!(
                "{} {} upgrade={}",
                req.method(),
                req.uri(),
                req.headers()
                    .get("upgrade")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
            ));
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let mut io = TokioIo::new(up);
                let _ = io.write_all(&ws_frame(b"hello", None)).await;
                while let Ok(payload) = read_ws_frame(&mut io).await {
                    seen.lock()
                        .push(format!("frame {}", String::from_utf8_lossy(&payload)));
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&payload);
                    if io.write_all(&ws_frame(&reply, None)).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(Full::new(Bytes::new()))
                .unwrap()
        },
    );
    (log, addr)
}

/// A final text frame (payload < 126 bytes), masked when `mask` is given.
fn ws_frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
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

/// Reads an HTTP/1.1 response head.
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

const WS_UPGRADE: &str = "Host: orders.shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn websocket_upgrade_joins_both_sides_and_denied_upgrades_never_reach_the_app() {
    let (log, app) = websocket_app().await;
    let p = proxy(app, |_| {}).await;

    let mut tls = p.tls_as(WEB, Some(b"http/1.1")).await.unwrap();
    tls.write_all(format!("GET /ws HTTP/1.1\r\n{WS_UPGRADE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    // App → client first, then client → app → client, twice.
    let hello = tokio::time::timeout(WAIT, read_ws_frame(&mut tls))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, b"hello");
    for msg in [&b"ping 1"[..], b"ping 2"] {
        tls.write_all(&ws_frame(msg, Some([1, 2, 3, 4])))
            .await
            .unwrap();
        let reply = tokio::time::timeout(WAIT, read_ws_frame(&mut tls))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, [b"echo:", msg].concat());
    }

    // Denied route: the normal deny response, the app sees nothing.
    let mut tls = p.tls_as(WEB, Some(b"http/1.1")).await.unwrap();
    tls.write_all(format!("GET /admin/ws HTTP/1.1\r\n{WS_UPGRADE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 403"), "{head}");

    let requests: Vec<_> = log
        .lock()
        .iter()
        .filter(|l| !l.starts_with("frame "))
        .cloned()
        .collect();
    assert_eq!(requests, ["GET /ws upgrade=websocket"]);
}

/// A WebSocket is a tunnel past per-request policy: every new policy
/// version asks again whether the request that opened it is allowed, and
/// one no longer allowed is closed.
#[tokio::test]
async fn an_upgraded_connection_is_closed_when_a_new_policy_no_longer_allows_it() {
    let (log, app) = websocket_app().await;
    let current = shared(Some(policy()));
    let p = TestProxy::start(app, current.clone(), |_| {}).await;
    let mut tls = p.tls_as(WEB, Some(b"http/1.1")).await.unwrap();
    tls.write_all(format!("GET /ws HTTP/1.1\r\n{WS_UPGRADE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let hello = tokio::time::timeout(WAIT, read_ws_frame(&mut tls))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello, b"hello");

    // A new version that still admits the request: the tunnel carries on.
    let mut still = with_version(policy(), "v2");
    still.routes.push(route_prefix("extra", "/extra"));
    current.replace(load(still));
    tls.write_all(&ws_frame(b"after v2", Some([1, 2, 3, 4])))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, read_ws_frame(&mut tls))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"echo:after v2");

    // A version that denies WEB by identity: closed, and what the client
    // writes afterwards never reaches the app.
    let mut denied = policy();
    denied.version = "v3".into();
    for r in &mut denied.routes {
        if r.id == "no-evil" {
            r.deny[0].principals = vec![WEB.to_owned()];
        }
    }
    current.replace(load(denied));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the revoked tunnel is still open");
    let _ = tls
        .write_all(&ws_frame(b"after v3", Some([1, 2, 3, 4])))
        .await;
    let frames = log.lock().clone();
    assert!(!frames.iter().any(|f| f.contains("after v3")), "{frames:?}");
}

fn with_version(mut p: pb::WorkloadPolicy, version: &str) -> pb::WorkloadPolicy {
    p.version = version.into();
    p
}

fn load(p: pb::WorkloadPolicy) -> palisade_agent::inbound::LoadedPolicy {
    palisade_agent::inbound::LoadedPolicy::load(p, Default::default(), None).expect("loads")
}

/// A raw TCP app: records every connection and the bytes it received;
/// `banner`: writes `BANNER\n` first when the client has said nothing for
/// 300 ms (a server-first protocol); otherwise, if the first bytes are
/// HTTP, answers `HTTP/1.1 200` with body `http`; else echoes.
async fn tcp_app(banner: bool) -> (Log, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                seen.lock().push("connect".into());
                let mut buf = [0u8; 1024];
                if banner {
                    let mut first = [0u8; 1];
                    let quiet =
                        tokio::time::timeout(Duration::from_millis(300), tcp.peek(&mut first))
                            .await
                            .is_err();
                    if quiet {
                        seen.lock().push("banner".into());
                        if tcp.write_all(b"BANNER\n").await.is_err() {
                            return;
                        }
                    } else if first[0] == b'G' {
                        let n = tcp.read(&mut buf).await.unwrap_or(0);
                        let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                        seen.lock()
                            .push(req.lines().next().unwrap_or("").to_owned());
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nhttp")
                            .await;
                        return;
                    }
                }
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.lock()
                        .push(format!("data {}", String::from_utf8_lossy(&buf[..n])));
                    if tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (log, addr)
}

/// The same identity rules, with the HTTP routes kept to `http_port`: the
/// app's port has identity-level rules only, so it may be opaque.
fn opaque_policy(http_port: u16, declare_tcp: Option<u16>) -> pb::WorkloadPolicy {
    let mut p = policy();
    for r in &mut p.routes {
        if r.path.is_some() {
            r.ports = vec![u32::from(http_port)];
        }
    }
    if let Some(port) = declare_tcp {
        p.ports.push(pb::PortPolicy {
            port: u32::from(port),
            mtls: pb::MtlsMode::Strict as i32,
            protocol: pb::PortProtocol::Tcp as i32,
        });
    }
    p
}

/// Plaintext and a denied identity are cut off before the app sees a byte;
/// an admitted identity gets bytes both ways, whatever they are.
async fn assert_opaque(p: &TestProxy, log: &Log) {
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let buf = exchange(tcp, b"PING plaintext\r\n", false, WAIT).await;
    assert!(!buf.windows(9).any(|w| w == b"plaintext"));

    let mut tls = p.tls_as(EVIL, None).await.unwrap();
    let _ = tls.write_all(b"let me in").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection left open");
    assert!(buf.is_empty());
    assert!(log.lock().is_empty(), "{:?}", log.lock());

    let mut tls = p.tls_as(WEB, None).await.unwrap();
    for msg in [&b"\x00\x01binary"[..], b"GET / HTTP/1.1\r\n\r\n"] {
        tls.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, tls.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, msg);
    }
    let log = log.lock().clone();
    assert_eq!(log.first().map(String::as_str), Some("connect"));
    assert_eq!(log.iter().filter(|l| *l == "connect").count(), 1, "{log:?}");
}

#[tokio::test]
async fn opaque_port_from_the_flag_echoes_after_mtls_and_refuses_plaintext_and_denied_identities() {
    let (log, app) = tcp_app(false).await;
    let policy = opaque_policy(app.port().wrapping_add(1), None);
    let p = TestProxy::start(app, shared(Some(policy)), |c| {
        c.port_protocols.insert(app.port(), PortProtocol::Opaque);
    })
    .await;
    assert_opaque(&p, &log).await;
}

#[tokio::test]
async fn opaque_port_declared_by_the_policy_needs_no_flag() {
    let (log, app) = tcp_app(false).await;
    let policy = opaque_policy(app.port().wrapping_add(1), Some(app.port()));
    let p = TestProxy::start(app, shared(Some(policy)), |_| {}).await;
    assert_opaque(&p, &log).await;
}

/// The bypass this guards against: `--opaque-ports` (or a policy's `tcp`)
/// on a port that policy gives HTTP rules must not switch them off.
#[tokio::test]
async fn a_port_with_http_rules_is_never_opaque_whatever_the_flag_says() {
    let (log, app) = tcp_app(false).await;
    let p = proxy(app, |c| {
        c.port_protocols.insert(app.port(), PortProtocol::Opaque);
        c.detect_timeout = Duration::from_millis(200);
    })
    .await;
    // A request for a denied path is answered by the agent, as HTTP.
    let mut tls = p.tls_as(WEB, None).await.unwrap();
    tls.write_all(b"GET /admin/users HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let buf = read_for(&mut tls, WAIT).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    // Bytes that are not HTTP are not tunnelled: closed, the app sees nothing.
    let mut tls = p.tls_as(WEB, None).await.unwrap();
    let _ = tls.write_all(b"\x00\x01binary").await;
    let buf = read_for(&mut tls, WAIT).await;
    assert!(buf.is_empty(), "{buf:?}");
    assert!(log.lock().is_empty(), "{:?}", log.lock());
}

/// Reads until the agent closes (or `wait` passes, failing the test).
async fn read_for<S: AsyncRead + Unpin>(s: &mut S, wait: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(wait, s.read_to_end(&mut buf))
        .await
        .expect("the agent closes the connection")
        .ok();
    buf
}

/// The fallback attack (issue: "HTTP policy bypass through the opaque
/// fallback"): a mesh client that opens mTLS without ALPN and stays silent
/// past the detection timeout, or sends one byte and stalls, is closed, and
/// nothing it sends afterwards reaches the app. HTTP without ALPN is still
/// detected and judged as HTTP.
#[tokio::test]
async fn a_silent_or_stalling_client_is_closed_never_tunnelled() {
    let (log, app) = tcp_app(true).await;
    let p = proxy(app, |c| c.detect_timeout = Duration::from_millis(200)).await;

    let mut tls = p.tls_as(WEB, None).await.unwrap();
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_for(&mut tls, WAIT).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // Silent: the agent closes once the detection timeout passes (waited on
    // as the close, not as a sleep); a request written after that is lost.
    let mut silent = p.tls_as(WEB, None).await.unwrap();
    let mut one = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, silent.read(&mut one)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let _ = silent
        .write_all(b"GET /admin/users HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await;

    // One byte, then a stall past the timeout: closed too.
    let mut stall = p.tls_as(WEB, None).await.unwrap();
    stall.write_all(b"G").await.unwrap();
    let closed = tokio::time::timeout(WAIT, stall.read(&mut one)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let _ = stall
        .write_all(b"ET /admin/users HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await;

    // The app saw the one HTTP request, nothing else: no banner exchange,
    // no /admin.
    let log = log.lock().clone();
    assert_eq!(log, ["connect", "GET /hello HTTP/1.1"], "{log:?}");
}

/// A server-first protocol (the app speaks first) works on a port the
/// policy declares `tcp`, and only there.
#[tokio::test]
async fn server_first_protocols_need_a_tcp_port() {
    let (log, app) = tcp_app(true).await;
    let policy = opaque_policy(app.port().wrapping_add(1), Some(app.port()));
    let p = TestProxy::start(app, shared(Some(policy)), |_| {}).await;
    let mut tls = p.tls_as(WEB, None).await.unwrap();
    let mut banner = [0u8; 7];
    tokio::time::timeout(WAIT, tls.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"BANNER\n");
    tls.write_all(b"HELO").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"HELO");
    let log = log.lock().clone();
    assert!(log.contains(&"banner".to_owned()), "{log:?}");
    assert!(log.contains(&"data HELO".to_owned()), "{log:?}");
}

#[tokio::test]
async fn run_until_drains_in_flight_requests_then_returns() {
    let (log, app) = h2c_app().await;
    let (p, proxy) = TestProxy::bind(app, shared(Some(policy())), |_| {}).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run_until(async {
        let _ = stop_rx.await;
    }));

    // A request in flight: headers answered, body still streaming.
    let mut sender = p.h2().await;
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post("https://orders.shop/stream")
        .body(ChanBody(rx))
        .unwrap();
    let send = sender.send_request(req);
    tx.send(Frame::data(Bytes::from_static(b"1")))
        .await
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    let mut body = resp.into_body();
    assert_eq!(next_frame(&mut body).await.into_data().unwrap(), "1");

    stop_tx.send(()).unwrap();
    // New connections are refused once draining.
    let refused = async {
        loop {
            if p.tls_as(WEB, Some(b"h2")).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("listener closed");
    // The in-flight request still completes.
    tx.send(Frame::data(Bytes::from_static(b"2")))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut body).await.into_data().unwrap(), "2");
    drop(tx);
    let trailers = next_frame(&mut body).await.into_trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    // And then run_until returns, well before the 20 s deadline.
    tokio::time::timeout(WAIT, running)
        .await
        .expect("drained")
        .unwrap();
    assert_eq!(log.lock().len(), 1);
}
