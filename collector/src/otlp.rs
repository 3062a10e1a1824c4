//! OTLP log export (DESIGN §7): every stored record also goes, as one
//! OpenTelemetry log record, to an OpenTelemetry Collector over OTLP/gRPC.
//!
//! Configured by the standard variables: `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`,
//! else `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://host:port`; for gRPC the path
//! is not used); `OTEL_EXPORTER_OTLP_LOGS_TIMEOUT`, else
//! `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds per export call, default
//! 10000); `OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`, else
//! `OTEL_EXPORTER_OTLP_PROTOCOL`, which must be `grpc` when set. Empty values
//! count as unset. TLS (`https://`) and `OTEL_EXPORTER_OTLP_HEADERS` are not
//! supported.
//!
//! [`OtlpLogExporter::export`] never waits: records go on a bounded queue (a
//! full queue drops and counts them) and one task sends them in batches,
//! retrying the codes OTLP calls retryable with exponential backoff.
//!
//! # Log records
//!
//! - `time_unix_nano`: the record's `time_us`; `observed_time_unix_nano`:
//!   when it was handed to the exporter.
//! - severity: `INFO` for an allow (and any other decision), `WARN` for a
//!   deny, `ERROR` for gap, refused-report and alert records.
//! - `event_name`: `palisade.audit.<kind>` (`decision`, `gap`,
//!   `refused_report`, `alert`).
//! - body: a short string, e.g. `audit deny authz.denied GET /admin`,
//!   `audit gap: 12 events lost`, `alert deny-spike alert.deny_rate`.
//! - `trace_id`: the record's trace id when it is 32 hex digits (and not all
//!   zero); otherwise, if not empty, it is kept as `palisade.trace_id`.
//! - resource: `service.name = palisade-collector`, `service.version`;
//!   scope `palisade.audit`.
//!
//! Attributes, each present only when the record has a value for it:
//!
//! | attribute | type | from |
//! |-----------|------|------|
//! | `palisade.record_kind` | string | `decision`, `gap`, `refused_report`, `alert` (always) |
//! | `palisade.request_id` | string | request id |
//! | `palisade.decision` | string | `allow` / `deny` |
//! | `palisade.reason` | string | reason code |
//! | `palisade.rule` | string | the rule that decided (the alert rule for alerts) |
//! | `palisade.route` | string | route |
//! | `http.request.method` | string | method |
//! | `url.path` | string | normalized path |
//! | `http.response.status_code` | int | status |
//! | `source.address` | string | source IP |
//! | `palisade.source.principal` | string | source SPIFFE ID |
//! | `palisade.destination.workload` | string | destination workload |
//! | `palisade.destination.port` | int | destination port |
//! | `palisade.reporter` | string | SPIFFE ID of the reporting agent |
//! | `palisade.latency_us` | int | decision records only |
//! | `palisade.ratelimit.id` / `.limit` / `.remaining` | string / int / int | rate-limit state |
//! | `palisade.jwt.subject` | string | JWT subject |
//! | `palisade.api_key.client` | string | API-key client id |
//! | `palisade.audit_only` | bool | only when true |
//! | `palisade.shadow_reason` | string | shadow reason |
//! | `palisade.policy_version` | string | policy version |
//! | `palisade.lost` | int | gap records: events lost |
//! | `palisade.trace_id` | string | a trace id that is not 32 hex digits |
//! | `http.request.header.<name>` | string[] | headers the policy kept |
//! | `palisade.alert.count` / `.threshold` / `.window_secs` / `.window_start_us` | int | alert records |

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Uri;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::event::{RecordKind, StoredEvent};

