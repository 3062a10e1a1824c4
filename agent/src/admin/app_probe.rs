//! Kubelet health probes of the app, answered through the admin port.
//!
//! With strict mTLS the kubelet's plaintext probes cannot reach the app's
//! port, and before the first policy every request to it is denied. So, as
//! Istio does, the pod's HTTP probes are pointed at the agent's admin port
//! (`/app-health/<name>`), and the agent asks the app itself over loopback.
//! Only the configured probe paths are reachable this way: the admin port is
//! not a way around the policy.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One probe: `/app-health/<name>` on the admin port asks `GET <path>` of
/// the app at `addr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppProbe {
    pub name: String,
    pub addr: SocketAddr,
    /// Origin-form path and query, starting with `/`.
    pub path: String,
}

/// Why an `--app-probe` value is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppProbeParseError {
    #[error("{0:?} is not NAME=HOST:PORT/PATH")]
    Shape(String),
    #[error("probe name {0:?} must be letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("{0:?} is not an IP address and port: {1}")]
    Address(String, String),
    #[error("probe path {0:?} is not a valid request target")]
    Path(String),
}

impl FromStr for AppProbe {
    type Err = AppProbeParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, target) = text
            .split_once('=')
            .ok_or_else(|| AppProbeParseError::Shape(text.to_owned()))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(AppProbeParseError::Name(name.to_owned()));
        }
        let (addr, path) = match target.find('/') {
            Some(i) => (&target[..i], &target[i..]),
            None => (target, "/"),
        };
        let addr = addr
            .parse::<SocketAddr>()
            .map_err(|e| AppProbeParseError::Address(addr.to_owned(), e.to_string()))?;
        if http::uri::PathAndQuery::from_str(path).is_err() {
            return Err(AppProbeParseError::Path(path.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            addr,
            path: path.to_owned(),
        })
    }
}

/// Asks the app; the kubelet reads only the status: the app's own status
/// when it answered, 503 when it could not be asked in time.
pub async fn probe(probe: &AppProbe, timeout: Duration) -> (StatusCode, String) {
    match tokio::time::timeout(timeout, ask(probe)).await {
        Ok(Ok(status)) => (status, format!("app answered {}\n", status.as_u16())),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app not reachable: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "app did not answer in time\n".to_owned(),
        ),
    }
}

async fn ask(probe: &AppProbe) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = TcpStream::connect(probe.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri(probe.path.as_str())
        .header(http::header::HOST, probe.addr.to_string())
        .header(http::header::USER_AGENT, "palisade-agent-probe")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    // Drain (bounded by the timeout around us) so the app sees a clean close.
    let _ = resp.into_body().collect().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_address_and_path() {
        let p: AppProbe = "ready=127.0.0.1:8080/healthz?full=1".parse().unwrap();
        assert_eq!(p.name, "ready");
        assert_eq!(p.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(p.path, "/healthz?full=1");
        let p: AppProbe = "live=[::1]:9000".parse().unwrap();
        assert_eq!(p.path, "/");
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_which_part() {
        assert!(matches!(
            "ready".parse::<AppProbe>(),
            Err(AppProbeParseError::Shape(_))
        ));
        assert!(matches!(
            "re/ady=127.0.0.1:1/".parse::<AppProbe>(),
            Err(AppProbeParseError::Name(_))
        ));
        assert!(matches!(
            "ready=localhost:80/".parse::<AppProbe>(),
            Err(AppProbeParseError::Address(..))
        ));
        assert!(matches!(
            "ready=127.0.0.1:80/a b".parse::<AppProbe>(),
            Err(AppProbeParseError::Path(_))
        ));
    }
}
