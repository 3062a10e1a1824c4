//! Outbound identity pinning from discovery, end to end (DESIGN §6: the agent
//! "verifies the server's SPIFFE ID against what discovery says"): the real
//! `palisade-operator serve --source dir:` and three real agents.
//!
//! - `orders` listens on `0.0.0.0:PB` and advertises `127.0.0.2` (so
//!   `127.0.0.2:PB` is published as orders);
//! - `payments` runs `--transparent` advertising `127.0.0.3` (so every port of
//!   `127.0.0.3` is published as payments);
//! - `web` has two `--outbound` routes and no `--mesh-destination` flag: to
//!   `127.0.0.2:PB` and to `127.0.0.3:PB`. Both reach the orders agent (its
//!   listener is on every address), but discovery says the second must be
//!   payments, so web refuses it before the app sees a byte.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use palisade_e2e::{
    AppHttp, OPERATOR_ID, Operator, Proc, dir_source_flags, free_port, http_get, poll_until,
    serve_app, within, workspace_bin, write_tokens,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const TOKENS: [(&str, &str, &str); 3] = [
    ("e2e-orders-token-5c1d9a7e3b0f2468", "shop", "orders"),
    ("e2e-payments-token-8e2b4d6f0a1c3579", "shop", "payments"),
    ("e2e-web-token-1f3e5a7c9b2d4680", "shop", "web"),
];
const STEP: Duration = Duration::from_secs(20);

const POLICY: &str = r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  routes:
    - name: orders
      match:
        path: {prefix: /orders}
      allow: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
"#;

/// `palisade-agent run` with an operator-issued identity and policy stream.
fn agent(name: &str, dir: &Path, operator: &Operator, token: &str, mode_args: &[String]) -> Proc {
    let token_file = dir.join(format!("{name}-token"));
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut cmd = Command::new(workspace_bin("palisade-agent"));
    cmd.arg("run")
        .args(mode_args)
        .arg("--trust-bundle")
        .arg(&operator.bundle)
        .arg("--operator")
        .arg(operator.addr.to_string())
        .arg("--token-file")
        .arg(&token_file)
        .args(["--operator-id", OPERATOR_ID])
        .args(["--label", &format!("app={name}")])
        .env_remove("POD_IP")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env_remove("PALISADE_POLICY_FILE")
        .env("RUST_LOG", "info");
    Proc::spawn(name, cmd)
}

/// One HTTP/1.1 request over a plaintext connection to web's outbound
/// listener: the raw response, or what went wrong.
async fn get_through(listen: SocketAddr, path: &str) -> Result<String, String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(listen).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// web's discovered destination entries, from its `/config_dump`.
async fn discovered(admin: SocketAddr) -> Vec<String> {
    let Ok((200, body)) = http_get(admin, "/config_dump").await else {
        return Vec::new();
    };
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    dump.pointer("/mesh_destinations/discovery/entries")
        .and_then(|e| e.as_array())
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_pins_the_identity_discovery_publishes() {
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &TOKENS);
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("orders.yaml"), POLICY).unwrap();
    let operator = Operator::start_with(
        &state,
        &tokens,
        "127.0.0.1:0".parse().unwrap(),
        "24h",
        &dir_source_flags(&policies),
    )
    .await;

    // The app records the path and the client identity the agent vouches for.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = serve_app(
        AppHttp::Auto,
        seen.clone(),
        |seen: Arc<Mutex<Vec<String>>>, req| {
            let xfcc = req
                .headers()
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            seen.lock()
                .unwrap()
                .push(format!("{} {xfcc}", req.uri().path()));
            async { hyper::Response::new(Full::new(Bytes::from("orders app"))) }
        },
    )
    .await;

    let orders_port = free_port().port();
    let orders = agent(
        "orders",
        dir.path(),
        &operator,
        TOKENS[0].0,
        &[
            "--inbound".into(),
            format!("0.0.0.0:{orders_port}={app}"),
            "--advertise-address".into(),
            "127.0.0.2".into(),
            "--admin".into(),
            String::new(),
        ],
    );
    let payments = agent(
        "payments",
        dir.path(),
        &operator,
        TOKENS[1].0,
        &[
            "--transparent".into(),
            "--inbound-port".into(),
            free_port().port().to_string(),
            "--outbound-port".into(),
            free_port().port().to_string(),
            "--advertise-address".into(),
            "127.0.0.3".into(),
            "--admin".into(),
            String::new(),
        ],
    );
    let to_orders = free_port();
    let to_impostor = free_port();
    let web_admin = free_port();
    let mut web = agent(
        "web",
        dir.path(),
        &operator,
        TOKENS[2].0,
        &[
            "--outbound".into(),
            format!("{to_orders}=127.0.0.2:{orders_port}"),
            "--outbound".into(),
            format!("{to_impostor}=127.0.0.3:{orders_port}"),
            "--admin".into(),
            web_admin.to_string(),
        ],
    );

    // web learns both workloads' endpoints from the operator.
    let want_orders = format!(":{orders_port}={ORDERS}");
    let want_payments = format!("127.0.0.3/32={PAYMENTS}");
    let logs = |procs: &[&Proc]| {
        procs
            .iter()
            .map(|p| p.transcript())
            .collect::<Vec<_>>()
            .join("\n")
    };
    poll_until(
        STEP,
        || async {
            let entries = discovered(web_admin).await;
            let has = |want: &str| entries.iter().any(|e| e.contains(want));
            if has(&want_orders) && has(&want_payments) {
                Ok(())
            } else {
                Err(entries)
            }
        },
        |entries| {
            format!(
                "web's discovered destinations: {entries:?}\n{}",
                logs(&[&web, &orders, &payments, &operator.proc])
            )
        },
    )
    .await;

    // Pinned to orders, served by orders: the request reaches the app, which
    // sees web's identity in XFCC.
    poll_until(
        STEP,
        || async {
            match get_through(to_orders, "/orders/7").await {
                Ok(text) if text.starts_with("HTTP/1.1 200") => Ok(text),
                other => Err(other),
            }
        },
        |last| {
            format!(
                "GET through web to orders: {last:?}\n{}",
                logs(&[&web, &orders, &payments, &operator.proc])
            )
        },
    )
    .await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].starts_with("/orders/7 "), "{seen:?}");
        assert!(seen[0].contains(WEB), "XFCC names web: {seen:?}");
    }

    // Discovery says 127.0.0.3 is payments; the orders agent answers there:
    // web refuses the server, and the app sees nothing.
    let refused = get_through(to_impostor, "/orders/8").await;
    assert!(
        !refused
            .as_deref()
            .is_ok_and(|t| t.starts_with("HTTP/1.1 200")),
        "an orders server where discovery says payments must be refused: {refused:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "{:?}", seen.lock().unwrap());
    web.wait_for_line(STEP, |l| {
        l.contains("mTLS handshake failed") && l.contains(PAYMENTS)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "web logs the refused identity: {e}\n{}",
            logs(&[&web, &payments])
        )
    });

    // When orders' agent goes away the operator withdraws its endpoint, and
    // web's table follows.
    drop(orders);
    poll_until(
        STEP,
        || async {
            let entries = discovered(web_admin).await;
            if entries.iter().any(|e| e.contains(&want_orders)) {
                Err(entries)
            } else {
                Ok(())
            }
        },
        |entries| {
            format!(
                "orders' entry still there: {entries:?}\n{}",
                logs(&[&web, &operator.proc])
            )
        },
    )
    .await;
    assert!(
        discovered(web_admin)
            .await
            .iter()
            .any(|e| e.contains(&want_payments)),
        "payments' entry stays"
    );
}
