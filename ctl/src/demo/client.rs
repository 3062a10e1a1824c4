//! The demo's HTTP/1.1 client: one request per connection, plaintext to an
//! agent's outbound listener (which originates mTLS as that workload) or
//! straight at an inbound listener (a caller with no mesh identity). The
//! target is sent as written, so a path trick reaches the agent intact.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use http::{HeaderMap, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `request_id` of a denial's fixed body.
    pub fn request_id(&self) -> Option<String> {
        self.json()["request_id"].as_str().map(str::to_owned)
    }
}

/// A request: method, target, extra headers, body.
pub struct Call<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: Option<(&'a str, Vec<u8>)>,
}

impl<'a> Call<'a> {
    pub fn get(target: &'a str) -> Self {
        Self {
            method: "GET",
            target,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn with(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

pub async fn send(addr: SocketAddr, call: &Call<'_>) -> anyhow::Result<Answer> {
    tokio::time::timeout(TIMEOUT, send_inner(addr, call))
        .await
        .with_context(|| {
            format!(
                "{} {} on {addr}: no answer within 10 s",
                call.method, call.target
            )
        })?
}

async fn send_inner(addr: SocketAddr, call: &Call<'_>) -> anyhow::Result<Answer> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(call.method)
        .uri(call.target)
        .header(header::HOST, "demo.palisade.local");
    for (k, v) in &call.headers {
        req = req.header(*k, v);
    }
    let body = match &call.body {
        Some((content_type, bytes)) => {
            req = req.header(header::CONTENT_TYPE, *content_type);
            Bytes::from(bytes.clone())
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Raw bytes of a plaintext request to `addr`, and whatever comes back
/// before the peer closes (or 5 s pass): how a client without a mesh
/// certificate fares against an inbound listener.
pub async fn raw_exchange(addr: SocketAddr, request: &str) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    // A reset connection or silence is as much a refusal as a closed one.
    let _ = read;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// A GET over TLS that verifies the server against the mesh's `bundle` but
/// presents no client certificate: a caller outside the mesh that knows
/// how to speak TLS. The HTTP status, or why there was none.
pub async fn tls_without_certificate(
    addr: SocketAddr,
    bundle: &std::path::Path,
    trust_domain: &str,
    target: &str,
) -> Result<u16, String> {
    use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
    let exchange = async {
        let bundle = TrustBundle::from_pem_file(bundle).map_err(|e| e.to_string())?;
        let trust = MeshTrust::new(SharedTrustBundle::new(bundle), trust_domain)
            .map_err(|e| e.to_string())?;
        let mut config = trust.client_config(None, None).map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name =
            rustls_pki_types::ServerName::try_from("orders.demo").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake refused: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(target)
            .header(header::HOST, "orders")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("connection closed by the agent: {e}"))?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}
