//! The admin endpoint (DESIGN §6, port 15020): plain HTTP/1.1 for the kubelet's
//! probes and Prometheus.
//!
//! - `/healthz`: 200 while the process runs.
//! - `/readyz`: 200 while a certificate is installed and not expired, else 503.
//! - `/metrics`: Prometheus text format (version 0.0.4), written by hand.
//! - `/config_dump`: what the agent enforces, as JSON, secrets redacted
//!   ([`config_dump`]). Loopback clients only.
//!
//! The probes and `/metrics` answer every client; every other path only
//! clients on loopback, others get 403 ([`access`]).
//!
//! [`AdminState`] adds to the identity state: draining (SIGTERM turns
//! `/readyz` to 503), whether a policy is required for readiness, and the
//! other components' metrics.
//!
//! Everything is read from the [`CertStore`] (readiness, expiry) and from the
//! renewal loop's [`RenewalEvent`]s, counted by [`IdentityStatus::track`].

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::identity::{CertStore, RenewalEvent};
use crate::inbound::SharedPolicy;

pub mod access;
pub mod app_probe;
pub mod config_dump;

/// A component that adds samples to `/metrics`.
pub trait PrometheusSource: Send + Sync {
    fn render_prometheus(&self, out: &mut String);
}

impl PrometheusSource for crate::outbound::OutboundMetrics {
    fn render_prometheus(&self, out: &mut String) {
        crate::outbound::OutboundMetrics::render_prometheus(self, out);
    }
}

impl PrometheusSource for crate::outbound::DestinationSources {
    fn render_prometheus(&self, out: &mut String) {
        crate::outbound::DestinationSources::render_prometheus(self, out);
    }
}

impl PrometheusSource for crate::discovery::PolicyStatus {
    fn render_prometheus(&self, out: &mut String) {
        crate::discovery::PolicyStatus::render_prometheus(self, out);
    }
}

impl PrometheusSource for crate::inbound::ConnectionStats {
    fn render_prometheus(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP palisade_inbound_connections_active Inbound connections open now.\n\
             # TYPE palisade_inbound_connections_active gauge\n\
             palisade_inbound_connections_active {}\n\
             # HELP palisade_inbound_connections_refused_total Inbound connections closed at once because the connection limit was reached.\n\
             # TYPE palisade_inbound_connections_refused_total counter\n\
             palisade_inbound_connections_refused_total {}\n\
             # HELP palisade_inbound_requests_in_flight Inbound requests between arrival and their response head.\n\
             # TYPE palisade_inbound_requests_in_flight gauge\n\
             palisade_inbound_requests_in_flight {}\n\
             # HELP palisade_inbound_requests_shed_total Inbound requests answered 503 because the in-flight cap was reached.\n\
             # TYPE palisade_inbound_requests_shed_total counter\n\
             palisade_inbound_requests_shed_total {}",
            self.active(),
            self.refused(),
            self.requests_in_flight(),
            self.requests_shed()
        );
    }
}

impl PrometheusSource for crate::audit::AuditMetrics {
    fn render_prometheus(&self, out: &mut String) {
        crate::audit::AuditMetrics::render_prometheus(self, out);
    }
}

impl PrometheusSource for crate::ratelimit::RateLimitMetrics {
    fn render_prometheus(&self, out: &mut String) {
        crate::ratelimit::RateLimitMetrics::render_prometheus(self, out);
    }
}

/// Everything the admin endpoint of `palisade-agent run` reports.
pub struct AdminState {
    identity: Arc<IdentityStatus>,
    draining: std::sync::atomic::AtomicBool,
    pub(crate) policy: Option<SharedPolicy>,
    /// `/readyz` also waits for the first policy (a policy source is set).
    require_policy: bool,
    sources: Vec<Arc<dyn PrometheusSource>>,
    /// Static facts for `/config_dump` (listeners, mode, policy source).
    pub(crate) runtime: serde_json::Value,
    /// The outbound proxy's meshed destinations (flags and discovery).
    pub(crate) destinations: Option<crate::outbound::DestinationSources>,
    /// `/app-health/<name>` probes of the app ([`app_probe`]).
    app_probes: Vec<app_probe::AppProbe>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("identity", &self.identity)
            .field("require_policy", &self.require_policy)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    pub fn new(identity: Arc<IdentityStatus>) -> Self {
        Self {
            identity,
            draining: std::sync::atomic::AtomicBool::new(false),
            policy: None,
            require_policy: false,
            sources: Vec::new(),
            runtime: serde_json::Value::Null,
            destinations: None,
            app_probes: Vec::new(),
        }
    }

