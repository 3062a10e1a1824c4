//! Alert rules: windows and keys, config errors, and the webhook against a
//! real HTTP server on loopback.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade_collector::alerts::{
    Alert, AlertConfigError, AlertEngine, AlertKey, AlertKind, AlertRules, WebhookConfig,
    WebhookNotifier,
};
use palisade_collector::event::{RecordKind, StoredEvent};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A minute boundary, so windows of 60 s start here.
const T0: i64 = 1_700_000_040_000_000;
const SEC: i64 = 1_000_000;
const ALICE: &str = "spiffe://mesh.local/ns/prod/sa/alice";
const BOB: &str = "spiffe://mesh.local/ns/prod/sa/bob";

fn decision(source: &str, decision: &str, reason: &str, time_us: i64) -> StoredEvent {
    let mut event = StoredEvent::new(RecordKind::Decision, time_us);
    event.reporter = "spiffe://mesh.local/ns/prod/sa/api".to_owned();
    event.source_principal = source.to_owned();
    event.source_ip = "10.0.0.7".to_owned();
    event.destination_workload = "prod/api".to_owned();
    event.method = "GET".to_owned();
    event.path = "/admin".to_owned();
    event.decision = decision.to_owned();
    event.reason = reason.to_owned();
    event.status = if decision == "deny" { 403 } else { 200 };
    event
}

fn deny(source: &str, time_us: i64) -> StoredEvent {
    decision(source, "deny", "authz.denied", time_us)
}

fn engine(rules: &str) -> AlertEngine {
    AlertEngine::new(AlertRules::from_json(rules).unwrap())
}

fn one_rule(kind: &str, key: &str, threshold: u64, extra: &str) -> String {
    format!(
        r#"{{"rules":[{{"name":"r","kind":"{kind}","key":"{key}","threshold":{threshold},"window_secs":60{extra}}}]}}"#
    )
}

#[test]
fn a_burst_of_denials_raises_one_alert_per_window_and_only_for_that_source() {
    let mut engine = engine(
        r#"{"rules":[{"name":"deny-spike","kind":"deny_rate","key":"source","threshold":5,"window_secs":60}]}"#,
    );
    let now = T0 + 120 * SEC;

    // 20 denials from alice over the first minute, in batches; 4 from bob;
    // allowed requests from alice do not count.
    let mut first_window = Vec::new();
    for batch in 0..4 {
        let mut events: Vec<_> = (0..5)
            .map(|i| deny(ALICE, T0 + (batch * 5 + i) * 2 * SEC))
            .collect();
        events.push(decision(ALICE, "allow", "authz.allowed", T0 + batch * SEC));
        events.push(deny(BOB, T0 + batch * 10 * SEC));
        first_window.extend(engine.observe(&events, now));
    }
    assert_eq!(
        first_window,
        [Alert {
            rule: "deny-spike".to_owned(),
            kind: AlertKind::DenyRate,
            key_by: AlertKey::Source,
            key: ALICE.to_owned(),
            count: 5,
            threshold: 5,
            window_start_us: T0,
            window_secs: 60,
            raised_us: now,
        }]
    );

    // The next minute alerts again, once.
    let events: Vec<_> = (0..12)
        .map(|i| deny(ALICE, T0 + 60 * SEC + i * SEC))
        .collect();
    let second = engine.observe(&events, now);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].window_start_us, T0 + 60 * SEC);
    assert_eq!(second[0].key, ALICE);
    assert!(engine.observe(&events, now).is_empty());

    let metrics = engine.metrics();
    assert_eq!(metrics.alerts("deny-spike"), Some(2));
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("# TYPE palisade_collector_alerts_total counter\n"));
    assert!(text.contains("palisade_collector_alerts_total{rule=\"deny-spike\"} 2\n"));

    let stored = first_window[0].to_stored_event();
    assert_eq!(stored.kind, RecordKind::Alert);
    assert_eq!(stored.kind.as_str(), "alert");
    assert_eq!(RecordKind::parse("alert"), Some(RecordKind::Alert));
    assert_eq!(stored.time_us, now);
    assert_eq!(stored.rule, "deny-spike");
    assert_eq!(stored.reason, "alert.deny_rate");
    assert_eq!(stored.source_principal, ALICE);
    assert!(
        stored
            .headers
            .contains(&("alert.count".to_owned(), "5".to_owned()))
    );
    assert!(stored.headers.is_sorted());
}

