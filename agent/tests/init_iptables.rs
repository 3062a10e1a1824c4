//! `palisade-agent init` as a process, against the real iptables, inside a
//! network namespace the test creates (and deletes, even on failure): the
//! rules it installs, that a second run changes nothing, that `--cleanup`
//! removes everything, and that inbound TCP really lands on 15006.
//!
//! Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), `ip` (iproute2), `iptables`
//! and, for the traffic test, `python3`; `scripts/test` installs them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::AGENT;
use common::netns::{Netns, run, veth_pair};

impl Netns {
    /// `iptables-save -t nat` without its `#` lines (they carry a timestamp).
    fn nat_rules(&self) -> String {
        let out = run(self.exec("iptables-save").args(["-t", "nat"]));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

/// A process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn assert_has(rules: &str, line: &str) {
    assert!(
        rules.lines().any(|l| l == line),
        "missing rule {line:?} in:\n{rules}"
    );
}

fn count(rules: &str, line: &str) -> usize {
    rules.lines().filter(|l| *l == line).count()
}

#[test]
fn init_installs_is_idempotent_and_cleans_up() {
    let ns = Netns::new("test-rules");
    let before = ns.nat_rules();
    let args = [
        "--exclude-inbound-ports",
        "22,8443",
        "--exclude-outbound-ports",
        "5432",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,169.254.169.254",
    ];
    ns.agent_init(&args);
    let first = ns.nat_rules();
    for chain in [
        "PALISADE_INBOUND",
        "PALISADE_REDIRECT_IN",
        "PALISADE_OUTPUT",
        "PALISADE_REDIRECT_OUT",
    ] {
        assert_has(&first, &format!(":{chain} - [0:0]"));
    }
    for line in [
        "-A PREROUTING -p tcp -j PALISADE_INBOUND",
        "-A OUTPUT -p tcp -j PALISADE_OUTPUT",
        "-A PALISADE_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006",
        "-A PALISADE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001",
        "-A PALISADE_OUTPUT -p tcp -m owner --uid-owner 2137 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 8443 -j RETURN",
        "-A PALISADE_INBOUND -p tcp -j PALISADE_REDIRECT_IN",
        "-A PALISADE_OUTPUT -d 127.0.0.1/32 -p tcp -j RETURN",
        "-A PALISADE_OUTPUT -o lo -p tcp -j RETURN",
        "-A PALISADE_OUTPUT -d 10.96.0.0/12 -p tcp -j RETURN",
        "-A PALISADE_OUTPUT -d 169.254.169.254/32 -p tcp -j RETURN",
        "-A PALISADE_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A PALISADE_OUTPUT -p tcp -j PALISADE_REDIRECT_OUT",
    ] {
        assert_has(&first, line);
    }

    // Idempotent: the second run leaves the ruleset byte-identical.
    ns.agent_init(&args);
    assert_eq!(ns.nat_rules(), first, "second init changed the ruleset");

    // A changed config replaces our rules; the jumps stay single.
    ns.agent_init(&["--exclude-inbound-ports", "2222"]);
    let changed = ns.nat_rules();
    assert_has(
        &changed,
        "-A PALISADE_INBOUND -p tcp -m tcp --dport 2222 -j RETURN",
    );
    assert!(!changed.contains("--dport 22 "), "{changed}");
    assert!(!changed.contains("10.96.0.0/12"), "{changed}");
    assert_eq!(
        count(&changed, "-A PREROUTING -p tcp -j PALISADE_INBOUND"),
        1
    );
    assert_eq!(count(&changed, "-A OUTPUT -p tcp -j PALISADE_OUTPUT"), 1);

    // Cleanup removes everything (and is itself safe to repeat).
    ns.agent_init(&["--cleanup"]);
    let cleaned = ns.nat_rules();
    assert!(!cleaned.contains("PALISADE"), "{cleaned}");
    assert_eq!(cleaned, before);
    ns.agent_init(&["--cleanup"]);
    assert_eq!(ns.nat_rules(), before);
}

#[test]
fn inbound_tcp_is_redirected_to_15006_except_excluded_ports() {
    let (pod, client) = veth_pair("test", "10.77.0.1", "10.77.0.2");

    pod.agent_init(&["--exclude-inbound-ports", "9999"]);

    // The "agent": a one-shot listener on 15006 in the pod namespace.
    let listener = pod
        .exec("python3")
        .args([
            "-c",
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 15006))\n\
             s.listen(4)\n\
             print('ready', flush=True)\n\
             c, _ = s.accept()\n\
             c.sendall(b'captured-by-15006')\n\
             c.close()\n",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the traffic test");
    let mut listener = Killed(listener);
    let mut ready = String::new();
    BufReader::new(listener.0.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");

    let connect = |port: u16| {
        client
            .exec("python3")
            .args([
                "-c",
                &format!(
                    "import socket\n\
                     try:\n    s = socket.create_connection(('10.77.0.1', {port}), timeout=5)\n\
                     except OSError as e:\n    print('error', type(e).__name__); raise SystemExit\n\
                     print(s.recv(64).decode())\n"
                ),
            ])
            .output()
            .unwrap()
    };
    // Excluded: nothing listens on 9999, so the connection is refused.
    let refused = connect(9999);
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout).trim(),
        "error ConnectionRefusedError"
    );
    // Captured: nothing listens on 8080 either, but the connection lands on 15006.
    let captured = connect(8080);
    assert_eq!(
        String::from_utf8_lossy(&captured.stdout).trim(),
        "captured-by-15006",
        "stderr: {}",
        String::from_utf8_lossy(&captured.stderr)
    );
}

#[test]
fn dry_run_prints_commands_without_running_iptables() {
    let out = run(Command::new(AGENT).args([
        "init",
        "--dry-run",
        "--iptables",
        "/nonexistent/iptables",
        "--exclude-outbound-cidrs",
        "10.1.2.3/8",
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("iptables -t nat -N PALISADE_INBOUND"),
        "{text}"
    );
    assert!(
        text.contains(
            "iptables -t nat -A PALISADE_REDIRECT_IN -p tcp -j REDIRECT --to-ports 15006"
        ),
        "{text}"
    );
    assert!(
        text.contains("iptables -t nat -A PALISADE_OUTPUT -p tcp -d 10.0.0.0/8 -j RETURN"),
        "{text}"
    );
    let cleanup = run(Command::new(AGENT).args(["init", "--cleanup", "--dry-run"]));
    assert!(String::from_utf8_lossy(&cleanup.stdout).contains("-X PALISADE_OUTPUT"));
}

#[test]
fn missing_iptables_is_a_clear_error() {
    let out = Command::new(AGENT)
        .args(["init", "--iptables", "/nonexistent/iptables"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/iptables` not found") && stderr.contains("iptables"),
        "{stderr}"
    );
}
