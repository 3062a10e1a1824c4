//! The audit pipeline end to end (issue 10, DESIGN §7): the real
//! `palisade-agent` streams its decisions to the real `palisade-collector`
//! over mTLS, and `palisadectl audit` reads them back. Events are counted by
//! request id: none lost across a collector restart, none stored twice, a
//! full spool leaves a gap record of exactly what was dropped, a forged
//! report is refused and recorded, an edited store fails `audit verify`, and
//! a burst of denials raises one alert delivered to a webhook.

mod fixtures;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fixtures::{Backend, ORDERS, Pki, Req, WEB, agent_command, bounded, compile_policy};
use palisade_e2e::{Proc, free_port, http_get, metric, poll_until, workspace_bin};

const COLLECTOR: &str = "spiffe://cluster.local/ns/palisade/sa/collector";
const TOKEN: &str = "audit-reader-token-5f1c";

/// Where a collector listens and stores: fixed, so it can be restarted
/// where agents expect it.
struct Spec {
    listen: SocketAddr,
    query: SocketAddr,
    db: PathBuf,
    extra: Vec<String>,
}

/// A running `palisade-collector serve` over a SQLite file.
struct Collector {
    spec: Spec,
    proc: Proc,
    listen: SocketAddr,
    query: SocketAddr,
    db: PathBuf,
}