#[test]
fn the_source_key_falls_back_to_the_ip_and_none_counts_everything() {
    let mut engine = engine(
        r#"{"rules":[
            {"name":"per-source","kind":"deny_rate","key":"source","threshold":2,"window_secs":60},
            {"name":"all","kind":"deny_rate","key":"none","threshold":3,"window_secs":60}
        ]}"#,
    );
    let events = [deny("", T0), deny("", T0 + SEC), deny(BOB, T0 + 2 * SEC)];
    let alerts = engine.observe(&events, T0);
    let summary: Vec<_> = alerts
        .iter()
        .map(|a| (a.rule.as_str(), a.key.as_str()))
        .collect();
    assert_eq!(summary, [("per-source", "10.0.0.7"), ("all", "")]);
    assert_eq!(alerts[0].to_stored_event().source_ip, "10.0.0.7");
    assert_eq!(alerts[0].to_stored_event().source_principal, "");
}

#[test]
fn each_kind_counts_its_own_records() {
    // auth_failures: reasons starting with `authn.`, whatever the decision.
    let mut auth = engine(&one_rule("auth_failures", "source", 2, ""));
    let events = [
        decision(ALICE, "deny", "authn.jwt_invalid", T0),
        deny(ALICE, T0 + SEC),
        decision(ALICE, "deny", "authn.mtls_required", T0 + 2 * SEC),
    ];
    let alerts = auth.observe(&events, T0);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, AlertKind::AuthFailures);
    assert_eq!(alerts[0].count, 2);

    // rate_limited: status 429 or reason ratelimit.exceeded, per destination.
    let mut limited = engine(&one_rule("rate_limited", "destination", 2, ""));
    let mut by_status = decision(ALICE, "deny", "other", T0);
    by_status.status = 429;
    let by_reason = decision(BOB, "deny", "ratelimit.exceeded", T0 + SEC);
    let alerts = limited.observe(&[deny(ALICE, T0), by_status, by_reason], T0);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].key, "prod/api");
    assert_eq!(alerts[0].to_stored_event().destination_workload, "prod/api");

    // policy_change: a version differing from the last one for the same
    // reporter and destination; the first sighting and older records do not
    // count.
    let mut policy = engine(&one_rule("policy_change", "destination", 1, ""));
    let versioned = |version: &str, time_us: i64, reporter: &str| {
        let mut event = decision(ALICE, "allow", "authz.allowed", time_us);
        event.policy_version = version.to_owned();
        event.reporter = reporter.to_owned();
        event
    };
    let quiet = [
        versioned("v1", T0, "agent-a"),
        versioned("v1", T0 + SEC, "agent-a"),
        versioned("v7", T0 + SEC, "agent-b"),
        versioned("", T0 + 2 * SEC, "agent-a"),
    ];
    assert!(policy.observe(&quiet, T0).is_empty());
    let replayed_old = versioned("v0", T0, "agent-a");
    assert!(policy.observe(&[replayed_old], T0).is_empty());
    let alerts = policy.observe(&[versioned("v2", T0 + 3 * SEC, "agent-a")], T0);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, AlertKind::PolicyChange);
    assert_eq!(alerts[0].window_start_us, T0);

    // gap: counts the events lost, so one gap can cross the threshold.
    let mut gap = engine(&one_rule("gap", "reporter", 100, ""));
    let alerts = gap.observe(
        &[
            StoredEvent::gap("agent-a", T0, 40),
            deny(ALICE, T0),
            StoredEvent::gap("agent-a", T0 + SEC, 250),
            StoredEvent::gap("agent-b", T0 + SEC, 99),
        ],
        T0,
    );
    assert_eq!(alerts.len(), 1);
    assert_eq!((alerts[0].key.as_str(), alerts[0].count), ("agent-a", 290));
    assert_eq!(alerts[0].to_stored_event().reporter, "agent-a");
}

