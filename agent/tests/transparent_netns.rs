//! Transparent mode for real: two "pods", each a network namespace, joined
//! by a veth pair. Each runs `palisade-agent init` (the real iptables rules)
//! and `palisade-agent run --transparent` as the proxy UID 2137; pod B's app
//! is an HTTP server recording headers, pod A's app a plain HTTP client.
//!
//! Proves: A's plain request to B's IP:port is captured by A's agent,
//! tunnelled over mTLS to B's agent, enforced there and answered by B's app,
//! which sees an XFCC naming A's SPIFFE ID; a plaintext connection that
//! bypasses A's capture (made as UID 2137) gets no answer from B's app,
//! because B's agent demands mTLS; an unmatched destination passes through
//! as plain TCP, or is refused under `--outbound-unmatched deny`. And with
//! no `--mesh-destination` at all, A's agent meshes B exactly while (and
//! with the identity) the operator's discovery stream says so: refused before
//! a table covers B, tunnelled once it pins B's identity, refused again when
//! it pins another.
//!
//! The test's own sockets join a namespace by creating them on a thread that
//! called `setns(2)` (a socket stays in the namespace it was created in), and
//! the agents are spawned from such a thread, so they start inside it.
//! Namespaces are deleted by a drop guard, also when an assertion fails.
//!
//! Needs root, `ip` (iproute2) and `iptables`; `scripts/test` installs them.
//! Without them the test prints a loud SKIPPED banner, or fails when
//! `PALISADE_REQUIRE_NETNS` is set (CI sets it).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::backend::Http;
use common::discovery::{FakeDiscovery, Seen, mesh_destinations};
use common::inbound::mesh_policy;
use common::netns::{Netns, veth_pair};
use common::operator::FakeOperator;
use common::outbound::{
    SeenHeaders, assert_one_request_from_web_at_orders, read_until, recording_app,
};
use common::proc::{Proc, agent_run};
use common::{AGENT, Leaf, OPERATOR, ORDERS, TestCa, WEB};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const PROXY_UID: u32 = 2137;
const POD_A: &str = "10.79.0.1";
const POD_B: &str = "10.79.0.2";
/// B's meshed app port.
const APP_PORT: u16 = 8080;
/// B's port excluded from inbound capture, for the passthrough case.
const PLAIN_PORT: u16 = 9090;
/// Bound on anything the test waits for, so a failure does not hang.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Environment

/// Why namespaces cannot be used here, if they cannot.
fn netns_unavailable() -> Option<String> {
    match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() == 0 => {}
        Ok(m) => return Some(format!("not root (uid {})", m.uid())),
        Err(e) => return Some(format!("cannot read /proc/self: {e}")),
    }
    for (cmd, args) in [
        ("ip", &["netns", "list"][..]),
        ("iptables", &["--version"][..]),
    ] {
        match Command::new(cmd).args(args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Some(format!(
                    "`{cmd} {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Err(e) => return Some(format!("`{cmd}` cannot run: {e}")),
        }
    }
    None
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
        "\n{bar}\n!! SKIPPED transparent_netns: {why}\n!! Transparent mode was NOT tested. \
         Run as root with iproute2 and iptables.\n{bar}\n"
    );
    false
}

/// Two namespaces joined by a veth pair: A = 10.79.0.1, B = 10.79.0.2.
fn pods() -> (Netns, Netns) {
    veth_pair("tp", POD_A, POD_B)
}

// ---------------------------------------------------------------------------
// Processes

/// `palisade-agent run --transparent` in `ns`, as UID/GID 2137, with the
/// certificate `name` from `dir`; waits until both listeners are up.
async fn start_agent(ns: &Netns, dir: &Path, name: &str, extra: &[&str]) -> Proc {
    let cmd = agent_run(dir, name, &[&["--transparent"], extra].concat());
    spawn_agent(ns, name, cmd).await
}

