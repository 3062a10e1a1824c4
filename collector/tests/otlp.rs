//! OTLP log export against a receiver built on the official OpenTelemetry
//! protobuf service (`LogsService`), served by tonic on loopback.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use palisade_collector::alerts::{AlertEngine, AlertRules};
use palisade_collector::event::{RecordKind, StoredEvent};
use palisade_collector::otlp::{OtlpConfig, OtlpLogExporter};
use tokio::sync::mpsc;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

const T0: i64 = 1_700_000_040_000_000;
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// What the receiver does with each `Export` call in turn, then accepts.
enum Reply {
    Fail(Code),
    Reject(i64),
}

struct Receiver {
    seen: mpsc::UnboundedSender<ExportLogsServiceRequest>,
    script: Mutex<VecDeque<Reply>>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let _ = self.seen.send(request.into_inner());
        let reply = self.script.lock().unwrap().pop_front();
        match reply {
            Some(Reply::Fail(code)) => Err(Status::new(code, "scripted failure")),
            Some(Reply::Reject(n)) => Ok(Response::new(ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: n,
                    error_message: "scripted rejection".to_owned(),
                }),
            })),
            None => Ok(Response::new(ExportLogsServiceResponse::default())),
        }
    }
}

async fn receiver(
    script: Vec<Reply>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<ExportLogsServiceRequest>,
) {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let (seen, requests) = mpsc::unbounded_channel();
    let service = LogsServiceServer::new(Receiver {
        seen,
        script: Mutex::new(script.into()),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    (addr, requests)
}

fn config(addr: SocketAddr) -> OtlpConfig {
    OtlpConfig {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(10),
        ..OtlpConfig::new(format!("http://{addr}"))
    }
}

/// Log records from requests until `count` have arrived; the bound only
/// keeps a broken build from hanging the suite.
async fn records(
    requests: &mut mpsc::UnboundedReceiver<ExportLogsServiceRequest>,
    count: usize,
) -> Vec<LogRecord> {
    let mut out = Vec::new();
    while out.len() < count {
        let request = tokio::time::timeout(Duration::from_secs(30), requests.recv())
            .await
            .expect("the receiver got no export")
            .expect("receiver gone");
        for resource_logs in request.resource_logs {
            let resource = resource_logs.resource.expect("resource");
            assert_eq!(
                string(&resource.attributes, "service.name").as_deref(),
                Some("palisade-collector")
            );
            for scope_logs in resource_logs.scope_logs {
                assert_eq!(scope_logs.scope.expect("scope").name, "palisade.audit");
                out.extend(scope_logs.log_records);
            }
        }
    }
    out
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        Value::IntValue(n) => Some(*n),
        other => panic!("{key} is not an int: {other:?}"),
    }
}

fn body(record: &LogRecord) -> &str {
    match record.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Value::StringValue(s)) => s,
        other => panic!("body is not a string: {other:?}"),
    }
}

fn denial() -> StoredEvent {
    let mut event = StoredEvent::new(RecordKind::Decision, T0 + 1);
    event.request_id = "req-1".to_owned();
    event.trace_id = TRACE_ID.to_owned();
    event.reporter = "spiffe://mesh.local/ns/prod/sa/api".to_owned();
    event.source_principal = "spiffe://mesh.local/ns/prod/sa/web".to_owned();
    event.source_ip = "10.0.0.7".to_owned();
    event.destination_workload = "prod/api".to_owned();
    event.destination_port = 8080;
    event.route = "admin".to_owned();
    event.method = "GET".to_owned();
    event.path = "/admin".to_owned();
    event.decision = "deny".to_owned();
    event.rule = "deny-admin".to_owned();
    event.reason = "authz.denied".to_owned();
    event.status = 403;
    event.latency_us = 42;
    event.ratelimit_id = "per-source".to_owned();
    event.ratelimit_limit = Some(100);
    event.ratelimit_remaining = Some(99);
    event.jwt_subject = "user-7".to_owned();
    event.policy_version = "v12".to_owned();
    event.headers = vec![("x-tenant".to_owned(), "acme".to_owned())];
    event
}