const SERVICE_NAME: &str = "palisade-collector";
const SCOPE_NAME: &str = "palisade.audit";

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{var}: {problem}")]
    Env { var: &'static str, problem: String },
    #[error("OTLP endpoint {endpoint:?}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error("OTLP exporter {field}: {problem}")]
    Config {
        field: &'static str,
        problem: &'static str,
    },
    #[error("the OTLP exporter must be started inside a Tokio runtime")]
    NoRuntime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// `http://host:port`.
    pub endpoint: String,
    /// Per export call.
    pub timeout: Duration,
    /// Records waiting to be sent; beyond this they are dropped.
    pub queue_capacity: usize,
    /// Records per `Export` call at most.
    pub max_batch: usize,
    /// Tries per batch, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl OtlpConfig {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            timeout: Duration::from_secs(10),
            queue_capacity: 8192,
            max_batch: 512,
            attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Reads the `OTEL_*` variables through `lookup` (so tests need not touch
    /// the process environment). `Ok(None)` when no endpoint is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, OtlpError> {
        let get = |specific: &'static str, general: &'static str| {
            let set = |var: &'static str| {
                lookup(var)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .map(|v| (var, v))
            };
            set(specific).or_else(|| set(general))
        };

        if let Some((var, protocol)) = get(
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) && protocol != "grpc"
        {
            return Err(OtlpError::Env {
                var,
                problem: format!("protocol {protocol:?} is not supported (only grpc)"),
            });
        }
        let Some((var, endpoint)) = get(
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ) else {
            return Ok(None);
        };
        let mut config = Self::new(endpoint);
        origin(&config.endpoint).map_err(|problem| OtlpError::Env { var, problem })?;

        if let Some((var, millis)) = get(
            "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ) {
            let millis: u64 = millis.parse().map_err(|_| OtlpError::Env {
                var,
                problem: format!("{millis:?} is not a number of milliseconds"),
            })?;
            if millis == 0 {
                return Err(OtlpError::Env {
                    var,
                    problem: "must be > 0".to_owned(),
                });
            }
            config.timeout = Duration::from_millis(millis);
        }
        Ok(Some(config))
    }
}

/// `scheme://authority` of an OTLP/gRPC endpoint (the path plays no part in
/// gRPC), or why it is not one.
fn origin(endpoint: &str) -> Result<String, String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https is not supported (plain gRPC only)".to_owned()),
        _ => return Err("must start with http://".to_owned()),
    }
    let authority = uri.authority().ok_or_else(|| "has no host".to_owned())?;
    Ok(format!("http://{authority}"))
}