/// Runs the agent command `cmd` (which must include `--transparent`) in
/// `ns` as UID/GID 2137; waits until both listeners are up.
async fn spawn_agent(ns: &Netns, name: &str, mut cmd: Command) -> Proc {
    cmd.uid(PROXY_UID).gid(PROXY_UID);
    let mut agent =
        ns.run_in(|| Proc::spawn(&format!("agent {name}"), "info,palisade_agent=debug", cmd));
    agent.wait_for(&["inbound proxy listening"]).await;
    agent
        .wait_for(&["outbound proxy listening (transparent)"])
        .await;
    agent
}

// ---------------------------------------------------------------------------
// Fixtures

/// `ca.pem`, `NAME.pem`/`NAME.key` per identity and B's policy, readable by
/// the agents' UID (tempdirs are 0700 and root's).
fn write_files(dir: &Path, ca: &TestCa) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut files = vec![("ca.pem".to_owned(), ca.pem.clone().into_bytes())];
    for (name, id) in [("a", WEB), ("b", ORDERS)] {
        let (cert, key) = ca.leaf_cert(&Leaf::spiffe(id));
        files.push((format!("{name}.pem"), cert.pem().into_bytes()));
        files.push((format!("{name}.key"), key.serialize_pem().into_bytes()));
    }
    // Mesh default: any authenticated peer, strict mTLS.
    files.push(("b.pb".to_owned(), mesh_policy(Vec::new()).encode_to_vec()));
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// B's app: HTTP/1.1, records each request's headers, answers "pod-b-app".
fn serve_app(listener: TcpListener) -> SeenHeaders {
    recording_app(listener, Http::H1, b"pod-b-app")
}

/// B's unmeshed service: answers `plain:` + the first bytes it receives and
/// reports who connected.
fn serve_plain(listener: TcpListener) -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::new()));
    let record = peers.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, peer)) = listener.accept().await {
            record.lock().push(peer);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = tcp.read(&mut buf).await {
                    let _ = tcp.write_all(b"plain:").await;
                    let _ = tcp.write_all(&buf[..n]).await;
                }
            });
        }
    });
    peers
}

/// Connects `socket` to `addr`, sends `request`, and reads until the other
/// side closes (an error counts as closed). `None` if the connect failed.
async fn exchange(socket: TcpSocket, addr: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    let mut tcp: TcpStream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect hung")
        .ok()?;
    if tcp.write_all(request).await.is_err() {
        return Some(Vec::new());
    }
    Some(read_until(&mut tcp, WAIT, "the connection was left open", |_| false).await)
}