fn allow() -> StoredEvent {
    let mut event = StoredEvent::new(RecordKind::Decision, T0 + 2);
    event.decision = "allow".to_owned();
    event.reason = "authz.allowed".to_owned();
    event.method = "GET".to_owned();
    event.path = "/health".to_owned();
    event.status = 200;
    event.trace_id = "not-a-trace-id".to_owned();
    event
}

#[tokio::test]
async fn the_receiver_gets_one_log_record_per_event_with_its_attributes() {
    let (addr, mut requests) = receiver(Vec::new()).await;
    let exporter = OtlpLogExporter::start(config(addr)).unwrap();
    let metrics = exporter.metrics();

    let mut engine = AlertEngine::new(
        AlertRules::from_json(
            r#"{"rules":[{"name":"loss","kind":"gap","key":"reporter","threshold":5,"window_secs":60}]}"#,
        )
        .unwrap(),
    );
    let gap = StoredEvent::gap("spiffe://mesh.local/ns/prod/sa/api", T0 + 3, 12);
    let alert = engine.observe(std::slice::from_ref(&gap), T0 + 4)[0].to_stored_event();
    let events = [denial(), allow(), gap, alert];
    assert_eq!(exporter.export(&events), 4);

    let got = records(&mut requests, 4).await;
    assert_eq!(got.len(), 4);
    let [deny, allow, gap, alert] = &got[..] else {
        unreachable!()
    };

    // The denial: WARN, its time, trace id as bytes, every attribute.
    assert_eq!(deny.severity_number, SeverityNumber::Warn as i32);
    assert_eq!(deny.severity_text, "WARN");
    assert_eq!(deny.time_unix_nano, (T0 as u64 + 1) * 1000);
    assert_ne!(deny.observed_time_unix_nano, 0);
    assert_eq!(deny.trace_id, hex::decode(TRACE_ID).unwrap());
    assert_eq!(deny.event_name, "palisade.audit.decision");
    assert_eq!(body(deny), "audit deny authz.denied GET /admin");
    let a = &deny.attributes;
    for (key, value) in [
        ("palisade.record_kind", "decision"),
        ("palisade.request_id", "req-1"),
        ("palisade.decision", "deny"),
        ("palisade.reason", "authz.denied"),
        ("palisade.rule", "deny-admin"),
        ("palisade.route", "admin"),
        ("http.request.method", "GET"),
        ("url.path", "/admin"),
        ("source.address", "10.0.0.7"),
        (
            "palisade.source.principal",
            "spiffe://mesh.local/ns/prod/sa/web",
        ),
        ("palisade.destination.workload", "prod/api"),
        ("palisade.reporter", "spiffe://mesh.local/ns/prod/sa/api"),
        ("palisade.ratelimit.id", "per-source"),
        ("palisade.jwt.subject", "user-7"),
        ("palisade.policy_version", "v12"),
    ] {
        assert_eq!(string(a, key).as_deref(), Some(value), "{key}");
    }
    for (key, value) in [
        ("http.response.status_code", 403),
        ("palisade.destination.port", 8080),
        ("palisade.latency_us", 42),
        ("palisade.ratelimit.limit", 100),
        ("palisade.ratelimit.remaining", 99),
    ] {
        assert_eq!(int(a, key), Some(value), "{key}");
    }
    match attr(a, "http.request.header.x-tenant") {
        Some(Value::ArrayValue(values)) => assert_eq!(
            values.values,
            [AnyValue {
                value: Some(Value::StringValue("acme".to_owned()))
            }]
        ),
        other => panic!("header attribute: {other:?}"),
    }
    // Nothing for what the record did not have.
    for key in [
        "palisade.api_key.client",
        "palisade.audit_only",
        "palisade.trace_id",
        "palisade.lost",
    ] {
        assert!(attr(a, key).is_none(), "{key}");
    }

    // The allow: INFO; a malformed trace id stays an attribute.
    assert_eq!(allow.severity_number, SeverityNumber::Info as i32);
    assert_eq!(allow.severity_text, "INFO");
    assert!(allow.trace_id.is_empty());
    assert_eq!(
        string(&allow.attributes, "palisade.trace_id").as_deref(),
        Some("not-a-trace-id")
    );
    assert_eq!(body(allow), "audit allow authz.allowed GET /health");

    // The gap and the alert: ERROR.
    assert_eq!(gap.severity_number, SeverityNumber::Error as i32);
    assert_eq!(gap.severity_text, "ERROR");
    assert_eq!(int(&gap.attributes, "palisade.lost"), Some(12));
    assert_eq!(body(gap), "audit gap: 12 events lost");
    assert_eq!(gap.event_name, "palisade.audit.gap");

    assert_eq!(alert.severity_number, SeverityNumber::Error as i32);
    assert_eq!(alert.event_name, "palisade.audit.alert");
    assert_eq!(body(alert), "alert loss alert.gap");
    assert_eq!(
        string(&alert.attributes, "palisade.rule").as_deref(),
        Some("loss")
    );
    assert_eq!(int(&alert.attributes, "palisade.alert.count"), Some(12));
    assert_eq!(int(&alert.attributes, "palisade.alert.threshold"), Some(5));
    assert_eq!(
        int(&alert.attributes, "palisade.alert.window_start_us"),
        Some(T0)
    );

    exporter.shutdown().await;
    assert!(requests.try_recv().is_err());
    assert_eq!((metrics.exported(), metrics.failed()), (4, 0));
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(text.contains("palisade_collector_otlp_log_records_exported_total 4\n"));
}