    /// Answers `/app-health/<name>` by asking the app (kubelet probes
    /// rewritten to the admin port, as with Istio).
    pub fn with_app_probes(mut self, probes: Vec<app_probe::AppProbe>) -> Self {
        self.app_probes = probes;
        self
    }

    /// Reports `policy` in `/config_dump` and `/metrics`; with `required`,
    /// `/readyz` is 503 until a policy is loaded (the proxy denies everything
    /// before that, so the pod should not receive traffic yet).
    pub fn with_policy(mut self, policy: SharedPolicy, required: bool) -> Self {
        self.policy = Some(policy);
        self.require_policy = required;
        self
    }

    pub fn with_metrics(mut self, source: Arc<dyn PrometheusSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Shows the outbound destination tables in `/config_dump` and their
    /// sizes on `/metrics`.
    pub fn with_destinations(mut self, sources: crate::outbound::DestinationSources) -> Self {
        self.sources.push(Arc::new(sources.clone()));
        self.destinations = Some(sources);
        self
    }

    /// Static facts shown under `runtime` in `/config_dump`.
    pub fn with_runtime(mut self, runtime: serde_json::Value) -> Self {
        self.runtime = runtime;
        self
    }

    pub fn identity(&self) -> &Arc<IdentityStatus> {
        &self.identity
    }

    /// Graceful shutdown began: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        let snap = self.identity.snapshot();
        if self.is_draining() {
            Some("shutting down\n")
        } else if !snap.ready {
            Some(match snap.seconds_to_expiry {
                None => "no workload certificate yet\n",
                Some(_) => "the workload certificate has expired\n",
            })
        } else if self.require_policy && self.policy.as_ref().is_none_or(|p| p.current().is_none())
        {
            Some("no policy yet\n")
        } else {
            None
        }
    }

    fn render_metrics(&self) -> String {
        let mut out = render_metrics(&self.identity.snapshot());
        let ready = u8::from(self.not_ready_reason().is_none());
        let _ = writeln!(
            out,
            "# HELP palisade_agent_ready 1 while /readyz answers 200.\n# TYPE palisade_agent_ready gauge\npalisade_agent_ready {ready}"
        );
        for source in &self.sources {
            source.render_prometheus(&mut out);
        }
        out
    }
}

/// The identity state the admin endpoint reports: the store handshakes read
/// from, and counters of the renewal loop's outcomes.
#[derive(Debug)]
pub struct IdentityStatus {
    store: Arc<CertStore>,
    renewals: AtomicU64,
    failures: AtomicU64,
}

/// One consistent reading of [`IdentityStatus`], rendered by [`render_metrics`].
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSnapshot {
    /// What `/readyz` answers: a certificate is installed and has not expired.
    pub ready: bool,
    /// Seconds until the current certificate's NotAfter (negative once
    /// expired); `None` before the first certificate.
    pub seconds_to_expiry: Option<f64>,
    /// Certificates installed by the renewal loop, the first one included.
    pub renewals: u64,
    /// Failed attempts (operator unreachable or refusing, bad response).
    pub failures: u64,
}