fn get(host: &str) -> Vec<u8> {
    format!("GET /hello HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_between_two_pods() {
    if !netns_or_skip() {
        return;
    }
    // Declared first so they are dropped last, after every process in them.
    let (pod_a, pod_b) = pods();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh root");
    write_files(dir.path(), &ca);

    let plain_port = PLAIN_PORT.to_string();
    pod_a.agent_init(&["--pod-ip", POD_A]);
    pod_b.agent_init(&["--pod-ip", POD_B, "--exclude-inbound-ports", &plain_port]);

    // B's apps: the meshed HTTP app and an unmeshed plain service.
    let seen = serve_app(pod_b.listen(&format!("0.0.0.0:{APP_PORT}")));
    let plain_peers = serve_plain(pod_b.listen(&format!("0.0.0.0:{PLAIN_PORT}")));

    let policy = dir.path().join("b.pb");
    let mut agent_b = start_agent(
        &pod_b,
        dir.path(),
        "b",
        &["--policy-file", policy.to_str().unwrap()],
    )
    .await;
    // A meshes B's app port only; B's plain port is an unmatched destination.
    let mesh = format!("{POD_B}:{APP_PORT}={ORDERS}");
    let mut agent_a = start_agent(&pod_a, dir.path(), "a", &["--mesh-destination", &mesh]).await;

    let app_addr: SocketAddr = format!("{POD_B}:{APP_PORT}").parse().unwrap();
    let plain_addr: SocketAddr = format!("{POD_B}:{PLAIN_PORT}").parse().unwrap();

    // 1. A's app, knowing nothing of the mesh, asks B's IP:port in plain HTTP.
    let answer = exchange(pod_a.socket(), app_addr, &get("pod-b"))
        .await
        .expect("connect from pod A");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n--- agent A:\n{}\n--- agent B:\n{}",
        agent_a.transcript(),
        agent_b.transcript()
    );
    assert!(answer.ends_with("pod-b-app"), "{answer}");
    assert_one_request_from_web_at_orders(
        &seen,
        "B's app got no XFCC: the request did not cross mTLS",
    );
    // A's agent tunnelled it (HTTP/1.1 detected), not passed it through.
    agent_a
        .wait_for(&["mTLS tunnel established", &app_addr.to_string(), "http/1.1"])
        .await;

    // 2. Plaintext that bypasses A's capture (the proxy UID is exempt) lands
    //    on B's agent, which demands mTLS: no answer from B's app. Had the
    //    bypass failed, A's agent would have meshed it and B's app answered.
    let bypass = exchange(pod_a.socket_as(PROXY_UID), app_addr, &get("pod-b")).await;
    let bypass = bypass.unwrap_or_default();
    assert!(
        !bypass.starts_with(b"HTTP/"),
        "plaintext got an answer: {}",
        String::from_utf8_lossy(&bypass)
    );
    assert_eq!(seen.lock().len(), 1, "plaintext reached B's app");
    // And it was B's agent that turned it away (not, say, a routing failure).
    agent_b
        .wait_for(&["inbound handshake", &format!("peer={POD_A}:")])
        .await;

    // 3. Unmatched destination (passthrough, the default): plain TCP,
    //    straight to B's unmeshed port, through A's agent.
    let answer = exchange(pod_a.socket(), plain_addr, b"hi").await.unwrap();
    assert_eq!(answer, b"plain:hi");
    assert_eq!(plain_peers.lock().len(), 1);
    assert_eq!(plain_peers.lock()[0].ip().to_string(), POD_A);
    agent_a
        .wait_for(&["plain TCP passthrough", &plain_addr.to_string()])
        .await;

    // 4. The same under `--outbound-unmatched deny`: refused, never connected.
    drop(agent_a);
    let mut agent_a = start_agent(
        &pod_a,
        dir.path(),
        "a",
        &["--mesh-destination", &mesh, "--outbound-unmatched", "deny"],
    )
    .await;
    let refused = exchange(pod_a.socket(), plain_addr, b"hi").await;
    assert_eq!(
        refused.unwrap_or_default(),
        b"",
        "a denied destination answered"
    );
    agent_a
        .wait_for(&["--outbound-unmatched is deny", &plain_addr.to_string()])
        .await;
    assert_eq!(
        plain_peers.lock().len(),
        1,
        "the denied connection was made"
    );

    // The meshed destination still works under deny.
    let answer = exchange(pod_a.socket(), app_addr, &get("pod-b"))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).ends_with("pod-b-app"));
    assert_eq!(seen.lock().len(), 2);
    drop(agent_b);
}

