//! The real `palisade-agent run` process from start to SIGTERM:
//!
//! - `/readyz`, `/metrics` and `/config_dump` on the admin port describe what
//!   is enforced, and `/config_dump` never shows an API-key hash;
//! - a verified API key is not forwarded to the app;
//! - an audit record is logged for a denial, with the reason and the rule,
//!   and without the key;
//! - SIGTERM: `/readyz` turns 503 at once, a request in flight still gets
//!   its answer, new connections are refused, and the process exits 0.

mod fixtures;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixtures::{ORDERS, Pki, Req, WEB, agent_command, compile_policy, sha256_hex};
use http_body_util::Full;
use hyper::body::Bytes;
use palisade_e2e::{AppHttp, Proc, free_port, http_get, serve_app};

const ACME_KEY: &str = "acme-lifecycle-key-0123456789";
const INITECH_KEY: &str = "initech-lifecycle-key-9876543210";

/// An HTTP/1.1 app that records the headers it got and answers `/…/slow`
/// after 1.5 s.
async fn slow_app() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = serve_app(
        AppHttp::H1,
        seen.clone(),
        |record: Arc<Mutex<Vec<http::HeaderMap>>>, req| async move {
            record.lock().unwrap().push(req.headers().clone());
            if req.uri().path().ends_with("/slow") {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            hyper::Response::new(Full::new(Bytes::from_static(b"app")))
        },
    )
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_audit_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let acme_hash = sha256_hex(ACME_KEY);
    let policy = compile_policy(
        "apikeys.yaml",
        &[
            ("ACME_SHA256", &acme_hash),
            ("INITECH_SHA256", &sha256_hex(INITECH_KEY)),
        ],
        dir.path(),
    );
    let (app, seen) = slow_app().await;
    let (cert, key) = pki.write_leaf(ORDERS, "orders");
    let listen = free_port();
    let admin = free_port();
    let mut cmd = agent_command(&pki.bundle, &cert, &key, &admin.to_string());
    cmd.arg("--inbound")
        .arg(format!("{listen}={app}"))
        .arg("--policy-file")
        .arg(&policy)
        .arg("--app-probe")
        .arg(format!("ready={app}/healthz"))
        .arg("--app-probe")
        .arg(format!("gone={}/", free_port()))
        .arg("--drain-timeout")
        .arg("10");
    let mut agent = Proc::spawn("palisade-agent", cmd);
    agent
        .wait_for_line(Duration::from_secs(20), |l| {
            l.contains("inbound proxy listening")
        })
        .await
        .expect("agent starts");

    // Admin: ready (certificate and policy), metrics, config dump.
    let (code, body) = http_get(admin, "/readyz").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("palisade_agent_ready 1"), "{metrics}");
    assert!(metrics.contains("palisade_agent_policy_info{"), "{metrics}");
    assert!(
        metrics.contains("palisade_inbound_connections_active"),
        "{metrics}"
    );
    let (code, dump) = http_get(admin, "/config_dump").await.unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(dump["identity"]["spiffe_id"], ORDERS);
    assert_eq!(
        dump["policy"]["api_keys"]["keys"][0]["sha256"],
        "[redacted]"
    );
    assert_eq!(dump["policy"]["api_keys"]["keys"][0]["client_id"], "acme");
    let text = dump.to_string();
    assert!(!text.contains(&acme_hash), "the hash leaked: {text}");
    assert!(!text.contains(ACME_KEY));
    assert_eq!(dump["runtime"]["policy_source"], "file");

    // Kubelet probes through the admin port reach only the configured path.
    let (code, _) = http_get(admin, "/app-health/ready").await.unwrap();
    assert_eq!(code, 200);
    let (code, _) = http_get(admin, "/app-health/gone").await.unwrap();
    assert_eq!(code, 503, "an app that is not listening fails the probe");
    let (code, _) = http_get(admin, "/app-health/admin").await.unwrap();
    assert_eq!(code, 404, "no probe of that name");
    {
        let mut seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "exactly the one probe reached the app");
        assert!(seen[0].get("x-forwarded-client-cert").is_none());
        seen.clear();
    }

    // A verified API key reaches the policy, not the app.
    let client = pki.client(WEB);
    let resp = client
        .send(listen, &Req::get("/quotes/1").header("x-api-key", ACME_KEY))
        .await;
    assert_eq!(resp.status, 200);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].get("x-api-key").is_none(), "{:?}", seen[0]);
    }

    // A denial is audited with its reason and rule, never with the key.
    let resp = client
        .send(
            listen,
            &Req::get("/orders/1").header("x-api-key", INITECH_KEY),
        )
        .await;
    assert_eq!(resp.status, 403);
    let rid = resp.json()["request_id"]
        .as_str()
        .expect("the deny body names the request id")
        .to_owned();
    let line = agent
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains("palisade::audit") && l.contains(&rid)
        })
        .await
        .expect("an audit record for the denial");
    assert!(
        line.contains("decision=\"deny\"") || line.contains("decision=deny"),
        "{line}"
    );
    assert!(line.contains("status=403"), "{line}");
    assert!(
        line.contains("api_key_client=\"initech\"") || line.contains("api_key_client=initech"),
        "{line}"
    );
    assert!(line.contains("/orders/1"), "{line}");
    assert!(!line.contains(INITECH_KEY), "{line}");

    // SIGTERM with a request in flight.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .send(
                    listen,
                    &Req::get("/quotes/slow").header("x-api-key", ACME_KEY),
                )
                .await
        })
    };
    // The app has the slow request before the signal is sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.terminate();
    // Not ready any more, while still draining.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match http_get(admin, "/readyz").await {
            Ok((503, body)) => {
                assert_eq!(body, "shutting down\n");
                break;
            }
            Ok((200, _)) => {}
            other => panic!("/readyz during drain: {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New connections are refused while the in-flight request finishes.
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "the listener still accepts during drain"
    );
    let resp = slow.await.expect("slow request task");
    assert_eq!(resp.status, 200, "the in-flight request was cut off");
    assert_eq!(resp.text(), "app");
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the agent exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        agent.transcript().contains("drained; exiting"),
        "{}",
        agent.transcript()
    );
}
