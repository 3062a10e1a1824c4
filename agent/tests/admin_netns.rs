//! The admin port's access rule over a real network: a "pod" network
//! namespace runs the real `palisade-agent run` with the default `--admin`
//! (0.0.0.0:15020), and a second namespace at the other end of a veth pair
//! plays another pod of the cluster.
//!
//! Proves: from the other pod (a non-loopback source) `/config_dump` and
//! every other path outside the probes and metrics are refused with 403 and
//! a fixed body, and the refusal is logged at debug with the peer; while
//! `/healthz`, `/readyz` and `/metrics` answer 200 there. From loopback
//! inside the pod `/config_dump` answers 200 with the JSON dump (identity and
//! policy), and from the pod's own IP (not loopback) it is refused. With
//! `--admin [::]:PORT` the same holds for IPv4 clients, which show up as
//! IPv4-mapped addresses: `::ffff:127.0.0.1` is loopback, `::ffff:10.…` not.
//!
//! Needs root and `ip` (iproute2); no iptables (the rule does not depend on
//! capture). Without them the test prints a loud SKIPPED banner, or fails
//! when `PALISADE_REQUIRE_NETNS` is set (CI sets it).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::inbound::mesh_policy;
use common::netns::{Netns, veth_pair};
use common::proc::Proc;
use common::{AGENT, Leaf, ORDERS, TestCa};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const POD: &str = "10.80.0.1";
const OTHER_POD: &str = "10.80.0.2";
/// The default of `--admin`.
const ADMIN_PORT: u16 = 15020;
/// Bound on anything the test waits for, so a failure does not hang.
const WAIT: Duration = Duration::from_secs(10);
/// What a refused client reads (`palisade_agent::admin::access::FORBIDDEN_BODY`).
const FORBIDDEN_BODY: &str = palisade_agent::admin::access::FORBIDDEN_BODY;

/// Why namespaces cannot be used here, if they cannot.
fn netns_unavailable() -> Option<String> {
    match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() == 0 => {}
        Ok(m) => return Some(format!("not root (uid {})", m.uid())),
        Err(e) => return Some(format!("cannot read /proc/self: {e}")),
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Some(format!("`ip` cannot run: {e}")),
    }
}

/// `true` when the test can run; otherwise a banner nobody can miss (or a
/// failure under `PALISADE_REQUIRE_NETNS`).
fn netns_or_skip() -> bool {
    let Some(why) = netns_unavailable() else {
        return true;
    };
    if std::env::var_os("PALISADE_REQUIRE_NETNS").is_some() {
        panic!("PALISADE_REQUIRE_NETNS is set but network namespaces are unavailable: {why}");
    }
    let bar = "!".repeat(78);
    eprintln!(
        "\n{bar}\n!! SKIPPED admin_netns: {why}\n!! The admin port's access rule was NOT tested \
         over a real network. Run as root with iproute2.\n{bar}\n"
    );
    false
}

/// The pod and another pod, joined by a veth pair.
fn pods() -> (Netns, Netns) {
    veth_pair("adm", POD, OTHER_POD)
}