/// Some other workload of the mesh.
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_meshes_what_discovery_pins() {
    if !netns_or_skip() {
        return;
    }
    let (pod_a, pod_b) = pods();
    let dir = tempfile::tempdir().unwrap();
    let op = FakeOperator::new(
        TestCa::new("mesh root"),
        Duration::from_secs(3600),
        &[("tok-web", WEB)],
    );
    // B's certificate and policy from files, of the operator's CA.
    write_files(dir.path(), &op.ca);
    let token = dir.path().join("a.token");
    std::fs::write(&token, "tok-web\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();

    pod_a.agent_init(&["--pod-ip", POD_A]);
    pod_b.agent_init(&["--pod-ip", POD_B]);
    let seen = serve_app(pod_b.listen(&format!("0.0.0.0:{APP_PORT}")));
    let policy = dir.path().join("b.pb");
    let agent_b = start_agent(
        &pod_b,
        dir.path(),
        "b",
        &["--policy-file", policy.to_str().unwrap()],
    )
    .await;

    // The operator listens on pod A's loopback: A's agent (UID 2137) reaches
    // it uncaptured. Its first table does not cover B.
    let (discovery, mut heard) = FakeDiscovery::new();
    let b_net = format!("{POD_B}/32");
    discovery.push_destinations(mesh_destinations("d0", &[("10.79.0.99/32", 0, ORDERS)]));
    let operator = op.serve_with_discovery(&discovery, pod_a.listen("127.0.0.1:0"));

    // A: transparent, deny unmatched, no --mesh-destination, identity and
    // destinations from the operator.
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "--transparent", "--outbound-unmatched", "deny"])
        .args([
            "--operator",
            &operator.to_string(),
            "--operator-id",
            OPERATOR,
        ])
        .arg("--token-file")
        .arg(&token)
        .arg("--trust-bundle")
        .arg(dir.path().join("ca.pem"))
        .args(["--admin", ""])
        .env_remove("POD_IP");
    let mut agent_a = spawn_agent(&pod_a, "a", cmd).await;
    agent_a
        .wait_for(&["mesh destinations applied", "version=d0", "entries=1"])
        .await;
    let app_addr: SocketAddr = format!("{POD_B}:{APP_PORT}").parse().unwrap();

    // 1. Nothing says B is meshed: under deny A's request is refused.
    let refused = exchange(pod_a.socket(), app_addr, &get("pod-b")).await;
    assert_eq!(
        String::from_utf8_lossy(&refused.unwrap_or_default()),
        "",
        "an unmeshed destination answered under deny"
    );
    agent_a
        .wait_for(&["--outbound-unmatched is deny", &app_addr.to_string()])
        .await;
    assert!(seen.lock().is_empty(), "B's app saw a denied request");

    // 2. Discovery pins B (every port) to orders, which B's agent is: the
    //    same plain request is tunnelled over mTLS and answered.
    discovery.push_destinations(mesh_destinations("d1", &[(&b_net, 0, ORDERS)]));
    agent_a
        .wait_for(&["mesh destinations applied", "version=d1", "entries=1"])
        .await;
    let answer = exchange(pod_a.socket(), app_addr, &get("pod-b"))
        .await
        .expect("connect from pod A");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("pod-b-app"),
        "{answer}\n--- agent A:\n{}\n--- agent B:\n{}",
        agent_a.transcript(),
        agent_b.transcript()
    );
    assert_one_request_from_web_at_orders(
        &seen,
        "B's app got no XFCC: the request did not cross mTLS",
    );
    agent_a
        .wait_for(&["mTLS tunnel established", &app_addr.to_string(), "http/1.1"])
        .await;

    // 3. Discovery now says payments is at B: B's agent presents orders, so
    //    A's agent refuses the handshake and B's app sees nothing new.
    discovery.push_destinations(mesh_destinations("d2", &[(&b_net, 0, PAYMENTS)]));
    agent_a
        .wait_for(&["mesh destinations applied", "version=d2", "entries=1"])
        .await;
    let refused = exchange(pod_a.socket(), app_addr, &get("pod-b")).await;
    assert_eq!(
        String::from_utf8_lossy(&refused.unwrap_or_default()),
        "",
        "a destination of the wrong identity answered"
    );
    agent_a
        .wait_for(&["mTLS handshake failed", &app_addr.to_string(), PAYMENTS])
        .await;
    assert_eq!(seen.lock().len(), 1, "B's app saw the mis-pinned request");
    // One stream throughout: the pushes were live, not a reconnect's replay.
    let mut subscribes = 0;
    while let Ok(event) = heard.try_recv() {
        subscribes += usize::from(matches!(event, Seen::Subscribe { .. }));
    }
    assert_eq!(subscribes, 1);
    drop(agent_a);
    drop(agent_b);
}
