//! The inbound proxy in explicit mode on loopback: a recording HTTP/1.1
//! backend behind it, mTLS clients with rcgen SPIFFE certificates in front.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::backend::{Http, loopback, serve};
use common::inbound::{TestProxy, header, mesh_policy, route_prefix, shared};
use common::{ORDERS, WEB};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use palisade_agent::authn::JwtOptions;
use palisade_agent::inbound::{InboundConfig, LoadedPolicy, SharedPolicy};
use palisade_policy::wire as pb;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: HeaderMap,
}

/// An HTTP/1.1 app that records every request it receives and answers 200 "app".
#[derive(Clone, Default)]
struct Backend(Arc<Mutex<Vec<Seen>>>);

impl Backend {
    async fn start() -> (Self, SocketAddr) {
        let backend = Backend::default();
        let addr = serve(
            loopback().await,
            Http::H1,
            backend.clone(),
            |backend: Backend, req| async move {
                backend.0.lock().push(Seen {
                    method: req.method().to_string(),
                    target: req.uri().to_string(),
                    headers: req.headers().clone(),
                });
                Response::new(Full::new(Bytes::from_static(b"app")))
            },
        );
        (backend, addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.lock().clone()
    }
}

/// Mesh default (all authenticated), strict mTLS, `/admin` denied to
/// everyone, `/limited` limited to 3 per minute per principal.
fn test_policy() -> pb::WorkloadPolicy {
    let mut admin = route_prefix("admin", "/admin");
    admin.deny = vec![pb::Rule {
        id: "everyone".into(),
        ..Default::default()
    }];
    let mut limited = route_prefix("limited", "/limited");
    limited.rate_limit = Some(pb::RateLimit {
        id: "three-per-minute".into(),
        algorithm: pb::rate_limit::Algorithm::FixedWindow as i32,
        amount: 3,
        period_ms: 60_000,
        key: pb::rate_limit::KeyKind::Principal as i32,
        scope: pb::rate_limit::Scope::Local as i32,
        failure_mode: pb::rate_limit::FailureMode::Closed as i32,
        ..Default::default()
    });
    mesh_policy(vec![admin, limited])
}

struct Setup {
    proxy: TestProxy,
    backend: Backend,
}

async fn setup(policy: Option<pb::WorkloadPolicy>) -> Setup {
    let (backend, app) = Backend::start().await;
    start(backend, app, shared(policy), |_| {}).await
}

/// Runs the proxy in front of `app` (whose requests `backend` records), its
/// config adjusted by `configure`.
async fn start(
    backend: Backend,
    app: SocketAddr,
    policy: SharedPolicy,
    configure: impl FnOnce(&mut InboundConfig),
) -> Setup {
    let proxy = TestProxy::start(app, policy, configure).await;
    Setup { proxy, backend }
}

impl Setup {
    /// One HTTP/1.1 request over mTLS as WEB; returns status, headers, body.
    async fn get(&self, target: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let mut sender = self.proxy.h1().await;
        let mut req = Request::get(target).header("host", "orders.shop");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }
}

#[tokio::test]
async fn allowed_request_reaches_the_app_normalized_with_xfcc_and_no_spoofed_header() {
    let s = setup(Some(test_policy())).await;
    let (status, headers, body) = s
        .get(
            "/a/%2e%2e/b?x=1",
            &[
                (
                    "x-forwarded-client-cert",
                    "By=spiffe://evil;URI=spiffe://cluster.local/ns/x/sa/admin",
                ),
                ("x-palisade-principal", "admin"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "app");
    assert!(header(&headers, "x-request-id").is_none());
    let seen = s.backend.seen();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/b?x=1");
    let xfcc: Vec<_> = seen
        .headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .collect();
    assert_eq!(xfcc.len(), 1, "exactly the agent's XFCC");
    let xfcc = xfcc[0].to_str().unwrap();
    assert!(xfcc.starts_with(&format!("By={ORDERS};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={WEB}")), "{xfcc}");
    assert!(!xfcc.contains("evil"));
    assert!(seen.headers.get("x-palisade-principal").is_none());
    assert_eq!(header(&seen.headers, "host"), Some("orders.shop"));
    assert!(seen.headers.get("x-request-id").is_some());
}

#[tokio::test]
async fn http2_clients_are_proxied_to_the_http1_app() {
    // HTTP/2 clients reach an app as HTTP/2 (h2c) by default; this app only
    // speaks HTTP/1.1, so its port is configured `http1`.
    let (backend, app) = Backend::start().await;
    let s = start(backend, app, shared(Some(test_policy())), |config| {
        config
            .app_protocols
            .insert(app.port(), palisade_agent::inbound::AppProtocol::Http1);
    })
    .await;
    let mut sender = s.proxy.h2().await;
    let req = Request::get("https://orders.shop/a/./c")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let seen = s.backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/a/c");
    assert_eq!(header(&seen[0].headers, "host"), Some("orders.shop"));
    assert!(seen[0].headers.get("x-forwarded-client-cert").is_some());
}

#[tokio::test]
async fn denied_routes_and_encoded_tricks_never_reach_the_app() {
    let s = setup(Some(test_policy())).await;
    let (status, headers, body) = s.get("/admin/users", &[("x-request-id", "req-1")]).await;
    assert_eq!(status, 403);
    assert_eq!(body, r#"{"error":"forbidden","request_id":"req-1"}"#);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));

    let (status, _, body) = s.get("/%61dmin", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.starts_with(r#"{"error":"forbidden","request_id":""#),
        "{body}"
    );

    let (status, _, body) = s.get("/x/..%2fadmin", &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with(r#"{"error":"bad_request""#), "{body}");

    let (status, _, _) = s.get("/ADMIN/../admin", &[]).await;
    assert_eq!(status, 403);

    // Connection nominating a framing header is ambiguous: 400.
    let (status, _, _) = s.get("/b", &[("connection", "content-length")]).await;
    assert_eq!(status, 400);

    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
}

#[tokio::test]
async fn strict_mode_refuses_plaintext_and_clients_without_a_certificate() {
    let s = setup(Some(test_policy())).await;
    // Plaintext HTTP: the handshake fails and nothing is answered.
    let mut tcp = TcpStream::connect(s.proxy.addr).await.unwrap();
    tcp.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection left open");
    assert!(!buf.starts_with(b"HTTP/"), "plaintext got an HTTP answer");

    // TLS without a client certificate: refused (seen on the first read in TLS 1.3).
    let mut config = s.proxy.trust.client_config(None, None).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let outcome = async {
        let mut tls = s.proxy.connect(config).await?;
        tls.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<_, std::io::Error>(n)
    }
    .await;
    assert!(matches!(outcome, Err(_) | Ok(0)), "{outcome:?}");
    assert!(s.backend.seen().is_empty());
}

#[tokio::test]
async fn rate_limit_admits_n_then_answers_429_with_retry_after() {
    let s = setup(Some(test_policy())).await;
    for i in 0..3 {
        let (status, headers, _) = s.get("/limited", &[]).await;
        assert_eq!(status, 200, "request {i}");
        assert_eq!(header(&headers, "ratelimit-limit"), Some("3"));
        assert_eq!(
            header(&headers, "ratelimit-remaining"),
            Some(["2", "1", "0"][i])
        );
    }
    let (status, headers, body) = s.get("/limited", &[]).await;
    assert_eq!(status, 429);
    assert!(
        body.starts_with(r#"{"error":"too_many_requests""#),
        "{body}"
    );
    let retry: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(s.backend.seen().len(), 3);
}

#[tokio::test]
async fn without_a_policy_everything_is_denied() {
    let s = setup(None).await;
    for target in ["/", "/b", "/admin"] {
        let (status, _, body) = s.get(target, &[]).await;
        assert_eq!(status, 403);
        assert!(body.starts_with(r#"{"error":"forbidden""#), "{body}");
    }
    assert!(s.backend.seen().is_empty());
}

#[tokio::test]
async fn unreachable_app_gives_502() {
    // A port nobody listens on: bind, take the address, close.
    let app = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let s = start(Backend::default(), app, shared(Some(test_policy())), |_| {}).await;
    let (status, _, body) = s.get("/b", &[]).await;
    assert_eq!(status, 502);
    assert!(body.starts_with(r#"{"error":"bad_gateway""#), "{body}");
}

#[tokio::test]
async fn body_rules_are_enforced_per_request_not_refused_wholesale() {
    // Formerly refused with 403 as unenforceable; the body steps are covered
    // in depth by inbound_body.rs. Here: the routes now serve requests.
    let mut policy = test_policy();
    let mut schema = route_prefix("payments", "/payments");
    schema.validation = Some(pb::Validation {
        json_schema: r#"{"type":"object"}"#.into(),
        ..Default::default()
    });
    let mut masked = route_prefix("profile", "/profile");
    masked.response = Some(pb::ResponseRules {
        redact: vec!["/ssn".into()],
        ..Default::default()
    });
    policy.routes.extend([schema, masked]);
    let s = setup(Some(policy)).await;

    // A read without a body on a schema route has nothing to validate.
    let (status, _, body) = s.get("/payments/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "app");

    // The app answers "app" without a Content-Type on a masked route: a
    // client could sniff it as JSON, and it is not JSON the agent can
    // inspect, so it is withheld (fail closed).
    let (status, _, body) = s.get("/profile", &[("accept-encoding", "gzip")]).await;
    assert_eq!(status, 502);
    assert!(body.starts_with(r#"{"error":"bad_gateway""#), "{body}");

    let seen = s.backend.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].target, "/payments/1");
    assert_eq!(seen[1].target, "/profile");
    // The masked route asked the app for an unencoded body.
    assert_eq!(
        header(&seen[1].headers, "accept-encoding"),
        Some("identity")
    );
    assert_eq!(header(&seen[0].headers, "accept-encoding"), None);

    // Routes without such rules still work.
    let (status, _, _) = s.get("/b", &[]).await;
    assert_eq!(status, 200);
}

/// A new policy version is swapped in atomically: a request already past the
/// decision finishes on the version it started with, the next one is
/// decided by the new version.
#[tokio::test]
async fn a_policy_swap_applies_to_new_requests_while_in_flight_ones_finish_on_the_old() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    // The app holds every request until the test releases it.
    #[derive(Clone, Default)]
    struct Gate {
        arrived: Arc<AtomicUsize>,
        release: Arc<Notify>,
    }
    let gate = Gate::default();
    let app = serve(
        loopback().await,
        Http::H1,
        gate.clone(),
        |gate: Gate, _req| async move {
            gate.arrived.fetch_add(1, Ordering::SeqCst);
            gate.release.notified().await;
            Response::new(Full::new(Bytes::from_static(b"app")))
        },
    );
    let policy = shared(Some(test_policy()));
    let s = start(Backend::default(), app, policy.clone(), |_| {}).await;
    let s = Arc::new(s);

    // v1 allows /orders: the request reaches the app and waits there.
    let in_flight = {
        let s = s.clone();
        tokio::spawn(async move { s.get("/orders/1", &[]).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while gate.arrived.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // v2 denies /orders to everyone.
    let mut v2 = test_policy();
    v2.version = "v2".into();
    let mut orders = route_prefix("orders", "/orders");
    orders.deny = vec![pb::Rule {
        id: "closed".into(),
        ..Default::default()
    }];
    v2.routes.push(orders);
    let previous =
        policy.replace(LoadedPolicy::load(v2, JwtOptions::default(), None).expect("v2 loads"));
    assert_eq!(previous.expect("v1 was loaded").engine.version(), "v1");

    // New requests are decided by v2, without ever reaching the app.
    let (status, _, _) = s.get("/orders/2", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(gate.arrived.load(Ordering::SeqCst), 1);

    // The in-flight one finishes as v1 decided.
    gate.release.notify_one();
    let (status, _, body) = in_flight.await.expect("in-flight request");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "app"));
}
