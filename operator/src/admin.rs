//! The operator's admin port (15014): plain HTTP/1.1, scraped from inside
//! the cluster like Istio's, never exposed outside it.
//!
//! - `/healthz`: 200 while the process answers.
//! - `/readyz`: 200 once the gRPC endpoint (15012) is listening, 503 while
//!   shutting down.
//! - `/metrics`: Prometheus text (format 0.0.4): issuance counters, and with
//!   a policy source the discovery status and the mesh destination gauge.
//!
//! Bounded: GET/HEAD only, request bodies are never read, headers must
//! arrive within a timeout and at most [`MAX_CONNECTIONS`] are served at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::discovery::{DiscoveryStatus, MeshRegistry};
use crate::identity::IssuanceCounters;

pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// A client that has not sent a whole request head by then is dropped. Idle
/// keep-alive connections are closed after it too (hyper restarts the timer
/// while waiting for the next request); scrapers just reconnect.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Request heads are a line and a few headers; refuse anything bigger.
const MAX_HEADER_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin port: listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the admin port reports from.
#[derive(Debug)]
pub struct AdminState {
    counters: Arc<IssuanceCounters>,
    /// `None` without a policy source: there is no discovery to report on.
    discovery: Option<(Arc<DiscoveryStatus>, Arc<MeshRegistry>)>,
    draining: AtomicBool,
}

impl AdminState {
    /// Ready from the start: the caller creates the admin port only after
    /// the gRPC listener is bound, and connections that arrive before the
    /// server loop runs wait in its backlog rather than being refused.
    pub fn new(counters: Arc<IssuanceCounters>) -> Self {
        Self {
            counters,
            discovery: None,
            draining: AtomicBool::new(false),
        }
    }

    /// Also reports the discovery service sharing `status` and `registry`.
    pub fn with_discovery(
        mut self,
        status: Arc<DiscoveryStatus>,
        registry: Arc<MeshRegistry>,
    ) -> Self {
        self.discovery = Some((status, registry));
        self
    }

    /// Shutdown has begun: `/readyz` answers 503 so no new traffic is sent.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The `/metrics` body.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.counters.render_prometheus(&mut out);
        if let Some((status, registry)) = &self.discovery {
            status.render_prometheus(&mut out);
            registry.render_prometheus(&mut out);
        }
        out
    }

    /// Answers one request from its method and path alone (no body is read).
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        // HEAD is GET without the body (RFC 9110 §9.3.2); hyper drops it.
        if method != Method::GET && method != Method::HEAD {
            let mut resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "method not allowed\n".into(),
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match path {
            "/healthz" => text(StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" if self.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "shutting down\n".into(),
            ),
            "/readyz" => text(StatusCode::OK, TEXT, "ready\n".into()),
            "/metrics" => text(StatusCode::OK, METRICS_CONTENT_TYPE, self.render_metrics()),
            _ => text(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

fn text(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A bound, not yet serving admin port; bound first so a taken port stops
/// start-up instead of failing later.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    header_read_timeout: Duration,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, AdminError> {
        let bind_err = |source| AdminError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            listener,
            local_addr,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, state: Arc<AdminState>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(MAX_HEADER_BYTES);
        loop {
            // Waiting for a slot before accepting leaves the excess in the
            // kernel's backlog instead of in memory here.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return; // never closed
            };
            let tcp = match self.listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "admin port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            let conn = http.serve_connection(
                TokioIo::new(tcp),
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = state.respond(req.method(), req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                }),
            );
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "admin port: connection ended");
                }
                drop(slot);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn body(resp: Response<Full<Bytes>>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn state() -> AdminState {
        let counters = Arc::new(IssuanceCounters::default());
        counters.issued();
        AdminState::new(counters)
    }

    #[tokio::test]
    async fn routes_and_methods() {
        let s = state();
        let ok = s.respond(&Method::GET, "/healthz");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(body(ok).await, "ok\n");
        assert_eq!(s.respond(&Method::GET, "/readyz").status(), StatusCode::OK);
        assert_eq!(
            s.respond(&Method::HEAD, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            s.respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        let post = s.respond(&Method::POST, "/metrics");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        let metrics = s.respond(&Method::GET, "/metrics");
        assert_eq!(
            metrics.headers()[header::CONTENT_TYPE],
            METRICS_CONTENT_TYPE
        );
        let text = body(metrics).await;
        assert!(
            text.contains("palisade_operator_certificates_issued_total 1\n"),
            "{text}"
        );
    }

    #[test]
    fn not_ready_once_draining() {
        let s = state();
        s.start_draining();
        assert_eq!(
            s.respond(&Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Still alive: the kubelet must not restart a draining operator.
        assert_eq!(s.respond(&Method::GET, "/healthz").status(), StatusCode::OK);
    }

    #[test]
    fn discovery_metrics_only_with_a_source() {
        let without = state().render_metrics();
        assert!(
            !without.contains("palisade_operator_discovery_"),
            "{without}"
        );
        assert!(
            !without.contains("palisade_operator_mesh_destinations"),
            "{without}"
        );
        let with = state()
            .with_discovery(
                Arc::new(DiscoveryStatus::new()),
                Arc::new(MeshRegistry::new()),
            )
            .render_metrics();
        for sample in [
            "palisade_operator_certificates_issued_total 1\n",
            "palisade_operator_discovery_subscribers 0\n",
            "palisade_operator_mesh_destinations 0\n",
        ] {
            assert!(with.contains(sample), "{sample:?} missing:\n{with}");
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_dropped() {
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_header_read_timeout(Duration::from_millis(200));
        let addr = server.local_addr();
        let task = tokio::spawn(server.serve(Arc::new(state())));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Half a request head, then silence.
        tcp.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "the connection was kept open past the timeout"
        );
        // Not answered as if it were a request.
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "{buf:?}");
        task.abort();
    }

    #[tokio::test]
    async fn serves_http_1_1() {
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let task = tokio::spawn(server.serve(Arc::new(state())));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz?verbose HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        tcp.read_to_string(&mut buf).await.unwrap();
        assert!(buf.starts_with("HTTP/1.1 200 OK\r\n"), "{buf}");
        assert!(buf.ends_with("\r\n\r\nok\n"), "{buf}");
        task.abort();
    }
}