#[test]
fn records_for_a_closed_window_are_ignored_not_counted_afresh() {
    let mut engine = engine(&one_rule("deny_rate", "source", 2, ""));
    assert_eq!(
        engine
            .observe(&[deny(ALICE, T0), deny(ALICE, T0 + SEC)], T0)
            .len(),
        1
    );
    // One window of grace: at T0 + 119 s the first window still counts.
    assert!(
        engine
            .observe(&[deny(ALICE, T0 + 2 * SEC)], T0 + 119 * SEC)
            .is_empty()
    );
    assert_eq!(engine.metrics().ignored_events("r"), Some(0));
    // Two windows on it is closed: its records are ignored, never re-alerted.
    let late = [deny(ALICE, T0 + 3 * SEC), deny(ALICE, T0 + 4 * SEC)];
    assert!(engine.observe(&late, T0 + 120 * SEC).is_empty());
    assert_eq!(engine.metrics().ignored_events("r"), Some(2));
    let mut text = String::new();
    engine.metrics().render(&mut text);
    assert!(text.contains("palisade_collector_alert_events_ignored_total{rule=\"r\"} 2\n"));
}

#[test]
fn the_key_table_is_bounded_and_eviction_never_repeats_an_alert() {
    let mut engine = engine(&one_rule("deny_rate", "source", 1, r#","max_keys":2"#));
    let keys = |alerts: Vec<Alert>| -> Vec<(String, i64)> {
        alerts
            .into_iter()
            .map(|a| (a.key, (a.window_start_us - T0) / SEC))
            .collect()
    };
    let carol = "spiffe://mesh.local/ns/prod/sa/carol";
    let dave = "spiffe://mesh.local/ns/prod/sa/dave";

    // Full with two live windows of the same minute: carol is not tracked.
    let alerts = engine.observe(&[deny(ALICE, T0), deny(BOB, T0), deny(carol, T0)], T0);
    assert_eq!(keys(alerts), [(ALICE.to_owned(), 0), (BOB.to_owned(), 0)]);
    assert_eq!(engine.metrics().ignored_events("r"), Some(1));

    // A newer window evicts the oldest pair (alice's first minute)...
    let alerts = engine.observe(&[deny(dave, T0 + 60 * SEC)], T0);
    assert_eq!(keys(alerts), [(dave.to_owned(), 60)]);
    // ...and alice's first minute is not re-opened, so it cannot alert twice.
    assert!(engine.observe(&[deny(ALICE, T0 + 5 * SEC)], T0).is_empty());
    assert_eq!(engine.metrics().ignored_events("r"), Some(2));
}

fn config_error(json: &str) -> String {
    match AlertRules::from_json(json) {
        Err(AlertConfigError::Field { field, problem }) => format!("{field}: {problem}"),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn bad_config_errors_name_the_field() {
    let good = r#"{"name":"a","kind":"deny_rate","key":"source","threshold":5,"window_secs":60}"#;
    let with_third = |third: &str| {
        format!(
            r#"{{"rules":[{good},{},{third}]}}"#,
            good.replace("\"a\"", "\"b\"")
        )
    };
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"reporter","threshold":0,"window_secs":60}"#
        )),
        "rules[2].threshold: must be > 0"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"deny_spike","key":"source","threshold":1,"window_secs":60}"#
        )),
        "rules[2].kind: unknown kind \"deny_spike\" (expected one of deny_rate, auth_failures, rate_limited, policy_change, gap)"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","threshold":1,"window_secs":60}"#
        )),
        "rules[2].key: missing"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"pod","threshold":1,"window_secs":60}"#
        )),
        "rules[2].key: unknown key \"pod\" (expected one of source, destination, reporter, none)"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"none","threshold":1,"window_secs":0}"#
        )),
        "rules[2].window_secs: must be > 0"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"none","threshold":"5","window_secs":60}"#
        )),
        "rules[2].threshold: must be a number"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"none","threshold":5,"window":60}"#
        )),
        "rules[2].window: unknown field"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"","kind":"gap","key":"none","threshold":5,"window_secs":60}"#
        )),
        "rules[2].name: must not be empty"
    );
    assert_eq!(
        config_error(&with_third(
            r#"{"name":"c","kind":"gap","key":"none","threshold":5,"window_secs":60,"max_keys":0}"#
        )),
        "rules[2].max_keys: must be > 0"
    );
    assert_eq!(
        config_error(&format!(r#"{{"rules":[{good},{good}]}}"#)),
        "rules[1].name: duplicate rule name \"a\""
    );
    assert_eq!(config_error(r#"{"rules":{}}"#), "rules: must be an array");
    assert_eq!(config_error("{}"), "rules: missing");
}

#[test]
fn rules_load_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.json");
    std::fs::write(
        &path,
        r#"{"rules":[{"name":"authn","kind":"auth_failures","key":"source","threshold":20,"window_secs":300,"max_keys":50}]}"#,
    )
    .unwrap();
    let rules = AlertRules::from_file(&path).unwrap();
    let rule = &rules.rules()[0];
    assert_eq!(
        (rule.name.as_str(), rule.kind, rule.key),
        ("authn", AlertKind::AuthFailures, AlertKey::Source)
    );
    assert_eq!(
        (rule.threshold, rule.window_secs, rule.max_keys),
        (20, 300, 50)
    );

    let missing = AlertRules::from_file(dir.path().join("absent.json")).unwrap_err();
    assert!(matches!(missing, AlertConfigError::Read { .. }));
    assert!(missing.to_string().contains("absent.json"));
}

// --- webhook ---------------------------------------------------------------

/// What the test server saw of one request.
#[derive(Debug)]
struct Received {
    method: http::Method,
    path: String,
    content_type: Option<String>,
    body: serde_json::Value,
}

/// An HTTP/1 server on loopback that reports every request and answers
/// with the scripted statuses in turn, then 200.
async fn webhook_server(script: &[StatusCode]) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, received) = mpsc::unbounded_channel();
    let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    let script = Arc::clone(&script);
                    async move {
                        let method = request.method().clone();
                        let path = request.uri().path().to_owned();
                        let content_type = request
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let bytes = request.into_body().collect().await.unwrap().to_bytes();
                        let body = serde_json::from_slice(&bytes).unwrap();
                        let _ = seen.send(Received {
                            method,
                            path,
                            content_type,
                            body,
                        });
                        let status = script.lock().unwrap().pop_front().unwrap_or(StatusCode::OK);
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

fn quick_retries() -> WebhookConfig {
    WebhookConfig {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..WebhookConfig::default()
    }
}

/// Waits for the next request the server saw; the bound only keeps a broken
/// build from hanging the suite.
async fn next(received: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(30), received.recv())
        .await
        .expect("the webhook server saw no request")
        .expect("server gone")
}

fn two_alerts() -> Vec<Alert> {
    let mut engine = engine(&one_rule("deny_rate", "source", 3, ""));
    let events: Vec<_> = (0..10)
        .map(|i| deny(ALICE, T0 + i * SEC))
        .chain((0..10).map(|i| deny(ALICE, T0 + 60 * SEC + i * SEC)))
        .collect();
    let alerts = engine.observe(&events, T0 + 70 * SEC);
    assert_eq!(alerts.len(), 2);
    alerts
}

#[tokio::test]
async fn the_webhook_receives_one_post_per_alert() {
    let (addr, mut received) = webhook_server(&[]).await;
    let notifier =
        WebhookNotifier::new(&format!("http://{addr}/hooks/palisade"), quick_retries()).unwrap();
    let metrics = notifier.metrics();
    let alerts = two_alerts();
    for alert in &alerts {
        assert!(notifier.notify(alert));
    }

    for alert in &alerts {
        let request = next(&mut received).await;
        assert_eq!(request.method, http::Method::POST);
        assert_eq!(request.path, "/hooks/palisade");
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.body, serde_json::to_value(alert).unwrap());
    }
    let first = serde_json::to_value(&alerts[0]).unwrap();
    assert_eq!(first["rule"], "r");
    assert_eq!(first["kind"], "deny_rate");
    assert_eq!(first["key_by"], "source");
    assert_eq!(first["key"], ALICE);
    assert_eq!(first["count"], 3);
    assert_eq!(first["threshold"], 3);
    assert_eq!(first["window_start_us"], T0);
    assert_eq!(first["window_secs"], 60);
    assert_eq!(first["raised_us"], T0 + 70 * SEC);

    // Once every queued alert is done, nothing more was sent.
    notifier.shutdown().await;
    assert!(received.try_recv().is_err());
    assert_eq!((metrics.delivered(), metrics.failed()), (2, 0));
}

