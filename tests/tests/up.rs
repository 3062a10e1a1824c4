//! `palisadectl up examples/quickstart` (issue 12): the real binaries, the
//! example's own mesh.yaml and policies (copied, so the test can edit them).
//!
//! - The three services answer through their agents: a plaintext request to
//!   the frontend's agent, the frontend app calling orders (HTTP) and
//!   inventory (gRPC) through its own agent over mTLS, each callee seeing
//!   the frontend's identity.
//! - A policy edit changes a decision while everything runs.
//! - SIGINT stops every process `up` started: each pid it reported is gone.
//! - Under tmux, as a person sees it: the status table, then Ctrl-C typed
//!   into the terminal, then the stop line and exit status 0.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use palisade_e2e::{Proc, http_get, poll_until, workspace_bin};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

/// `examples/quickstart` copied into `to` (without any `.palisade` state).
fn copy_quickstart(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    std::fs::create_dir_all(to.join("policies")).unwrap();
    std::fs::copy(from.join("mesh.yaml"), to.join("mesh.yaml")).unwrap();
    for entry in std::fs::read_dir(from.join("policies")).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join("policies").join(entry.file_name())).unwrap();
    }
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn up_serves_the_quickstart_applies_a_policy_edit_and_stops_everything_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_dir = dir.path().join("quickstart");
    copy_quickstart(&mesh_dir);
    let mut cmd = Command::new(workspace_bin("palisadectl"));
    cmd.arg("up")
        .arg(&mesh_dir)
        .args(["--free-ports", "--output", "json"]);
    let mut up = Proc::spawn("palisadectl up", cmd);
    let line = up
        .wait_for_line(Duration::from_secs(60), |l| {
            l.starts_with('{') && l.contains("\"services\":")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status: serde_json::Value = serde_json::from_str(&line).unwrap();
    let services = status["services"].as_array().unwrap();
    assert_eq!(services.len(), 3, "{status}");
    for s in services {
        assert_eq!(s["ready"], true, "{s}");
        assert!(!s["policy_version"].as_str().unwrap().is_empty(), "{s}");
        assert!(s["cert_not_after"].as_i64().unwrap() > 0, "{s}");
        let name = s["service"].as_str().unwrap();
        assert_eq!(
            s["identity"],
            format!("spiffe://cluster.local/ns/shop/sa/{name}"),
            "{s}"
        );
    }
    let frontend = services
        .iter()
        .find(|s| s["service"] == "frontend")
        .unwrap();
    let entry: std::net::SocketAddr = frontend["listen"].as_str().unwrap().parse().unwrap();

    // Through the agents: frontend → orders (HTTP) and → inventory (gRPC).
    let (code, body) = http_get(entry, "/call/orders/orders/1001").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let order: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(order["served_by"], "orders", "{body}");
    assert_eq!(order["caller"], FRONTEND, "{body}");
    let (code, body) = http_get(entry, "/items/A-1").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let item: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(item["inventory_saw"], FRONTEND, "{body}");
    let (code, body) = http_get(entry, "/call/orders/admin/x").await.unwrap();
    assert_eq!(code, 403, "the orders policy denies /admin: {body}");

    // A live edit: orders no longer lets the frontend read.
    let policy = mesh_dir.join("policies/orders.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let edited = text.replace("ns/shop/sa/frontend\"", "ns/shop/sa/checkout\"");
    assert_ne!(edited, text);
    std::fs::write(&policy, edited).unwrap();
    poll_until(
        Duration::from_secs(20),
        || async {
            match http_get(entry, "/call/orders/orders/1001").await {
                Ok((403, _)) => Ok(()),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(e) => Err(e.to_string()),
            }
        },
        |last| format!("the edit did not take effect; last answer {last}"),
    )
    .await;
    up.wait_for_line(Duration::from_secs(5), |l| {
        l.contains("\"event\":\"policy\"") && l.contains("\"service\":\"orders\"")
    })
    .await
    .unwrap_or_else(|e| panic!("no policy event line: {e}"));

    // SIGINT: every process up started is gone when it returns.
    let pids: Vec<u64> = status["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        8,
        "operator, collector, 3 agents, 3 apps: {status}"
    );
    for pid in &pids {
        assert!(alive(*pid), "pid {pid} is not running before SIGINT");
    }
    let sent = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exit = up
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("up did not stop on SIGINT:\n{}", up.transcript()));
    assert!(exit.success(), "{exit}: {}", up.transcript());
    let left: Vec<&u64> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after SIGINT: {left:?}");
}

/// tmux on a private socket, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        Self {
            socket: format!("palisade-e2e-{}-{}", std::process::id(), rand_suffix()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (install it: apt-get install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn wait_screen(tmux: &Tmux, what: &str, pred: impl Fn(&str) -> bool) -> String {
    poll_until(
        Duration::from_secs(60),
        || async {
            let screen = tmux.screen();
            if pred(&screen) {
                Ok(screen)
            } else {
                Err(screen)
            }
        },
        |screen| format!("the screen never showed {what}:\n{screen}"),
    )
    .await
}

#[tokio::test]
async fn up_in_a_terminal_shows_the_table_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_dir = dir.path().join("quickstart");
    copy_quickstart(&mesh_dir);
    let tmux = Tmux::new();
    let command = format!(
        "{} up {} --free-ports; echo EXIT=$?; sleep 60",
        workspace_bin("palisadectl").display(),
        mesh_dir.display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "220",
        "-y",
        "50",
        &command,
    ]);
    let screen = wait_screen(&tmux, "the status table", |s| {
        s.contains("Ctrl-C stops everything")
    })
    .await;
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("SERVICE "))
        .unwrap_or_else(|| panic!("no table header:\n{screen}"));
    for (i, name) in ["frontend", "orders", "inventory"].iter().enumerate() {
        let row = lines[header + 1 + i];
        assert!(row.starts_with(name), "row {i}: {row:?}\n{screen}");
        assert!(
            row.contains(&format!("spiffe://cluster.local/ns/shop/sa/{name}")),
            "{row}"
        );
        assert!(row.contains(" yes "), "not ready: {row}");
    }
    for step in [
        "✓ operator:",
        "✓ collector:",
        "✓ 3 agents ready",
        "✓ 3 apps listening",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(step)),
            "no {step:?} line:\n{screen}"
        );
    }
    // A spinner leaves nothing behind once its step is done.
    assert!(!screen.contains("starting "), "{screen}");

    tmux.run(&["send-keys", "-t", "t", "C-c"]);
    let screen = wait_screen(&tmux, "the exit status", |s| s.contains("EXIT=")).await;
    assert!(screen.contains("✓ stopped 8 processes"), "{screen}");
    assert!(screen.contains("EXIT=0"), "{screen}");
}