#[tokio::test]
async fn unavailable_is_retried_and_the_records_arrive_once_accepted() {
    let script = vec![
        Reply::Fail(Code::Unavailable),
        Reply::Fail(Code::Unavailable),
    ];
    let (addr, mut requests) = receiver(script).await;
    let exporter = OtlpLogExporter::start(config(addr)).unwrap();
    let metrics = exporter.metrics();
    exporter.export(&[denial(), allow()]);
    exporter.shutdown().await;

    // Three tries of the same batch, the last one accepted.
    for _ in 0..3 {
        let got = records(&mut requests, 2).await;
        assert_eq!(got.len(), 2);
        assert_eq!(
            string(&got[0].attributes, "palisade.request_id").as_deref(),
            Some("req-1")
        );
    }
    assert!(requests.try_recv().is_err());
    assert_eq!((metrics.exported(), metrics.failed()), (2, 0));
}

#[tokio::test]
async fn permanent_errors_and_rejections_count_as_failed() {
    let script = vec![Reply::Fail(Code::InvalidArgument), Reply::Reject(1)];
    let (addr, mut requests) = receiver(script).await;
    let exporter = OtlpLogExporter::start(config(addr)).unwrap();
    let metrics = exporter.metrics();

    // Not retried: one call, both records failed.
    exporter.export(&[denial(), allow()]);
    records(&mut requests, 2).await;
    // Partly rejected: one of the two failed.
    exporter.export(&[denial(), allow()]);
    exporter.shutdown().await;
    records(&mut requests, 2).await;
    assert!(requests.try_recv().is_err());
    assert_eq!((metrics.exported(), metrics.failed()), (1, 3));
}

#[tokio::test]
async fn an_absent_receiver_counts_the_records_as_failed() {
    // A port nobody listens on any more.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let exporter = OtlpLogExporter::start(OtlpConfig {
        attempts: 2,
        ..config(addr)
    })
    .unwrap();
    let metrics = exporter.metrics();
    exporter.export(&[denial(), allow(), denial()]);
    exporter.shutdown().await;
    assert_eq!((metrics.exported(), metrics.failed()), (0, 3));
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (addr, mut requests) = receiver(Vec::new()).await;
    let exporter = OtlpLogExporter::start(OtlpConfig {
        queue_capacity: 2,
        ..config(addr)
    })
    .unwrap();
    let metrics = exporter.metrics();
    // One thread: the export task cannot drain the queue during this call.
    assert_eq!(exporter.export(&[denial(), allow(), denial(), allow()]), 2);
    assert_eq!(metrics.dropped(), 2);
    exporter.shutdown().await;
    assert_eq!(records(&mut requests, 2).await.len(), 2);
    assert_eq!(metrics.exported(), 2);
}
