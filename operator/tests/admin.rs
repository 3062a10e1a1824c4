//! The admin port (15014) of the real `palisade-operator` binary: plain
//! HTTP/1.1 from outside the process, metrics moved by real `Certify` calls
//! and real `Discovery.Watch` streams.

mod common;

use std::net::SocketAddr;

use common::watch::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const TOKEN_ORDERS: &str = "tok-orders-3c9a71e0d5b2f846";
const ID_ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

const POLICY: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  ports: [8080]
  routes:
    - name: read
      match:
        path: {prefix: /orders}
        methods: [GET]
      allow:
        - namespaces: [web]
"#;

struct Setup {
    _tmp: tempfile::TempDir,
    op: Operator,
}

impl Setup {
    fn admin(&self) -> SocketAddr {
        self.op.admin.expect("admin listening line")
    }
}

fn start(with_source: bool) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN_ORDERS, "shop", "orders")]);
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("orders.yaml"), POLICY).unwrap();
    let source = format!("dir:{}", policies.display());
    let mut extra = vec!["--admin", "127.0.0.1:0"];
    if with_source {
        extra.extend(["--source", source.as_str()]);
    }
    let op = spawn_operator(&tmp.path().join("state"), &tokens, &extra);
    Setup { _tmp: tmp, op }
}

/// A raw HTTP/1.1 request: status, headers (lower-cased names) and body.
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect to admin");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(STEP, tcp.read_to_string(&mut raw))
        .await
        .expect("admin answered in time")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(addr, "GET", path).await
}

/// The sample `name` (with labels, as written) in `/metrics`, if present.
fn sample(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/metrics` until `name` reads `want` (metrics lag the RPCs that
/// move them by a few scheduler ticks at most).
async fn wait_for_sample(addr: SocketAddr, name: &str, want: u64) -> String {
    poll(async || {
        let (_, _, metrics) = get(addr, "/metrics").await;
        if sample(&metrics, name) == Some(want) {
            Ok(metrics)
        } else {
            Err(format!("{name} never became {want}:\n{metrics}"))
        }
    })
    .await
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let s = start(false);
    let (status, _, body) = get(s.admin(), "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Announced after the gRPC listener is bound: ready at once.
    let (status, _, _) = get(s.admin(), "/readyz").await;
    assert_eq!(status, 200);
    let (status, _, _) = get(s.admin(), "/debug/pprof").await;
    assert_eq!(status, 404);
    let (status, head, _) = request(s.admin(), "POST", "/metrics").await;
    assert_eq!(status, 405);
    assert!(head.contains("\r\nallow: get, head"), "{head}");
}

#[tokio::test]
async fn metrics_count_issued_and_refused_certificates() {
    let s = start(false);
    let (status, head, before) = get(s.admin(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        sample(&before, "palisade_operator_certificates_issued_total"),
        Some(0),
        "{before}"
    );

    let mut client = s.op.client().await;
    let (_, csr_pem) = csr(vec![]);
    let issued = certify(&mut client, TOKEN_ORDERS, &csr_pem, 0)
        .await
        .unwrap();
    assert_eq!(issued.spiffe_id, ID_ORDERS);
    let refused = certify(&mut client, "tok-nobody-knows-this-one", &csr_pem, 0)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let (_, _, metrics) = get(s.admin(), "/metrics").await;
    for (name, want) in [
        ("palisade_operator_certificates_issued_total", 1),
        (
            "palisade_operator_certificates_refused_total{reason=\"token\"}",
            1,
        ),
        (
            "palisade_operator_certificates_refused_total{reason=\"csr\"}",
            0,
        ),
        ("palisade_operator_certificates_failed_total", 0),
    ] {
        assert_eq!(sample(&metrics, name), Some(want), "{name}:\n{metrics}");
    }
    // No policy source, no discovery to report on.
    assert!(
        !metrics.contains("palisade_operator_discovery_subscribers"),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_show_watch_subscribers_and_mesh_destinations() {
    let s = start(true);
    let before = wait_for_sample(s.admin(), "palisade_operator_discovery_subscribers", 0).await;
    assert_eq!(
        sample(&before, "palisade_operator_mesh_destinations"),
        Some(0),
        "{before}"
    );

    let identity = identity_for(&s.op, TOKEN_ORDERS, ID_ORDERS).await;
    let mut watch = Watch::open(
        channel(&s.op, Some(identity)).await,
        advertising(ID_ORDERS, "orders-1", &[("127.0.0.1", 18080)]),
    )
    .await
    .expect("watch accepted");
    let first = watch.next_response().await;
    assert!(first.policy.is_some(), "{first:?}");

    // The same instances the Watch session updates, not copies.
    let metrics = wait_for_sample(s.admin(), "palisade_operator_discovery_subscribers", 1).await;
    assert_eq!(
        sample(&metrics, "palisade_operator_mesh_destinations"),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "palisade_operator_certificates_issued_total"),
        Some(1),
        "{metrics}"
    );

    // The agent goes away: both drop back.
    drop(watch);
    wait_for_sample(s.admin(), "palisade_operator_discovery_subscribers", 0).await;
    wait_for_sample(s.admin(), "palisade_operator_mesh_destinations", 0).await;
}

#[tokio::test]
async fn an_empty_admin_flag_disables_the_port() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tmp.path(), &[(TOKEN_ORDERS, "shop", "orders")]);
    let op = spawn_operator(&tmp.path().join("state"), &tokens, &["--admin", ""]);
    assert_eq!(op.admin, None, "{}", op.log());
    // Still serves gRPC.
    certify_fresh(&mut op.client().await, TOKEN_ORDERS)
        .await
        .unwrap();
}