impl IdentityStatus {
    pub fn new(store: Arc<CertStore>) -> Self {
        Self {
            store,
            renewals: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Counts one event of the renewal loop.
    pub fn record(&self, event: &RenewalEvent) {
        let counter = match event {
            RenewalEvent::Issued { .. } => &self.renewals,
            RenewalEvent::Failed { .. } => &self.failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the renewal loop's events until it stops. Subscribe before the
    /// loop starts (`Renewer::subscribe`) so the first outcome is not missed.
    pub async fn track(self: Arc<Self>, mut events: broadcast::Receiver<RenewalEvent>) {
        loop {
            match events.recv().await {
                Ok(event) => self.record(&event),
                // Cannot happen at the loop's pace (one event per second at
                // most, 64 buffered), and the kind of a lost event is unknown.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "renewal events lost; counters undercount");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Seconds to expiry, with sub-second precision, at `now`.
    fn seconds_to_expiry_at(&self, now: SystemTime) -> Option<f64> {
        let not_after = self.store.expiry().not_after_unix()?;
        let now = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        Some(not_after as f64 - now)
    }

    pub fn snapshot_at(&self, now: SystemTime) -> MetricsSnapshot {
        let seconds_to_expiry = self.seconds_to_expiry_at(now);
        MetricsSnapshot {
            // Readiness latches on the first certificate; an expired one is
            // refused by every peer, so the workload is not ready any more.
            ready: self.store.is_ready() && seconds_to_expiry.is_some_and(|s| s > 0.0),
            seconds_to_expiry,
            renewals: self.renewals.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.snapshot_at(SystemTime::now())
    }
}

/// The Prometheus text exposition of `m`. A gauge without a value (expiry
/// before the first certificate) is declared but has no sample.
pub fn render_metrics(m: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(1024);
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        if let Some(v) = value {
            let _ = writeln!(out, "{name} {v}");
        }
    };
    metric(
        "palisade_identity_ready",
        "gauge",
        "1 while a workload certificate is installed and not expired, else 0.",
        Some(u8::from(m.ready).to_string()),
    );
    metric(
        "palisade_identity_certificate_expiry_seconds",
        "gauge",
        "Seconds until the current workload certificate expires; negative once expired.",
        m.seconds_to_expiry.map(format_float),
    );
    metric(
        "palisade_identity_renewals_total",
        "counter",
        "Workload certificates obtained from the operator and installed, the first one included.",
        Some(m.renewals.to_string()),
    );
    metric(
        "palisade_identity_renewal_failures_total",
        "counter",
        "Failed attempts to obtain a workload certificate.",
        Some(m.failures.to_string()),
    );
    out
}

/// Prometheus floats: `NaN`, `+Inf`, `-Inf`, or a decimal number.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Milliseconds are plenty for a certificate's remaining life.
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.into() }
    }
}

pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers one admin request from the identity state alone (the
/// `identity` subcommand: no policy, no draining).
pub fn respond(status: &IdentityStatus, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let snap = status.snapshot();
    let not_ready = (!snap.ready).then_some(match snap.seconds_to_expiry {
        None => "no workload certificate yet\n",
        Some(_) => "the workload certificate has expired\n",
    });
    answer(method, path, not_ready, || render_metrics(&snap), || None)
}

/// Answers one admin request of `palisade-agent run`.
pub fn respond_state(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    answer(
        method,
        path,
        state.not_ready_reason(),
        || state.render_metrics(),
        || Some(config_dump::render(state)),
    )
}

fn answer(
    method: &Method,
    path: &str,
    not_ready: Option<&'static str>,
    metrics: impl FnOnce() -> String,
    dump: impl FnOnce() -> Option<String>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let not_found = || (StatusCode::NOT_FOUND, TEXT, "not found\n".to_owned());
    let (code, content_type, body) = if method != Method::GET && method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".to_owned(),
        )
    } else {
        match path {
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match not_ready {
                None => (StatusCode::OK, TEXT, "ready\n".into()),
                Some(why) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, why.into()),
            },
            "/metrics" => (StatusCode::OK, METRICS_CONTENT_TYPE, metrics()),
            "/config_dump" => match dump() {
                Some(json) => (StatusCode::OK, "application/json", json),
                None => not_found(),
            },
            _ => not_found(),
        }
    };
    let len = body.len();
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = code;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, len.into());
    resp
}

/// The answer to a client that may not read `path` ([`access::allowed`]):
/// `None` when it may. A refusal is 403 with a fixed body, for any method.
pub fn refusal(peer: IpAddr, method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if access::allowed(peer, path) {
        return None;
    }
    tracing::debug!(
        %peer,
        ?path,
        "admin endpoint: refused a loopback-only path to a client not on loopback"
    );
    let body = access::FORBIDDEN_BODY;
    let mut resp = Response::new(Full::new(if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from_static(body.as_bytes())
    }));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, body.len().into());
    Some(resp)
}