impl Spec {
    async fn spawn(&self, pki: &Pki, dir: &Path) -> Proc {
        let (cert, key) = pki.write_leaf(COLLECTOR, "collector");
        let mut cmd = Command::new(workspace_bin("palisade-collector"));
        cmd.arg("serve")
            .arg("--trust-bundle")
            .arg(&pki.bundle)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--store")
            .arg(&self.db)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--query-listen")
            .arg(self.query.to_string())
            .args(["--admin", ""])
            .arg("--query-token-file")
            .arg(dir.join("token"))
            .args(&self.extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("palisade-collector", cmd);
        proc.wait_for_line(Duration::from_secs(20), |l| {
            l.contains("query API listening")
        })
        .await
        .unwrap_or_else(|e| panic!("collector did not start: {e}"));
        proc
    }
}

impl Collector {
    async fn start(pki: &Pki, dir: &Path, extra: &[&str]) -> Self {
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let spec = Spec {
            listen: free_port(),
            query: free_port(),
            db: dir.join("audit.db"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let proc = spec.spawn(pki, dir).await;
        Self {
            listen: spec.listen,
            query: spec.query,
            db: spec.db.clone(),
            spec,
            proc,
        }
    }

    async fn restart(&mut self, pki: &Pki, dir: &Path) {
        self.proc.kill();
        self.proc = self.spec.spawn(pki, dir).await;
    }

    /// `palisadectl audit <args> --output json`, as a user runs it.
    fn ctl(&self, pki: &Pki, dir: &Path, args: &[&str]) -> (i32, String) {
        let out = Command::new(workspace_bin("palisadectl"))
            .arg("audit")
            .args(args)
            .arg("--collector")
            .arg(self.query.to_string())
            .arg("--trust-bundle")
            .arg(&pki.bundle)
            .arg("--collector-id")
            .arg(COLLECTOR)
            .arg("--token-file")
            .arg(dir.join("token"))
            .env_remove("PALISADE_COLLECTOR")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    /// Every stored record (of `filters`), as JSON objects.
    fn records(&self, pki: &Pki, dir: &Path, filters: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["query", "--limit", "100000", "--output", "json"];
        args.extend_from_slice(filters);
        let (code, text) = self.ctl(pki, dir, &args);
        assert_eq!(code, 0, "{text}");
        serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

/// An agent as ORDERS enforcing the audited policy (allowed requests
/// sampled at 100 %), reporting to `collector`.
async fn agent(
    pki: &Pki,
    dir: &Path,
    app: SocketAddr,
    collector: SocketAddr,
    extra: &[&str],
) -> (Proc, SocketAddr, SocketAddr) {
    agent_sampling(pki, dir, app, collector, extra, 100).await
}

/// [`agent`], with allowed requests sampled at `percent`.
async fn agent_sampling(
    pki: &Pki,
    dir: &Path,
    app: SocketAddr,
    collector: SocketAddr,
    extra: &[&str],
    percent: u32,
) -> (Proc, SocketAddr, SocketAddr) {
    let percent = percent.to_string();
    let policy = compile_policy("audit_pipeline.yaml", &[("SAMPLE", &percent)], dir);
    let (cert, key) = pki.write_leaf(ORDERS, "orders");
    let listen = free_port();
    let admin = free_port();
    let mut cmd = agent_command(&pki.bundle, &cert, &key, &admin.to_string());
    cmd.arg("--inbound")
        .arg(format!("{listen}={app}"))
        .arg("--policy-file")
        .arg(policy)
        .arg("--collector")
        .arg(collector.to_string())
        .arg("--collector-id")
        .arg(COLLECTOR)
        .args(["--audit-batch-ms", "20"])
        .args(extra)
        .env_remove("PALISADE_COLLECTOR");
    let mut proc = Proc::spawn("palisade-agent", cmd);
    proc.wait_for_line(Duration::from_secs(20), |l| {
        l.contains("inbound proxy listening")
    })
    .await
    .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    (proc, listen, admin)
}

/// Sends `n` requests to `path` and returns their request ids (from the
/// deny body, or from what the app saw).
async fn traffic(
    pki: &Pki,
    agent: SocketAddr,
    backend: &Backend,
    path: &str,
    n: usize,
) -> Vec<String> {
    let client = pki.client(WEB);
    let mut ids = Vec::new();
    for i in 0..n {
        let before = backend.seen().len();
        let resp = client.send(agent, &Req::get(&format!("{path}/{i}"))).await;
        if path.starts_with("/admin") {
            assert_eq!(resp.status, 403, "{resp}");
            ids.push(fixtures::deny_request_id(&resp));
        } else {
            assert_eq!(resp.status, 200, "{resp}");
            let seen = backend.seen();
            assert_eq!(seen.len(), before + 1);
            ids.push(seen[before].header("x-request-id").unwrap().to_owned());
        }
    }
    ids
}

/// Waits until every id in `ids` is stored as a decision, then returns the
/// records by request id, asserting none is stored twice.
async fn stored_once(
    c: &Collector,
    pki: &Pki,
    dir: &Path,
    ids: &[String],
) -> HashMap<String, serde_json::Value> {
    poll_until(
        Duration::from_secs(30),
        || async {
            let records = c.records(pki, dir, &["--kind", "decision"]);
            let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
            for r in records {
                by_id
                    .entry(r["request_id"].as_str().unwrap_or("").to_owned())
                    .or_default()
                    .push(r);
            }
            let missing: Vec<&String> = ids.iter().filter(|id| !by_id.contains_key(*id)).collect();
            if !missing.is_empty() {
                return Err(format!(
                    "{} of {} not stored yet, e.g. {:?}",
                    missing.len(),
                    ids.len(),
                    missing[0]
                ));
            }
            for (id, rows) in &by_id {
                assert_eq!(rows.len(), 1, "request {id} stored {} times", rows.len());
            }
            Ok(by_id
                .into_iter()
                .map(|(k, mut v)| (k, v.remove(0)))
                .collect())
        },
        |e| e,
    )
    .await
}

#[tokio::test]
async fn every_denial_and_every_sampled_allow_is_stored_bound_to_the_agent() {
    bounded("audit pipeline", 120, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        let c = Collector::start(&pki, dir.path(), &[]).await;
        let (_agent, addr, _) = agent(&pki, dir.path(), backend.addr(), c.listen, &[]).await;
        let denied = traffic(&pki, addr, &backend, "/admin", 15).await;
        let allowed = traffic(&pki, addr, &backend, "/public", 15).await;
        let all: Vec<String> = denied.iter().chain(&allowed).cloned().collect();
        let stored = stored_once(&c, &pki, dir.path(), &all).await;
        for id in &denied {
            let r = &stored[id];
            assert_eq!(r["decision"], "deny", "{r}");
            assert_eq!(r["status"], 403, "{r}");
            assert_eq!(r["route"], "shop/audited/routes/admin", "{r}");
            assert_eq!(r["source_principal"], WEB, "{r}");
            assert_eq!(r["reporter"], ORDERS, "{r}");
        }
        for id in &allowed {
            assert_eq!(stored[id]["decision"], "allow", "{}", stored[id]);
            assert_eq!(stored[id]["status"], 200, "{}", stored[id]);
        }
        // Filters and stats agree with the traffic.
        let denials = c.records(&pki, dir.path(), &["--decision", "deny"]);
        assert_eq!(denials.len(), denied.len());
        let (code, text) = c.ctl(&pki, dir.path(), &["stats", "--output", "json"]);
        assert_eq!(code, 0, "{text}");
        let stats: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(stats["total"], 30, "{stats}");
        assert!(
            stats["by_decision"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(["deny", 15])),
            "{stats}"
        );
        let (code, text) = c.ctl(&pki, dir.path(), &["verify"]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("every chain is intact"), "{text}");
        // Without a token or an allowed identity, nothing is read.
        let out = Command::new(workspace_bin("palisadectl"))
            .args(["audit", "query", "--collector", &c.query.to_string()])
            .arg("--trust-bundle")
            .arg(&pki.bundle)
            .env_remove("PALISADE_QUERY_TOKEN_FILE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    })
    .await;
}

#[tokio::test]
async fn allowed_requests_are_stored_at_exactly_the_sampled_rate() {
    bounded("audit sampling", 120, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        let c = Collector::start(&pki, dir.path(), &[]).await;
        let (_agent, addr, _) =
            agent_sampling(&pki, dir.path(), backend.addr(), c.listen, &[], 20).await;
        let allowed = traffic(&pki, addr, &backend, "/public", 100).await;
        // Denials are never sampled away; sent last, once they are stored
        // every event before them on the stream is too.
        let denied = traffic(&pki, addr, &backend, "/admin", 5).await;
        stored_once(&c, &pki, dir.path(), &denied).await;
        let stored: Vec<String> = c
            .records(&pki, dir.path(), &["--decision", "allow"])
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect();
        // 20 % of 100 is 20, evenly spread: every fifth request.
        let expected: Vec<String> = allowed.iter().skip(4).step_by(5).cloned().collect();
        let mut stored_sorted = stored.clone();
        stored_sorted.sort();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(stored_sorted, expected_sorted, "stored {stored:?}");
        assert_eq!(stored.len(), 20);
    })
    .await;
}

#[tokio::test]
async fn a_collector_restart_loses_nothing_and_stores_nothing_twice() {
    bounded("collector restart", 150, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        let mut c = Collector::start(&pki, dir.path(), &[]).await;
        let spool = dir.path().join("spool");
        let spool_arg = spool.to_string_lossy().into_owned();
        let (_agent, addr, _) = agent(
            &pki,
            dir.path(),
            backend.addr(),
            c.listen,
            &["--audit-spool-dir", &spool_arg],
        )
        .await;
        let mut ids = traffic(&pki, addr, &backend, "/admin", 10).await;
        // Killed in the middle of a steady stream: what follows waits in
        // the agent (memory, then the spool) until it is back.
        c.proc.kill();
        ids.extend(traffic(&pki, addr, &backend, "/admin", 25).await);
        ids.extend(traffic(&pki, addr, &backend, "/public", 5).await);
        c.restart(&pki, dir.path()).await;
        ids.extend(traffic(&pki, addr, &backend, "/admin", 10).await);
        let stored = stored_once(&c, &pki, dir.path(), &ids).await;
        assert_eq!(stored.len(), ids.len());
        let (code, text) = c.ctl(&pki, dir.path(), &["verify"]);
        assert_eq!(code, 0, "{text}");
    })
    .await;
}

#[tokio::test]
async fn a_full_spool_drops_with_a_counter_and_a_gap_of_exactly_what_was_lost() {
    bounded("spool full", 150, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        // The collector's address is known, but it is not running yet.
        let mut c = Collector::start(&pki, dir.path(), &[]).await;
        c.proc.kill();
        let spool = dir.path().join("spool");
        let spool_arg = spool.to_string_lossy().into_owned();
        let (_agent, addr, admin) = agent(
            &pki,
            dir.path(),
            backend.addr(),
            c.listen,
            &[
                "--audit-spool-dir",
                &spool_arg,
                "--audit-spool-max-bytes",
                "4096",
                "--audit-queue-events",
                "16",
                "--audit-batch-events",
                "4",
            ],
        )
        .await;
        // Requests keep flowing: every one is answered by policy.
        let ids = traffic(&pki, addr, &backend, "/admin", 200).await;
        // Losses have begun (the queue and the 4 KiB spool are full).
        poll_until(
            Duration::from_secs(20),
            || async {
                dropped(admin)
                    .await
                    .filter(|d| *d > 0)
                    .ok_or("nothing dropped yet")
            },
            |e| e.to_owned(),
        )
        .await;
        c.restart(&pki, dir.path()).await;
        let (decisions, lost) = poll_until(
            Duration::from_secs(30),
            || async {
                let decisions = c.records(&pki, dir.path(), &["--kind", "decision"]).len() as u64;
                let lost: u64 = c
                    .records(&pki, dir.path(), &["--kind", "gap"])
                    .iter()
                    .map(|g| g["lost"].as_u64().unwrap_or(0))
                    .sum();
                if decisions + lost == ids.len() as u64 {
                    Ok((decisions, lost))
                } else {
                    Err(format!("{decisions} stored + {lost} lost of {}", ids.len()))
                }
            },
            |e| e,
        )
        .await;
        // Everything is accounted for, so the counter is final.
        let dropped = dropped(admin).await.unwrap();
        assert_eq!(lost, dropped, "the gap records say what the counter says");
        assert!(decisions > 0);
    })
    .await;
}

/// The agent's `palisade_audit_events_dropped_total`.
async fn dropped(admin: SocketAddr) -> Option<u64> {
    let (_, text) = http_get(admin, "/metrics").await.ok()?;
    metric(&text, "palisade_audit_events_dropped_total").map(|d| d as u64)
}

#[tokio::test]
async fn events_reported_for_another_workload_are_refused_and_the_attempt_recorded() {
    use palisade_proto::audit::v1::{AuditBatch, AuditEvent, Verdict, audit_client::AuditClient};
    bounded("forged report", 90, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let c = Collector::start(&pki, dir.path(), &[]).await;
        // WEB's own certificate, claiming ORDERS's decisions.
        let channel = fixtures::grpc_channel(&pki, WEB, c.listen).await;
        let mut client = AuditClient::new(channel);
        let forged = AuditBatch {
            agent_instance_id: "forger".into(),
            sequence: 1,
            events: vec![AuditEvent {
                request_id: "forged-1".into(),
                reporter: ORDERS.into(),
                destination_workload: "billing/invoices".into(),
                verdict: Verdict::Allow as i32,
                status: 200,
                ..Default::default()
            }],
            dropped_since_last: 0,
        };
        let answer = async {
            let mut acks = client
                .report(tokio_stream::iter(vec![forged]))
                .await?
                .into_inner();
            acks.message().await
        }
        .await;
        let status = answer.expect_err("a forged batch must not be acknowledged");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        assert!(
            c.records(
                &pki,
                dir.path(),
                &["--request-id", "forged-1", "--kind", "decision"]
            )
            .is_empty()
        );
        let refused = c.records(&pki, dir.path(), &["--kind", "refused_report"]);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["source_principal"], WEB);
        assert_eq!(refused[0]["reporter"], ORDERS);
        assert_eq!(refused[0]["request_id"], "forged-1");
    })
    .await;
}

#[tokio::test]
async fn audit_verify_reports_a_row_edited_in_the_store() {
    bounded("verify", 120, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        let mut c = Collector::start(&pki, dir.path(), &[]).await;
        let (_agent, addr, _) = agent(&pki, dir.path(), backend.addr(), c.listen, &[]).await;
        let ids = traffic(&pki, addr, &backend, "/admin", 5).await;
        stored_once(&c, &pki, dir.path(), &ids).await;
        c.proc.kill();
        // Someone with write access to the database turns a denial into an allow.
        let db = rusqlite::Connection::open(&c.db).unwrap();
        let changed = db
            .execute(
                "UPDATE audit_events SET decision = 'allow' WHERE request_id = ?1",
                [&ids[2]],
            )
            .unwrap();
        assert_eq!(changed, 1);
        drop(db);
        c.restart(&pki, dir.path()).await;
        let (code, text) = c.ctl(&pki, dir.path(), &["verify"]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("Edited"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_denials_raises_one_alert_delivered_to_the_webhook() {
    bounded("alerts", 120, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let backend = Backend::start().await;
        let posts = Arc::new(Mutex::new(Vec::<String>::new()));
        let hook = fixtures::recording_webhook(posts.clone()).await;
        let rules = dir.path().join("alerts.json");
        std::fs::write(
            &rules,
            r#"{"rules":[{"name":"deny-burst","kind":"deny_rate","key":"source","threshold":5,"window_secs":604800}]}"#,
        )
        .unwrap();
        let rules_arg = rules.to_string_lossy().into_owned();
        let hook_arg = format!("http://{hook}/alerts");
        let c = Collector::start(
            &pki,
            dir.path(),
            &["--alert-rules", &rules_arg, "--alert-webhook", &hook_arg],
        )
        .await;
        let (_agent, addr, _) = agent(&pki, dir.path(), backend.addr(), c.listen, &[]).await;
        let ids = traffic(&pki, addr, &backend, "/admin", 12).await;
        stored_once(&c, &pki, dir.path(), &ids).await;
        let alerts = poll_until(
            Duration::from_secs(20),
            || async {
                let alerts = c.records(&pki, dir.path(), &["--kind", "alert"]);
                if alerts.is_empty() { Err("no alert yet".to_owned()) } else { Ok(alerts) }
            },
            |e| e,
        )
        .await;
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        poll_until(
            Duration::from_secs(20),
            || async {
                match posts.lock().unwrap().len() {
                    0 => Err("no POST yet".to_owned()),
                    _ => Ok(()),
                }
            },
            |e| e,
        )
        .await;
        let posts = posts.lock().unwrap().clone();
        assert_eq!(posts.len(), 1, "{posts:?}");
        let body: serde_json::Value = serde_json::from_str(&posts[0]).unwrap();
        assert_eq!(body["rule"], "deny-burst", "{body}");
        assert_eq!(body["key"], WEB, "{body}");
    })
    .await;
}