/// Export counters.
#[derive(Debug, Default)]
pub struct OtlpMetrics {
    exported: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl OtlpMetrics {
    /// Records the receiver accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Records given up on (every attempt failed, a permanent error, or
    /// rejected by the receiver).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Prometheus text (format 0.0.4).
    pub fn render(&self, out: &mut String) {
        for (name, help, value) in [
            (
                "palisade_collector_otlp_log_records_exported_total",
                "Audit records exported as OTLP log records.",
                self.exported(),
            ),
            (
                "palisade_collector_otlp_log_records_failed_total",
                "Audit records the OTLP export gave up on or the receiver rejected.",
                self.failed(),
            ),
            (
                "palisade_collector_otlp_log_records_dropped_total",
                "Audit records dropped because the OTLP export queue was full.",
                self.dropped(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

pub struct OtlpLogExporter {
    queue: mpsc::Sender<LogRecord>,
    metrics: Arc<OtlpMetrics>,
    task: JoinHandle<()>,
}

impl OtlpLogExporter {
    /// The exporter the `OTEL_*` environment asks for, started; `Ok(None)`
    /// when no endpoint is set. Must be called inside a Tokio runtime.
    pub fn from_env() -> Result<Option<Self>, OtlpError> {
        match OtlpConfig::from_lookup(|var| std::env::var(var).ok())? {
            Some(config) => Self::start(config).map(Some),
            None => Ok(None),
        }
    }

    /// Starts the export task. The connection is made lazily (and remade
    /// after failures), so an absent receiver is not an error here.
    pub fn start(config: OtlpConfig) -> Result<Self, OtlpError> {
        let endpoint_error = |problem: String| OtlpError::Endpoint {
            endpoint: config.endpoint.clone(),
            problem,
        };
        let origin = origin(&config.endpoint).map_err(endpoint_error)?;
        for (field, value) in [
            ("queue_capacity", config.queue_capacity),
            ("max_batch", config.max_batch),
        ] {
            if value == 0 {
                return Err(OtlpError::Config {
                    field,
                    problem: "must be > 0",
                });
            }
        }
        if config.attempts == 0 {
            return Err(OtlpError::Config {
                field: "attempts",
                problem: "must be > 0",
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
        let channel = Endpoint::from_shared(origin)
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .connect_lazy();
        let (queue, records) = mpsc::channel(config.queue_capacity);
        let metrics = Arc::new(OtlpMetrics::default());
        let sender = Sender {
            client: LogsServiceClient::new(channel),
            config,
            metrics: Arc::clone(&metrics),
            resource: resource(),
        };
        let task = runtime.spawn(sender.run(records));
        Ok(Self {
            queue,
            metrics,
            task,
        })
    }

    /// Queues one log record per event without waiting; returns how many
    /// were queued (the rest were dropped and counted).
    pub fn export(&self, events: &[StoredEvent]) -> usize {
        let observed = unix_nanos_now();
        let mut queued = 0;
        for event in events {
            let mut record = log_record(event);
            record.observed_time_unix_nano = observed;
            match self.queue.try_send(record) {
                Ok(()) => queued += 1,
                Err(_) => {
                    let dropped = events.len() - queued;
                    self.metrics
                        .dropped
                        .fetch_add(dropped as u64, Ordering::Relaxed);
                    tracing::warn!(dropped, "OTLP log export queue full; records dropped");
                    break;
                }
            }
        }
        queued
    }

    pub fn metrics(&self) -> Arc<OtlpMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Stops taking records and waits until every queued one was exported
    /// or given up on.
    pub async fn shutdown(self) {
        drop(self.queue);
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "OTLP log export task ended abnormally");
        }
    }
}

fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct Sender {
    client: LogsServiceClient<Channel>,
    config: OtlpConfig,
    metrics: Arc<OtlpMetrics>,
    resource: Resource,
}

impl Sender {
    async fn run(mut self, mut records: mpsc::Receiver<LogRecord>) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        while records.recv_many(&mut batch, self.config.max_batch).await > 0 {
            let batch = std::mem::replace(&mut batch, Vec::with_capacity(self.config.max_batch));
            self.send(batch).await;
        }
    }

    async fn send(&mut self, batch: Vec<LogRecord>) {
        let count = batch.len() as u64;
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    }),
                    log_records: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut backoff = self.config.initial_backoff;
        for attempt in 1..=self.config.attempts {
            match self.client.export(request.clone()).await {
                Ok(response) => {
                    let rejected = response
                        .into_inner()
                        .partial_success
                        .filter(|p| p.rejected_log_records > 0 || !p.error_message.is_empty());
                    let rejected_count = rejected.as_ref().map_or(0, |p| {
                        u64::try_from(p.rejected_log_records)
                            .unwrap_or(0)
                            .min(count)
                    });
                    if let Some(partial) = rejected {
                        tracing::warn!(
                            rejected = partial.rejected_log_records,
                            message = %partial.error_message,
                            "OTLP receiver rejected some log records"
                        );
                    }
                    self.metrics
                        .exported
                        .fetch_add(count - rejected_count, Ordering::Relaxed);
                    self.metrics
                        .failed
                        .fetch_add(rejected_count, Ordering::Relaxed);
                    return;
                }
                Err(status) if retryable(status.code()) && attempt < self.config.attempts => {
                    tracing::debug!(attempt, code = ?status.code(), message = status.message(), ?backoff, "OTLP log export failed; retrying");
                }
                Err(status) => {
                    tracing::warn!(attempt, code = ?status.code(), message = status.message(), records = count, "OTLP log export failed; records not exported");
                    self.metrics.failed.fetch_add(count, Ordering::Relaxed);
                    return;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(self.config.max_backoff);
        }
    }
}

/// The codes the OTLP specification says may succeed when retried.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn resource() -> Resource {
    Resource {
        attributes: vec![
            string_kv("service.name", SERVICE_NAME),
            string_kv("service.version", env!("CARGO_PKG_VERSION")),
        ],
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

fn any(value: any_value::Value) -> Option<AnyValue> {
    Some(AnyValue { value: Some(value) })
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: any(any_value::Value::StringValue(value.to_owned())),
        key_strindex: 0,
    }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: any(any_value::Value::IntValue(value)),
        key_strindex: 0,
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Attributes with empty values are left out: an absent attribute and an
/// empty one would otherwise mean the same thing two ways.
struct Attributes(Vec<KeyValue>);

impl Attributes {
    fn string(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.0.push(string_kv(key, value));
        }
    }

    fn int(&mut self, key: &str, value: Option<i64>) {
        if let Some(value) = value {
            self.0.push(int_kv(key, value));
        }
    }
}

/// A 16-byte trace id from 32 hex digits; `None` for anything else, and for
/// the all-zero id W3C calls invalid.
fn trace_id_bytes(text: &str) -> Option<Vec<u8>> {
    if text.len() != 32 {
        return None;
    }
    let bytes = hex::decode(text).ok()?;
    bytes.iter().any(|&b| b != 0).then_some(bytes)
}

/// The log record for one stored record (see the module docs).
pub fn log_record(event: &StoredEvent) -> LogRecord {
    let (severity, severity_text) = match event.kind {
        RecordKind::Decision if event.decision == "deny" => (SeverityNumber::Warn, "WARN"),
        RecordKind::Decision => (SeverityNumber::Info, "INFO"),
        RecordKind::Gap | RecordKind::RefusedReport | RecordKind::Alert => {
            (SeverityNumber::Error, "ERROR")
        }
    };

    let mut attrs = Attributes(Vec::with_capacity(16 + event.headers.len()));
    attrs.string("palisade.record_kind", event.kind.as_str());
    attrs.string("palisade.request_id", &event.request_id);
    attrs.string("palisade.decision", &event.decision);
    attrs.string("palisade.reason", &event.reason);
    attrs.string("palisade.rule", &event.rule);
    attrs.string("palisade.route", &event.route);
    attrs.string("http.request.method", &event.method);
    attrs.string("url.path", &event.path);
    attrs.int(
        "http.response.status_code",
        (event.status != 0).then_some(i64::from(event.status)),
    );
    attrs.string("source.address", &event.source_ip);
    attrs.string("palisade.source.principal", &event.source_principal);
    attrs.string("palisade.destination.workload", &event.destination_workload);
    attrs.int(
        "palisade.destination.port",
        (event.destination_port != 0).then_some(i64::from(event.destination_port)),
    );
    attrs.string("palisade.reporter", &event.reporter);
    attrs.int(
        "palisade.latency_us",
        (event.kind == RecordKind::Decision).then_some(saturating_i64(event.latency_us)),
    );
    attrs.string("palisade.ratelimit.id", &event.ratelimit_id);
    attrs.int(
        "palisade.ratelimit.limit",
        event.ratelimit_limit.map(saturating_i64),
    );
    attrs.int(
        "palisade.ratelimit.remaining",
        event.ratelimit_remaining.map(saturating_i64),
    );
    attrs.string("palisade.jwt.subject", &event.jwt_subject);
    attrs.string("palisade.api_key.client", &event.api_key_client);
    if event.audit_only {
        attrs.0.push(KeyValue {
            key: "palisade.audit_only".to_owned(),
            value: any(any_value::Value::BoolValue(true)),
            key_strindex: 0,
        });
    }
    attrs.string("palisade.shadow_reason", &event.shadow_reason);
    attrs.string("palisade.policy_version", &event.policy_version);
    attrs.int(
        "palisade.lost",
        (event.kind == RecordKind::Gap).then_some(saturating_i64(event.lost)),
    );
    let trace_id = trace_id_bytes(&event.trace_id);
    if trace_id.is_none() {
        attrs.string("palisade.trace_id", &event.trace_id);
    }
    header_attributes(event, &mut attrs);

    LogRecord {
        time_unix_nano: u64::try_from(event.time_us)
            .unwrap_or(0)
            .saturating_mul(1000),
        observed_time_unix_nano: 0,
        severity_number: severity as i32,
        severity_text: severity_text.to_owned(),
        body: any(any_value::Value::StringValue(body(event))),
        attributes: attrs.0,
        dropped_attributes_count: 0,
        flags: 0,
        trace_id: trace_id.unwrap_or_default(),
        span_id: Vec::new(),
        event_name: format!("palisade.audit.{}", event.kind.as_str()),
    }
}

fn header_attributes(event: &StoredEvent, attrs: &mut Attributes) {
    if event.kind == RecordKind::Alert {
        // An alert record's "headers" are its counts (see
        // `Alert::to_stored_event`), not HTTP headers.
        for (name, value) in &event.headers {
            let key = format!("palisade.{name}");
            match value.parse::<i64>() {
                Ok(n) => attrs.0.push(int_kv(&key, n)),
                Err(_) => attrs.string(&key, value),
            }
        }
        return;
    }
    // Headers are sorted by name, so repeats of one name are adjacent; the
    // semantic conventions give each name one string-array attribute.
    let mut index = 0;
    while index < event.headers.len() {
        let name = &event.headers[index].0;
        let values: Vec<AnyValue> = event.headers[index..]
            .iter()
            .take_while(|(n, _)| n == name)
            .map(|(_, v)| AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            })
            .collect();
        index += values.len();
        attrs.0.push(KeyValue {
            key: format!("http.request.header.{}", name.to_ascii_lowercase()),
            value: any(any_value::Value::ArrayValue(ArrayValue { values })),
            key_strindex: 0,
        });
    }
}

fn body(event: &StoredEvent) -> String {
    match event.kind {
        RecordKind::Decision => {
            let mut body = String::from("audit");
            let decision = if event.decision.is_empty() {
                "decision"
            } else {
                &event.decision
            };
            for part in [decision, &event.reason, &event.method, &event.path] {
                if !part.is_empty() {
                    body.push(' ');
                    body.push_str(part);
                }
            }
            body
        }
        RecordKind::Gap => format!("audit gap: {} events lost", event.lost),
        RecordKind::RefusedReport => format!("audit refused_report {}", event.reason)
            .trim_end()
            .to_owned(),
        RecordKind::Alert => format!("alert {} {}", event.rule, event.reason)
            .trim_end()
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_logs_endpoint_takes_precedence_and_empty_means_unset() {
        let config = OtlpConfig::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(config.endpoint, "http://logs:4317");
        assert_eq!(config.timeout, Duration::from_millis(2500));

        let config = OtlpConfig::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", ""),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(config.endpoint, "http://general:4317");

        assert_eq!(OtlpConfig::from_lookup(lookup(&[])).unwrap(), None);
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        let err = OtlpConfig::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap_err();
        assert!(err.to_string().starts_with("OTEL_EXPORTER_OTLP_PROTOCOL: "));
        let err = OtlpConfig::from_lookup(lookup(&[(
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            "https://c:4317",
        )]))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT: https")
        );
        let err = OtlpConfig::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "soon"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT: ")
        );
    }

    #[test]
    fn trace_ids_must_be_32_hex_digits_and_not_zero() {
        assert_eq!(
            trace_id_bytes("4bf92f3577b34da6a3ce929d0e0e4736").map(|b| b.len()),
            Some(16)
        );
        assert_eq!(trace_id_bytes("00000000000000000000000000000000"), None);
        assert_eq!(trace_id_bytes("4bf92f3577b34da6"), None);
        assert_eq!(trace_id_bytes("zz f92f3577b34da6a3ce929d0e0e4736"), None);
    }

    #[test]
    fn repeated_headers_become_one_array() {
        let mut event = StoredEvent::new(RecordKind::Decision, 1);
        event.headers = vec![
            ("X-A".to_owned(), "1".to_owned()),
            ("X-A".to_owned(), "2".to_owned()),
            ("x-b".to_owned(), "3".to_owned()),
        ];
        let record = log_record(&event);
        let headers: Vec<_> = record
            .attributes
            .iter()
            .filter(|kv| kv.key.starts_with("http.request.header."))
            .map(|kv| match &kv.value.as_ref().unwrap().value {
                Some(any_value::Value::ArrayValue(a)) => (kv.key.clone(), a.values.len()),
                other => panic!("not an array: {other:?}"),
            })
            .collect();
        assert_eq!(
            headers,
            [
                ("http.request.header.x-a".to_owned(), 2),
                ("http.request.header.x-b".to_owned(), 1)
            ]
        );
    }
}