/// Binds the admin listener (so a taken port fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves HTTP/1.1 on `listener` until the task is dropped, from the
/// identity state alone.
pub async fn serve(listener: TcpListener, status: Arc<IdentityStatus>) {
    serve_with(listener, move |req: Request<Incoming>| {
        let resp = respond(&status, req.method(), req.uri().path());
        async move { resp }
    })
    .await;
}

/// Serves the admin endpoint of `palisade-agent run` until the task is dropped.
pub async fn serve_state(listener: TcpListener, state: Arc<AdminState>) {
    serve_with(listener, move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let path = req.uri().path();
            let probe = path
                .strip_prefix("/app-health/")
                .and_then(|name| state.app_probes.iter().find(|p| p.name == name));
            match probe {
                Some(probe) if req.method() == Method::GET => {
                    let (code, body) = app_probe::probe(probe, APP_PROBE_TIMEOUT).await;
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = code;
                    resp
                }
                _ => respond_state(&state, req.method(), path),
            }
        }
    })
    .await;
}

/// Kubelet probes time out after 1 s by default; answer within that.
const APP_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(900);

async fn serve_with<F, Fut>(listener: TcpListener, respond: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little, go on.
                tracing::warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let respond = respond.clone();
        let peer = peer.ip();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                // Checked before anything reads the request or the state.
                let answer = match refusal(peer, req.method(), req.uri().path()) {
                    Some(refused) => Err(refused),
                    None => Ok(respond(req)),
                };
                async move {
                    Ok::<_, Infallible>(match answer {
                        Ok(resp) => resp.await,
                        Err(refused) => refused,
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(ready: bool, expiry: Option<f64>, renewals: u64, failures: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            ready,
            seconds_to_expiry: expiry,
            renewals,
            failures,
        }
    }

    #[test]
    fn text_format_after_a_certificate() {
        let text = render_metrics(&snapshot(true, Some(2.5), 3, 1));
        assert_eq!(
            text,
            "\
# HELP palisade_identity_ready 1 while a workload certificate is installed and not expired, else 0.
# TYPE palisade_identity_ready gauge
palisade_identity_ready 1
# HELP palisade_identity_certificate_expiry_seconds Seconds until the current workload certificate expires; negative once expired.
# TYPE palisade_identity_certificate_expiry_seconds gauge
palisade_identity_certificate_expiry_seconds 2.5
# HELP palisade_identity_renewals_total Workload certificates obtained from the operator and installed, the first one included.
# TYPE palisade_identity_renewals_total counter
palisade_identity_renewals_total 3
# HELP palisade_identity_renewal_failures_total Failed attempts to obtain a workload certificate.
# TYPE palisade_identity_renewal_failures_total counter
palisade_identity_renewal_failures_total 1
"
        );
    }

    #[test]
    fn before_the_first_certificate_expiry_has_no_sample() {
        let text = render_metrics(&snapshot(false, None, 0, 4));
        assert!(text.contains("\npalisade_identity_ready 0\n"), "{text}");
        assert!(text.contains("# TYPE palisade_identity_certificate_expiry_seconds gauge\n"));
        assert!(!text.contains("\npalisade_identity_certificate_expiry_seconds "));
        assert!(text.contains("\npalisade_identity_renewals_total 0\n"));
        assert!(text.contains("\npalisade_identity_renewal_failures_total 4\n"));
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let text = render_metrics(&snapshot(false, Some(-12.0), 7, 9));
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap();
                assert!(kind == "HELP" || kind == "TYPE", "{line}");
                assert!(parts.next().unwrap().starts_with("palisade_identity_"));
                assert!(!parts.next().unwrap().is_empty(), "{line}");
            } else {
                let (name, value) = line.split_once(' ').expect(line);
                assert!(name.starts_with("palisade_identity_"), "{line}");
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                    "{line}"
                );
                value.parse::<f64>().expect(line);
            }
        }
        assert!(text.contains("\npalisade_identity_certificate_expiry_seconds -12\n"));
    }

    #[test]
    fn floats() {
        assert_eq!(format_float(3.0), "3");
        assert_eq!(format_float(2.9994), "2.999");
        assert_eq!(format_float(0.1), "0.1");
        assert_eq!(format_float(-0.0001), "0");
        assert_eq!(format_float(-86_400.25), "-86400.25");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
    }

    fn event_issued() -> RenewalEvent {
        RenewalEvent::Issued {
            spiffe_id: palisade_policy::identity::SpiffeId::parse(
                "spiffe://cluster.local/ns/shop/sa/web",
            )
            .unwrap(),
            serial_hex: "01".into(),
            not_after: 0,
            next_renewal_in: std::time::Duration::from_secs(1),
        }
    }

    fn event_failed() -> RenewalEvent {
        RenewalEvent::Failed {
            attempt: 1,
            error: "down".into(),
            retry_in: std::time::Duration::from_secs(1),
            seconds_to_expiry: None,
        }
    }

    #[test]
    fn counts_events_and_is_not_ready_without_a_certificate() {
        let status = IdentityStatus::new(Arc::new(CertStore::new()));
        status.record(&event_failed());
        status.record(&event_failed());
        status.record(&event_issued());
        let snap = status.snapshot();
        assert_eq!(snap, snapshot(false, None, 1, 2));
    }

    #[tokio::test]
    async fn track_counts_broadcast_events() {
        let status = Arc::new(IdentityStatus::new(Arc::new(CertStore::new())));
        let (tx, rx) = broadcast::channel(8);
        let task = tokio::spawn(status.clone().track(rx));
        tx.send(event_issued()).unwrap();
        tx.send(event_failed()).unwrap();
        tx.send(event_issued()).unwrap();
        drop(tx);
        task.await.unwrap();
        let snap = status.snapshot();
        assert_eq!((snap.renewals, snap.failures), (2, 1));
    }

    /// A self-signed workload leaf valid until `not_after`, installed in a store.
    fn store_with_leaf(not_after: SystemTime) -> Arc<CertStore> {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
        )];
        params.not_before = (not_after - std::time::Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        let store = CertStore::new();
        store.install(
            crate::identity::IssuedCert::new(vec![cert.der().clone()], signing, "cluster.local")
                .unwrap(),
        );
        Arc::new(store)
    }

    #[test]
    fn ready_while_the_certificate_is_valid() {
        let now = SystemTime::now();
        let valid = IdentityStatus::new(store_with_leaf(now + std::time::Duration::from_secs(60)));
        let snap = valid.snapshot_at(now);
        assert!(snap.ready);
        let left = snap.seconds_to_expiry.unwrap();
        assert!(left > 58.0 && left <= 60.0, "{left}");
        assert_eq!(
            respond(&valid, &Method::GET, "/readyz").status(),
            StatusCode::OK
        );

        let expired = IdentityStatus::new(store_with_leaf(now - std::time::Duration::from_secs(5)));
        let snap = expired.snapshot_at(now);
        assert!(!snap.ready, "an expired certificate is not ready");
        assert!(snap.seconds_to_expiry.unwrap() < -4.0);
        assert_eq!(
            respond(&expired, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let text = render_metrics(&snap);
        assert!(text.contains("\npalisade_identity_ready 0\n"), "{text}");
    }

    #[test]
    fn routes() {
        let status = IdentityStatus::new(Arc::new(CertStore::new()));
        let code = |m: Method, p: &str| respond(&status, &m, p).status();
        assert_eq!(code(Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(
            code(Method::GET, "/readyz"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(Method::HEAD, "/readyz"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code(Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(code(Method::GET, "/nope"), StatusCode::NOT_FOUND);
        assert_eq!(
            code(Method::POST, "/healthz"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let resp = respond(&status, &Method::GET, "/metrics");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[tokio::test]
    async fn loopback_only_paths_are_refused_to_other_peers() {
        let remote: IpAddr = "10.0.0.9".parse().unwrap();
        let mapped_remote: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        for peer in [remote, mapped_remote] {
            for method in [Method::GET, Method::POST] {
                let resp = refusal(peer, &method, "/config_dump").expect("refused");
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                assert_eq!(
                    resp.headers()[header::CONTENT_TYPE],
                    "text/plain; charset=utf-8"
                );
                let bytes = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(bytes, access::FORBIDDEN_BODY.as_bytes());
            }
            let head = refusal(peer, &Method::HEAD, "/config_dump").expect("refused");
            assert_eq!(head.status(), StatusCode::FORBIDDEN);
            assert_eq!(
                head.headers()[header::CONTENT_LENGTH],
                access::FORBIDDEN_BODY.len().to_string().as_str()
            );
            // Unknown paths too: a remote client cannot tell what exists.
            assert!(refusal(peer, &Method::GET, "/nope").is_some());
            for open in ["/healthz", "/readyz", "/metrics", "/app-health/ready"] {
                assert!(refusal(peer, &Method::GET, open).is_none(), "{open}");
            }
        }
        for local in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            let peer: IpAddr = local.parse().unwrap();
            assert!(
                refusal(peer, &Method::GET, "/config_dump").is_none(),
                "{local}"
            );
        }
    }

    /// `GET path` over a real TCP connection to `addr`: status and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
        let body = raw.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn a_loopback_client_of_the_real_listener_gets_the_dump() {
        let state = Arc::new(AdminState::new(Arc::new(IdentityStatus::new(Arc::new(
            CertStore::new(),
        )))));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_state(listener, state));
        let (status, body) = get(addr, "/config_dump").await;
        assert_eq!(status, 200, "{body}");
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(dump["identity"], serde_json::Value::Null);
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(get(addr, "/nope").await.0, 404);
        server.abort();
    }

    async fn body(state: &AdminState, path: &str) -> String {
        let resp = respond_state(state, &Method::GET, path);
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn destinations_show_in_config_dump_and_metrics() {
        use crate::outbound::{
            DestinationTable, DiscoveredDestinations, DiscoveredTable, OutboundConfig,
        };
        const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let bundle = crate::tls::TrustBundle::from_der(vec![root.der().clone()]).unwrap();
        let trust =
            crate::tls::MeshTrust::new(crate::tls::SharedTrustBundle::new(bundle), "cluster.local")
                .unwrap();
        let discovered = DiscoveredDestinations::new();
        let config = OutboundConfig::new(
            trust,
            Arc::new(CertStore::new()),
            DestinationTable::parse(["10.9.0.0/16=*"]).unwrap(),
        )
        .with_discovered(discovered.clone());
        let state = AdminState::new(Arc::new(IdentityStatus::new(Arc::new(CertStore::new()))))
            .with_destinations(config.destination_sources());

        let dump: serde_json::Value =
            serde_json::from_str(&body(&state, "/config_dump").await).unwrap();
        assert_eq!(dump["mesh_destinations"]["flags"][0], "10.9.0.0/16=*");
        assert_eq!(
            dump["mesh_destinations"]["discovery"]["version"],
            serde_json::Value::Null
        );
        let metrics = body(&state, "/metrics").await;
        assert!(
            metrics.contains("palisade_agent_mesh_destinations{source=\"flag\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("palisade_agent_mesh_destinations{source=\"discovery\"} 0\n"),
            "{metrics}"
        );

        // A push shows up at once, in both.
        discovered.replace(DiscoveredTable {
            version: Some("d7".into()),
            table: DestinationTable::parse([format!("10.0.0.5:8443={ORDERS}").as_str()]).unwrap(),
            skipped: 1,
        });
        let dump: serde_json::Value =
            serde_json::from_str(&body(&state, "/config_dump").await).unwrap();
        let d = &dump["mesh_destinations"]["discovery"];
        assert_eq!(d["version"], "d7");
        assert_eq!(d["entries"][0], format!("10.0.0.5/32:8443={ORDERS}"));
        assert_eq!(d["skipped"], 1);
        let metrics = body(&state, "/metrics").await;
        assert!(
            metrics.contains("palisade_agent_mesh_destinations{source=\"discovery\"} 1\n"),
            "{metrics}"
        );
    }
}
