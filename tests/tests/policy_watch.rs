//! Policy distribution end to end (DESIGN §5, §9): the real
//! `palisade-operator serve --source dir:` and the real `palisade-agent run
//! --operator … --inbound …` in front of a recording backend; an mTLS client
//! with a certificate from the same operator. Editing the YAML changes what
//! the agent enforces, with nothing restarted.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{Empty, Full};
use hyper::body::Bytes;
use palisade_agent::identity::{CertStore, IdentityClient, IdentityClientConfig, TokenSource};
use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
use palisade_e2e::{
    AppHttp, OPERATOR_ID, Operator, Proc, TRUST_DOMAIN, ca_init, dir_source_flags, free_port,
    h2_connect, poll_until, serve_app, within, workspace_bin, write_tokens,
};
use palisade_policy::identity::SpiffeId;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS_TOKEN: &str = "e2e-orders-token-7f3a9c1e5b2d8046";
const WEB_TOKEN: &str = "e2e-web-token-2b8e6d0f4a1c9735";
/// Each wait gives up after this long.
const STEP: Duration = Duration::from_secs(15);

fn policy(orders_rule: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {{name: orders, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  routes:
    - name: list-orders
      match:
        path: {{prefix: /orders}}
        methods: [GET]
      {orders_rule}: [{{principals: ["{WEB}"]}}]
    - name: health
      match:
        path: {{exact: /healthz}}
      allow: [{{principals: ["{WEB}"]}}]
"#
    )
}

/// Write-then-rename, so the operator's poller never reads half a file.
fn write_policy(dir: &Path, text: &str) {
    let tmp = dir.join(".orders.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("orders.yaml")).unwrap();
}

/// The app: answers 200 and records the path of every request it receives.
async fn backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    // HTTP/1.1 or h2c: whichever the agent forwards with.
    let addr = serve_app(
        AppHttp::Auto,
        seen.clone(),
        |record: Arc<Mutex<Vec<String>>>, req| {
            record.lock().unwrap().push(req.uri().path().to_owned());
            async { hyper::Response::new(Full::new(Bytes::from("app"))) }
        },
    )
    .await;
    (addr, seen)
}

/// An mTLS client with the `web` identity, certified by the operator.
struct Client {
    trust: MeshTrust,
    store: Arc<CertStore>,
    agent: SocketAddr,
}

impl Client {
    async fn new(operator: SocketAddr, bundle: &Path, agent: SocketAddr) -> Self {
        let bundle = TrustBundle::from_pem_file(bundle).expect("bundle");
        let trust = MeshTrust::new(SharedTrustBundle::new(bundle), TRUST_DOMAIN).unwrap();
        let mut config =
            IdentityClientConfig::new(operator.to_string(), TokenSource::Static(WEB_TOKEN.into()));
        config.operator_id = Some(SpiffeId::parse(OPERATOR_ID).unwrap());
        let certified = IdentityClient::new(config, trust.clone())
            .unwrap()
            .certify()
            .await
            .expect("certificate for web");
        let store = Arc::new(CertStore::new());
        store.install(certified.cert);
        Self {
            trust,
            store,
            agent,
        }
    }

    /// GET `path` through the agent (a fresh connection); the status.
    async fn get(&self, path: &str) -> Result<u16, String> {
        let (mut send, _) = h2_connect(self.agent, &self.trust, self.store.clone(), ORDERS).await?;
        send.ready().await.map_err(|e| e.to_string())?;
        let req = hyper::Request::get(format!("http://orders.shop{path}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }

    /// Polls until GET `path` answers `status`.
    async fn eventually(&self, path: &str, status: u16, agent: &Proc, operator: &Proc) {
        poll_until(
            STEP,
            || async {
                match self.get(path).await {
                    Ok(got) if got == status => Ok(()),
                    got => Err(got),
                }
            },
            |got| {
                format!(
                    "GET {path}: wanted {status}, last {got:?}.\nAgent:\n{}\nOperator:\n{}",
                    agent.transcript(),
                    operator.transcript()
                )
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_yaml_changes_what_the_agent_enforces() {
    within(Duration::from_secs(60), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bundle = ca_init(&state);
    let tokens = dir.path().join("tokens");
    write_tokens(
        &tokens,
        &[(ORDERS_TOKEN, "shop", "orders"), (WEB_TOKEN, "shop", "web")],
    );
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write_policy(&policies, &policy("allow"));

    let Operator {
        proc: mut operator,
        addr: operator_addr,
        ..
    } = Operator::start_with(
        &state,
        &tokens,
        "127.0.0.1:0".parse().unwrap(),
        "24h",
        &dir_source_flags(&policies),
    )
    .await;

    let (app, seen) = backend().await;
    let agent_token = dir.path().join("agent-token");
    std::fs::write(&agent_token, format!("{ORDERS_TOKEN}\n")).unwrap();
    let inbound = free_port();
    let mut agent = agent_for(
        operator_addr,
        &bundle,
        &agent_token,
        inbound,
        app,
        "app=orders",
        "orders-0",
    );
    let applied = agent
        .wait_for_line(STEP, |l| l.contains("policy applied"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let client = Client::new(operator_addr, &bundle, inbound).await;
    // What the YAML says: web may GET /orders; nothing allows /admin.
    assert_eq!(
        client.get("/orders/17").await,
        Ok(200),
        "{applied}\n{}",
        agent.transcript()
    );
    assert_eq!(client.get("/admin").await, Ok(403));
    assert_eq!(client.get("/healthz").await, Ok(200));
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["/orders/17".to_owned(), "/healthz".to_owned()],
        "the denied request never reached the app"
    );

    // The operator ACK was recorded for this agent.
    operator
        .wait_for_line(STEP, |l| l.contains("agent enforces policy version (ACK)"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Rewrite the route to deny: the same request flips, nothing restarted.
    write_policy(&policies, &policy("deny"));
    client
        .eventually("/orders/17", 403, &agent, &operator)
        .await;
    let before = seen.lock().unwrap().len();
    assert_eq!(client.get("/orders/18").await, Ok(403));
    assert_eq!(client.get("/healthz").await, Ok(200));
    assert_eq!(seen.lock().unwrap()[before..], ["/healthz".to_owned()]);

    // A broken edit is rejected and the deny stays in force.
    write_policy(
        &policies,
        &policy("allow").replace("prefix: /orders", "prefix: orders"),
    );
    operator
        .wait_for_line(STEP, |l| l.contains("policy file rejected"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(client.get("/orders/19").await, Ok(403));

    // And back to allow.
    write_policy(&policies, &policy("allow"));
    client
        .eventually("/orders/20", 200, &agent, &operator)
        .await;
    // Three versions applied (allow, deny, allow); none refused.
    let deadline = Instant::now() + STEP;
    while agent.lines_matching(|l| l.contains("policy applied")).len() < 3 {
        assert!(Instant::now() < deadline, "{}", agent.transcript());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agent.lines_matching(|l| l.contains("policy applied")).len(),
        3
    );
    assert!(agent.lines_matching(|l| l.contains("NACK")).is_empty());
}

// --- pushes keep what did not change, and revoke what no longer holds -----

const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const DB_TOKEN: &str = "e2e-db-token-5c1d9e7a3f0b2468";

/// `orders` with a per-caller limit of 2 per hour on /limited (`amount`),
/// plus `extra` routes; `db` with its app port declared tcp and `db_rule`
/// (`allow` or `deny`) for web.
fn pushed_policies(amount: u32, extra: &str, db_port: u16, db_rule: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {{name: orders, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  routes:
    - name: limited
      match:
        path: {{prefix: /limited}}
      allow: [{{principals: ["{WEB}"]}}]
      rateLimit: {{amount: {amount}, period: 1h, key: principal}}{extra}
---
apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {{name: db, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  ports: [{{port: {db_port}, protocol: tcp}}]
  routes:
    - {db_rule}: [{{principals: ["{WEB}"]}}]
"#
    )
}

/// A TCP app that echoes every byte.
async fn echo_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn agent_for(
    operator: SocketAddr,
    bundle: &Path,
    token: &Path,
    listen: SocketAddr,
    app: SocketAddr,
    label: &str,
    name: &str,
) -> Proc {
    let mut cmd = Command::new(workspace_bin("palisade-agent"));
    cmd.arg("run")
        .arg("--inbound")
        .arg(format!("{listen}={app}"))
        .arg("--trust-bundle")
        .arg(bundle)
        .arg("--operator")
        .arg(operator.to_string())
        .arg("--token-file")
        .arg(token)
        .arg("--operator-id")
        .arg(OPERATOR_ID)
        .args(["--admin", ""])
        .args(["--label", label, "--pod-name", name])
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env("RUST_LOG", "info,palisade::audit=info");
    Proc::spawn(name, cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_keeps_unchanged_rate_limits_and_closes_tunnels_it_no_longer_allows() {
    within(Duration::from_secs(90), push_scenario()).await;
}

async fn push_scenario() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bundle = ca_init(&state);
    let tokens = dir.path().join("tokens");
    write_tokens(
        &tokens,
        &[
            (ORDERS_TOKEN, "shop", "orders"),
            (WEB_TOKEN, "shop", "web"),
            (DB_TOKEN, "shop", "db"),
        ],
    );
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let db_app = echo_app().await;
    write_policy(&policies, &pushed_policies(2, "", db_app.port(), "allow"));
    let Operator {
        proc: operator,
        addr: operator_addr,
        ..
    } = Operator::start_with(
        &state,
        &tokens,
        "127.0.0.1:0".parse().unwrap(),
        "24h",
        &dir_source_flags(&policies),
    )
    .await;

    let (app, seen) = backend().await;
    let orders_token = dir.path().join("orders-token");
    std::fs::write(&orders_token, format!("{ORDERS_TOKEN}\n")).unwrap();
    let db_token = dir.path().join("db-token");
    std::fs::write(&db_token, format!("{DB_TOKEN}\n")).unwrap();
    let (orders_addr, db_addr) = (free_port(), free_port());
    let mut orders = agent_for(
        operator_addr,
        &bundle,
        &orders_token,
        orders_addr,
        app,
        "app=orders",
        "orders-0",
    );
    let mut db = agent_for(
        operator_addr,
        &bundle,
        &db_token,
        db_addr,
        db_app,
        "app=db",
        "db-0",
    );
    for agent in [&mut orders, &mut db] {
        agent
            .wait_for_line(STEP, |l| l.contains("policy applied"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let client = Client::new(operator_addr, &bundle, orders_addr).await;

    // The budget of 2 is spent.
    assert_eq!(client.get("/limited/1").await, Ok(200));
    assert_eq!(client.get("/limited/2").await, Ok(200));
    assert_eq!(client.get("/limited/3").await, Ok(429));

    // An opaque tunnel to db, admitted.
    let config = client
        .trust
        .client_config(
            Some(client.store.clone()),
            Some(SpiffeId::parse(DB).unwrap()),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(db_addr).await.unwrap();
    let mut tunnel = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("mesh.invalid").unwrap(),
            tcp,
        )
        .await
        .expect("mTLS to db");
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(STEP, tunnel.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echo, b"ping");

    // Push: another route for orders (the limit unchanged), and db no
    // longer allows web.
    let extra = "\n    - name: other\n      match: {path: {prefix: /other}}\n      allow: [{principals: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]";
    write_policy(&policies, &pushed_policies(2, extra, db_app.port(), "deny"));
    client.eventually("/other", 200, &orders, &operator).await;
    // The spent budget stayed spent: a push is not a fresh start.
    assert_eq!(client.get("/limited/4").await, Ok(429));

    // The tunnel was closed by the new policy: its end arrives, and a
    // write after it never comes back.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, tunnel.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the revoked tunnel is still open");
    assert!(rest.is_empty(), "{rest:?}");
    let revoked = db
        .wait_for_line(STEP, |l| {
            l.contains("palisade::audit") && l.contains("tunnel.revoked")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", db.transcript()));
    assert!(revoked.contains(WEB), "{revoked}");

    // The limit's settings change: a new limit, a new budget.
    write_policy(&policies, &pushed_policies(3, extra, db_app.port(), "deny"));
    client
        .eventually("/limited/5", 200, &orders, &operator)
        .await;
    let limited: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.starts_with("/limited"))
        .cloned()
        .collect();
    assert_eq!(limited, ["/limited/1", "/limited/2", "/limited/5"]);
}
