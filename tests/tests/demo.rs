//! `palisadectl demo` (issue 12): the real binary runs the whole local mesh
//! (operator, collector, agents as processes) and its scripted scenarios.
//!
//! - As shipped, every scenario holds: exit 0, one ✓ line per scenario.
//! - With the orders policy broken on purpose (plaintext callers let in),
//!   the demo exits 1 and its ✗ line and summary name the scenario that
//!   caught it, while the others still pass.
//! - Either way no process of the demo is left running (found by its state
//!   directory on their command lines).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use palisade_e2e::{Proc, workspace_bin};

/// The scenarios, in the order the demo prints them.
const SCENARIOS: [&str; 13] = [
    "mTLS between services (HTTP)",
    "mTLS between services (gRPC)",
    "caller without a mesh identity refused",
    "JWT roles",
    "partner API key rate limit",
    "body validation",
    "response masking",
    "deprecated route",
    "path trick refused",
    "audit-mode policy",
    "audit trail in the collector",
    "alert on a denial burst",
    "metrics",
];

/// Runs the demo with its state in `state`; exit code and output lines.
async fn run_demo(state: &Path, extra: &[&str]) -> (i32, Vec<String>) {
    let mut cmd = Command::new(workspace_bin("palisadectl"));
    cmd.arg("demo")
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env_remove("PALISADE_DEMO_POLICIES");
    let mut proc = Proc::spawn("palisadectl demo", cmd);
    let status = proc
        .wait_exit(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("the demo did not finish:\n{}", proc.transcript()));
    // Let the output readers drain.
    let _ = proc
        .wait_for_line(Duration::from_secs(5), |l| l.starts_with("demo "))
        .await;
    let lines = proc.lines_matching(|_| true);
    (status.code().unwrap_or(-1), lines)
}

/// Pids of processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(&needle) {
            found.push(format!("{name}: {text}"));
        }
    }
    found
}

fn line_of<'a>(lines: &'a [String], mark: &str, scenario: &str) -> Option<&'a String> {
    lines
        .iter()
        .find(|l| l.starts_with(&format!("{mark} {scenario}: ")))
}

#[tokio::test]
async fn the_demo_passes_every_scenario_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, lines) = run_demo(&state, &[]).await;
    let text = lines.join("\n");
    assert_eq!(code, 0, "{text}");
    for scenario in SCENARIOS {
        assert!(
            line_of(&lines, "✓", scenario).is_some(),
            "no ✓ line for {scenario:?}:\n{text}"
        );
    }
    assert!(!text.contains("✗"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l == "demo passed: 13 of 13 scenarios as expected"),
        "{text}"
    );
    // What the lines claim was checked against the real store: the
    // collector's database has the denials and the alert.
    let db = rusqlite::Connection::open(state.join("audit.db")).unwrap();
    let alerts: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'alert'",
            [],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("audit.db: {e}"));
    assert!(alerts >= 1, "no alert stored");
    let left = processes_mentioning(&state);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

#[tokio::test]
async fn a_policy_that_lets_unauthenticated_callers_in_fails_the_demo_naming_the_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/policies");
    for entry in std::fs::read_dir(&shipped).unwrap().flatten() {
        std::fs::copy(entry.path(), policies.join(entry.file_name())).unwrap();
    }
    // The mistake: plaintext allowed, and the orders route open to anyone.
    let orders = policies.join("orders.yaml");
    let text = std::fs::read_to_string(&orders).unwrap();
    let broken = text
        .replacen("\n  mtls: strict\n", "\n  mtls: permissive\n", 1)
        .replacen(
            "      allow:\n        - name: shop-services\n",
            "      allow:\n        - name: anyone\n        - name: shop-services\n",
            1,
        );
    assert_ne!(broken, text);
    assert!(broken.contains("mtls: permissive") && broken.contains("- name: anyone"));
    std::fs::write(&orders, broken).unwrap();

    let state = dir.path().join("state");
    let policies_arg = policies.to_string_lossy().into_owned();
    let (code, lines) = run_demo(&state, &["--policies", &policies_arg]).await;
    let text = lines.join("\n");
    assert_eq!(code, 1, "{text}");
    let failed = line_of(&lines, "✗", "caller without a mesh identity refused")
        .unwrap_or_else(|| panic!("no ✗ line for the unauthenticated caller:\n{text}"));
    assert!(failed.contains("200"), "{failed}");
    assert!(
        lines.iter().any(|l| l
            == "demo FAILED: 1 of 13 scenarios not as expected: caller without a mesh identity refused"),
        "{text}"
    );
    // Only that scenario broke.
    for scenario in SCENARIOS
        .iter()
        .filter(|s| **s != "caller without a mesh identity refused")
    {
        assert!(
            line_of(&lines, "✓", scenario).is_some(),
            "{scenario:?} should still pass:\n{text}"
        );
    }
    let left = processes_mentioning(&state);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

/// The demo in a real terminal (tmux), read off the screen as a person
/// sees it: every scenario line with its ✓, no spinner left over, the
/// summary, exit status 0.
#[tokio::test]
async fn the_demo_reads_right_in_a_terminal() {
    let socket = format!("palisade-demo-{}", std::process::id());
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["-L", &self.0, "kill-server"])
                .output();
        }
    }
    let _kill = Kill(socket.clone());
    let command = format!(
        "{} demo; echo EXIT=$?; sleep 60",
        workspace_bin("palisadectl").display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "250",
        "-y",
        "80",
        &command,
    ]);
    let screen = palisade_e2e::poll_until(
        Duration::from_secs(120),
        || async {
            let screen = tmux(&["capture-pane", "-p", "-t", "t", "-S", "-200"]);
            if screen.contains("EXIT=") {
                Ok(screen)
            } else {
                Err(screen)
            }
        },
        |screen| format!("the demo did not finish on screen:\n{screen}"),
    )
    .await;
    let lines: Vec<&str> = screen.lines().collect();
    for scenario in SCENARIOS {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("✓ {scenario}: "))),
            "no ✓ {scenario:?} on screen:\n{screen}"
        );
    }
    assert!(
        lines.contains(&"demo passed: 13 of 13 scenarios as expected"),
        "{screen}"
    );
    assert!(screen.contains("EXIT=0"), "{screen}");
    // Spinner frames are erased when their step ends.
    assert!(!screen.contains("starting the"), "{screen}");
    assert!(!screen.contains('✗'), "{screen}");
}