/// `ca.pem`, the workload's `orders.pem`/`orders.key` and its policy.
fn write_files(dir: &Path) {
    let ca = TestCa::new("mesh root");
    let (cert, key) = ca.leaf_cert(&Leaf::spiffe(ORDERS));
    let policy = mesh_policy(Vec::new());
    for (name, bytes) in [
        ("ca.pem", ca.pem.clone().into_bytes()),
        ("orders.pem", cert.pem().into_bytes()),
        ("orders.key", key.serialize_pem().into_bytes()),
        ("orders.pb", policy.encode_to_vec()),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// `palisade-agent run` in `ns` with the files of `dir`, an explicit inbound
/// listener on `inbound_port` and `extra` flags (no `--admin` unless given:
/// the default is what is under test); waits until the admin endpoint is up.
async fn start_agent(ns: &Netns, dir: &Path, inbound_port: u16, extra: &[&str]) -> Proc {
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let mut cmd = Command::new(AGENT);
    cmd.arg("run")
        .arg("--inbound")
        .arg(format!("0.0.0.0:{inbound_port}=127.0.0.1:8080"))
        .args(["--trust-bundle", &file("ca.pem")])
        .args(["--cert", &file("orders.pem")])
        .args(["--key", &file("orders.key")])
        .args(["--policy-file", &file("orders.pb")])
        .args(extra);
    let mut agent = ns.run_in(|| Proc::spawn("agent", "info,palisade_agent=debug", cmd));
    agent.wait_for(&["admin endpoint listening"]).await;
    agent
}

/// `GET path` from `socket` to `addr`, over a real TCP connection: the
/// status code and the body.
async fn get(socket: TcpSocket, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect hung")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("the admin endpoint left the connection open")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not HTTP: {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    (status, body.to_owned())
}

fn v4(ns: &Netns) -> TcpSocket {
    ns.socket()
}

fn v6(ns: &Netns) -> TcpSocket {
    ns.run_in(|| TcpSocket::new_v6().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_is_for_loopback_only_probes_and_metrics_for_all() {
    if !netns_or_skip() {
        return;
    }
    // Declared first so they are dropped last, after the agents in them.
    let (pod, other) = pods();
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path());

    // The default --admin: 0.0.0.0:15020.
    let mut agent = start_agent(&pod, dir.path(), 15006, &[]).await;
    let line = agent.wait_for(&["admin endpoint listening"]).await;
    assert!(line.contains(&format!("0.0.0.0:{ADMIN_PORT}")), "{line}");
    let admin: SocketAddr = format!("{POD}:{ADMIN_PORT}").parse().unwrap();
    let loopback: SocketAddr = format!("127.0.0.1:{ADMIN_PORT}").parse().unwrap();

    // From another pod: probes and metrics, nothing else.
    let (status, body) = get(v4(&other), admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(v4(&other), admin, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "{}",
        agent.transcript()
    );
    let (status, metrics) = get(v4(&other), admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\npalisade_identity_ready 1\n"),
        "{metrics}"
    );
    for path in [
        "/config_dump",
        "/config_dump?format=json",
        "//config_dump",
        "/config_dump/",
        "/nope",
    ] {
        let (status, body) = get(v4(&other), admin, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body, FORBIDDEN_BODY, "{path}");
        assert!(!body.contains(ORDERS), "{path}: {body}");
    }
    agent
        .wait_for(&["refused a loopback-only path", OTHER_POD, "/config_dump"])
        .await;

    // From inside the pod, over loopback: the dump.
    let (status, body) = get(v4(&pod), loopback, "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["identity"]["spiffe_id"], ORDERS, "{dump}");
    assert_eq!(dump["policy"]["version"], "v1", "{dump}");
    assert_eq!(dump["policy"]["workload"], "shop/orders", "{dump}");
    // Inside the pod but through the pod's IP: not loopback, refused.
    let (status, body) = get(v4(&pod), admin, "/config_dump").await;
    assert_eq!((status, body.as_str()), (403, FORBIDDEN_BODY));

    // Listening on [::]: IPv4 clients arrive IPv4-mapped.
    let mut dual = start_agent(&pod, dir.path(), 15007, &["--admin", "[::]:15021"]).await;
    let line = dual.wait_for(&["admin endpoint listening"]).await;
    assert!(line.contains("[::]:15021"), "{line}");
    let dual_admin: SocketAddr = format!("{POD}:15021").parse().unwrap();
    let dual_loopback: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    let dual_v6_loopback: SocketAddr = "[::1]:15021".parse().unwrap();
    let (status, body) = get(v4(&other), dual_admin, "/config_dump").await;
    assert_eq!((status, body.as_str()), (403, FORBIDDEN_BODY));
    dual.wait_for(&["refused", &format!("::ffff:{OTHER_POD}")])
        .await;
    let (status, _) = get(v4(&other), dual_admin, "/metrics").await;
    assert_eq!(status, 200);
    for (socket, addr) in [(v4(&pod), dual_loopback), (v6(&pod), dual_v6_loopback)] {
        let (status, body) = get(socket, addr, "/config_dump").await;
        assert_eq!(status, 200, "{addr}: {body}");
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(dump["identity"]["spiffe_id"], ORDERS, "{dump}");
    }
}
