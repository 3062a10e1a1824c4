//! The load generator and the backend, both in the harness process.
//!
//! Load is closed-loop, like `wrk`: each connection sends one keep-alive
//! HTTP/1.1 request, waits for the whole response, and sends the next. The
//! latency of a request is measured from just before it is written to when
//! its body has been read; only requests *started* inside the measurement
//! window count, after the warm-up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::stats::Samples;

/// The backend's fixed response body (a small JSON-ish API answer).
pub const BODY: &[u8] = b"{\"status\":\"ok\",\"service\":\"palisade-bench-backend\"}\n";

/// A plaintext HTTP/1.1 (and h2c) server answering 200 [`BODY`] to every request; runs
/// until the runtime stops.
pub async fn start_backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind the backend")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    eprintln!("backend: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                // HTTP/1.1 and h2c: the agent keeps the client's protocol.
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// How the load generator reaches the setup under test.
#[derive(Clone)]
pub enum Target {
    Plain(SocketAddr),
    /// mTLS with this client config (our SPIFFE certificate, HTTP/1.1 ALPN).
    Tls(SocketAddr, Arc<ClientConfig>),
}

type Sender = SendRequest<Empty<Bytes>>;

impl Target {
    pub async fn connect(&self) -> anyhow::Result<Sender> {
        match self {
            Target::Plain(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                Ok(send)
            }
            Target::Tls(addr, config) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = TlsConnector::from(config.clone())
                    .connect(ServerName::try_from("backend.bench")?, tcp)
                    .await
                    .context("mTLS handshake")?;
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                Ok(send)
            }
        }
    }
}

/// One GET; the status, once the body has been read.
pub async fn get(send: &mut Sender) -> anyhow::Result<(StatusCode, Bytes)> {
    send.ready().await?;
    let req = Request::get("/api/items/42")
        .header(http::header::HOST, "backend.bench")
        .body(Empty::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Checks the setup answers one request with the backend's body (and, for a
/// proxy, that authorization let us through).
pub async fn probe(target: &Target) -> anyhow::Result<()> {
    let mut send = target.connect().await?;
    let (status, body) = get(&mut send).await?;
    anyhow::ensure!(
        status == StatusCode::OK && body.as_ref() == BODY,
        "probe got {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// The status a single request gets, for the authz sanity check.
pub async fn status_of(target: &Target) -> anyhow::Result<StatusCode> {
    let mut send = target.connect().await?;
    Ok(get(&mut send).await?.0)
}

/// Runs `connections` closed-loop connections for `warmup + duration`;
/// returns the samples of requests started after the warm-up.
pub async fn run(
    target: &Target,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> Samples {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut send: Option<Sender> = None;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return samples;
                }
                let measured = t0 >= measure_from;
                let result = async {
                    if send.is_none() {
                        send = Some(target.connect().await?);
                    }
                    let Some(s) = send.as_mut() else {
                        anyhow::bail!("no connection");
                    };
                    get(s).await
                }
                .await;
                match result {
                    Ok((StatusCode::OK, _)) => {
                        if measured {
                            samples.record(t0.elapsed());
                        }
                    }
                    Ok(_) | Err(_) => {
                        if measured {
                            samples.errors += 1;
                        }
                        // Start over on a fresh connection; back off a little so
                        // a dead setup does not become a connect storm.
                        send = None;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        match t.await {
            Ok(s) => all.merge(s),
            Err(e) => eprintln!("load task failed: {e}"),
        }
    }
    all
}
