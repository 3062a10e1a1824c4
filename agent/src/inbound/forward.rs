//! The forward step: the connection from the agent to the app.

use http::header::{CONNECTION, HeaderMap, HeaderName, TRANSFER_ENCODING};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

use super::ProxyBody;

/// Why the app could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connecting to the app timed out")]
    ConnectTimeout,
    #[error("cannot connect to the app: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP exchange with the app failed: {0}")]
    Http(#[from] hyper::Error),
}

/// One plaintext HTTP/1.1 connection to the app per request (no pool yet).
pub async fn forward(
    app: SocketAddr,
    connect_timeout: Duration,
    req: Request<ProxyBody>,
) -> Result<Response<Incoming>, ForwardError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(app))
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "app connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// Hop-by-hop fields of the app's response (RFC 9110 §7.6.1): hyper frames
/// the message to the client itself, and HTTP/2 forbids them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in nominated {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
    ] {
        headers.remove(name);
    }
    headers.remove(TRANSFER_ENCODING);
}