#[tokio::test]
async fn a_webhook_that_fails_twice_is_retried_and_gets_the_alert_once() {
    let script = [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ];
    let (addr, mut received) = webhook_server(&script).await;
    let notifier = WebhookNotifier::new(&format!("http://{addr}/"), quick_retries()).unwrap();
    let metrics = notifier.metrics();
    let alert = two_alerts().remove(0);
    assert!(notifier.notify(&alert));
    notifier.shutdown().await;

    let expected = serde_json::to_value(&alert).unwrap();
    for _ in 0..3 {
        assert_eq!(next(&mut received).await.body, expected);
    }
    assert!(received.try_recv().is_err());
    assert_eq!((metrics.delivered(), metrics.failed()), (1, 0));
}

#[tokio::test]
async fn failed_deliveries_are_counted_and_client_errors_not_retried() {
    let script = [
        StatusCode::BAD_GATEWAY,
        StatusCode::BAD_GATEWAY,
        StatusCode::BAD_REQUEST,
    ];
    let (addr, mut received) = webhook_server(&script).await;
    let config = WebhookConfig {
        attempts: 2,
        ..quick_retries()
    };
    let notifier = WebhookNotifier::new(&format!("http://{addr}/"), config).unwrap();
    let metrics = notifier.metrics();
    let alerts = two_alerts();
    for alert in &alerts {
        assert!(notifier.notify(alert));
    }
    notifier.shutdown().await;

    // Two tries for the first (502, 502), one for the second (400).
    let windows: Vec<_> = (0..3)
        .map(|_| received.try_recv().unwrap().body["window_start_us"].clone())
        .collect();
    assert_eq!(windows, [T0, T0, T0 + 60 * SEC]);
    assert!(received.try_recv().is_err());
    assert_eq!((metrics.delivered(), metrics.failed()), (0, 2));
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("palisade_collector_alert_webhook_failed_total 2\n"));
}

#[tokio::test]
async fn a_full_queue_drops_instead_of_waiting() {
    let (addr, mut received) = webhook_server(&[]).await;
    let config = WebhookConfig {
        queue_capacity: 1,
        ..quick_retries()
    };
    let notifier = WebhookNotifier::new(&format!("http://{addr}/"), config).unwrap();
    let metrics = notifier.metrics();
    let alerts = two_alerts();
    // This test runs on one thread, so the delivery task cannot take the
    // first alert off the queue before the second is offered.
    assert!(notifier.notify(&alerts[0]));
    assert!(!notifier.notify(&alerts[1]));
    assert_eq!(metrics.dropped(), 1);
    notifier.shutdown().await;
    assert_eq!(next(&mut received).await.body["window_start_us"], T0);
    assert!(received.try_recv().is_err());
    assert_eq!(metrics.delivered(), 1);
}

#[tokio::test]
async fn webhook_urls_must_be_plain_http() {
    for url in ["https://hooks.example/x", "hooks.example/x", "ftp://h/x"] {
        let err = WebhookNotifier::new(url, WebhookConfig::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains(url), "{err}");
    }
}
