//! `palisade-agent identity` and `palisade-operator serve` as real processes:
//! the agent's admin endpoint reports readiness, expiry and renewals as the
//! operator appears, issues 3-second certificates, and disappears.

use std::process::Command;
use std::time::{Duration, Instant};

use palisade_e2e::{
    OPERATOR_ID, Operator, Proc, ca_init, free_port, http_get, metric, poll_until, within,
    workspace_bin, write_tokens,
};

const READY: &str = "palisade_identity_ready";
const EXPIRY: &str = "palisade_identity_certificate_expiry_seconds";
const RENEWALS: &str = "palisade_identity_renewals_total";
const FAILURES: &str = "palisade_identity_renewal_failures_total";

struct Metrics {
    text: String,
}

impl Metrics {
    fn get(&self, name: &str) -> Option<f64> {
        metric(&self.text, name)
    }
    fn req(&self, name: &str) -> f64 {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} sample in:\n{}", self.text))
    }
}

async fn metrics(admin: std::net::SocketAddr) -> Metrics {
    let (status, text) = http_get(admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    Metrics { text }
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    http_get(admin, "/readyz").await.expect("GET /readyz").0
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what`
/// and the agent's output.
async fn eventually<T, F, Fut>(agent: &Proc, timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until(
        timeout,
        || {
            let check = check();
            async move { check.await.ok_or(()) }
        },
        |()| {
            format!(
                "{what}: not within {timeout:?}. Agent output:\n{}",
                agent.transcript()
            )
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_follow_the_real_operator() {
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The CA exists before the operator serves, so the agent can be given the bundle.
    let bundle = ca_init(&state);
    let tokens = dir.path().join("tokens");
    write_tokens(
        &tokens,
        &[("e2e-web-token-0123456789abcdef", "shop", "web")],
    );
    let agent_token = dir.path().join("agent-token");
    std::fs::write(&agent_token, "e2e-web-token-0123456789abcdef\n").unwrap();

    // Nothing listens on the operator's port yet.
    let operator_addr = free_port();
    let admin = free_port();
    let mut cmd = Command::new(workspace_bin("palisade-agent"));
    cmd.arg("identity")
        .arg("--operator")
        .arg(operator_addr.to_string())
        .arg("--token-file")
        .arg(&agent_token)
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--operator-id")
        .arg(OPERATOR_ID)
        .arg("--admin")
        .arg(admin.to_string())
        .env("RUST_LOG", "info");
    let mut agent = Proc::spawn("palisade-agent", cmd);
    agent
        .wait_for_line(Duration::from_secs(20), |l| {
            l.contains("admin endpoint listening")
        })
        .await
        .unwrap();

    // --- No operator: alive, not ready, retrying. ---
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    let before = eventually(
        &agent,
        Duration::from_secs(10),
        "two failed attempts",
        || async move {
            let m = metrics(admin).await;
            (m.req(FAILURES) >= 2.0).then_some(m)
        },
    )
    .await;
    assert_eq!(before.req(READY), 0.0);
    assert_eq!(before.req(RENEWALS), 0.0);
    assert_eq!(before.get(EXPIRY), None, "no certificate, no expiry sample");
    assert_eq!(readyz(admin).await, 503);
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);

    // --- The operator comes up on that port. ---
    let mut operator = Operator::start(&state, &tokens, operator_addr, "3s").await;
    assert_eq!(operator.addr, operator_addr);
    assert_eq!(
        std::fs::read(&operator.bundle).unwrap(),
        std::fs::read(&bundle).unwrap(),
        "serve must load the CA ca init created"
    );
    // Backoff after two failures is at most 4 s, plus jitter and start-up.
    eventually(
        &agent,
        Duration::from_secs(15),
        "readyz 200",
        || async move { (readyz(admin).await == 200).then_some(()) },
    )
    .await;
    let m = metrics(admin).await;
    assert_eq!(m.req(READY), 1.0);
    let left = m.req(EXPIRY);
    assert!(left > 0.0 && left <= 3.0, "expiry {left} not in (0, 3]");
    assert!(m.req(RENEWALS) >= 1.0);

    // --- It keeps renewing; the gauge stays within the 3 s lifetime. ---
    let renewed = eventually(
        &agent,
        Duration::from_secs(10),
        "two renewals",
        || async move {
            let m = metrics(admin).await;
            let left = m.req(EXPIRY);
            assert!(left > 0.0 && left <= 3.0, "expiry {left} not in (0, 3]");
            assert_eq!(m.req(READY), 1.0);
            (m.req(RENEWALS) >= 2.0).then_some(m)
        },
    )
    .await;
    let installed = agent.lines_matching(|l| {
        l.contains("workload certificate installed")
            && l.contains("spiffe://cluster.local/ns/shop/sa/web")
    });
    assert!(installed.len() >= 2, "{installed:#?}");
    let failures_up = renewed.req(FAILURES);

    // --- The operator dies: the still-valid certificate keeps serving. ---
    operator.proc.kill();
    let killed_at = Instant::now();
    let m = metrics(admin).await;
    let left = m.req(EXPIRY);
    assert_eq!(m.req(READY), 1.0, "{}", m.text);
    assert!(left > 0.0, "{left}");
    let failures_at_kill = m.req(FAILURES);

    // Poll until not ready; record the last time it was ready.
    let mut last_ready = killed_at;
    let flipped = loop {
        match readyz(admin).await {
            200 => last_ready = Instant::now(),
            503 => break Instant::now(),
            other => panic!("readyz {other}"),
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "still ready 10 s after the operator died:\n{}",
            agent.transcript()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // It stayed ready as long as the certificate was valid (minus polling slack)…
    let valid_for = Duration::from_secs_f64(left);
    assert!(
        last_ready + Duration::from_millis(600) >= killed_at + valid_for,
        "not ready {:?} after the kill, but the certificate had {left:.3} s left",
        last_ready - killed_at
    );
    // …and no longer than that.
    assert!(
        flipped <= killed_at + valid_for + Duration::from_millis(1500),
        "still ready {:?} after the kill, certificate had {left:.3} s left",
        flipped - killed_at
    );

    let after = eventually(
        &agent,
        Duration::from_secs(10),
        "more failures",
        || async move {
            let m = metrics(admin).await;
            (m.req(FAILURES) > failures_at_kill).then_some(m)
        },
    )
    .await;
    assert_eq!(after.req(READY), 0.0);
    assert!(after.req(EXPIRY) <= 0.0, "{}", after.text);
    assert!(after.req(FAILURES) > failures_up);
    // Still alive, and the operator's absence is logged.
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    assert!(
        !agent
            .lines_matching(|l| l.contains("certificate renewal failed"))
            .is_empty(),
        "{}",
        agent.transcript()
    );
    // The token never shows up in the agent's output.
    assert!(
        agent
            .lines_matching(|l| l.contains("e2e-web-token"))
            .is_empty()
    );
}
