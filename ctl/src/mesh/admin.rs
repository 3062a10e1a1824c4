//! The plain-HTTP admin endpoints of the local processes: readiness, and
//! what an agent's `/config_dump` says about its identity and policy.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` over HTTP/1.1 with `Connection: close`: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fetch = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))?
        .with_context(|| format!("GET {path} on {addr}"))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}{path}: not an HTTP answer");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr}{path}: bad status line"))?;
    Ok((status, body.to_owned()))
}

/// What one agent reports about itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentStatus {
    pub ready: bool,
    pub identity: String,
    pub policy_version: String,
    /// Unix seconds.
    pub cert_not_after: Option<i64>,
}

pub async fn agent_status(admin: SocketAddr) -> anyhow::Result<AgentStatus> {
    let (status, body) = get(admin, "/config_dump").await?;
    if status != 200 {
        bail!("{admin}/config_dump answered {status}");
    }
    let dump: serde_json::Value =
        serde_json::from_str(&body).context("/config_dump is not JSON")?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    Ok(AgentStatus {
        ready: dump["ready"].as_bool().unwrap_or(false),
        identity: text(&dump["identity"]["spiffe_id"]),
        policy_version: text(&dump["policy"]["version"]),
        cert_not_after: dump["identity"]["not_after"].as_i64(),
    })
}

/// Polls `GET /readyz` until 200, for at most `timeout`.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match get(admin, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => format!("{status} {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("not ready after {} s (/readyz: {last})", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
