//! The forward step: the connection from the agent to the app.
//!
//! The client's protocol is preserved (as Linkerd does): HTTP/1.x in →
//! HTTP/1.1 to the app; HTTP/2 in → HTTP/2 with prior knowledge (h2c) to the
//! app, streaming both ways with trailers (gRPC's `grpc-status`) passed
//! through. A port configured `AppProtocol::Http1` gets HTTP/1.1 whatever the
//! client spoke (apps that only speak HTTP/1.1 behind HTTP/2 clients).
//!
//! Connections to the app are pooled per app address (hyper-util's client:
//! idle HTTP/1.1 connections are reused, one multiplexed HTTP/2 connection is
//! shared), so a request does not pay a TCP connect.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::UPGRADE;
use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::RwLock;
use tokio::net::TcpStream;

use super::ProxyBody;

/// What the app is spoken to with, per app port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppProtocol {
    /// The client's protocol: HTTP/1.x → HTTP/1.1, HTTP/2 → h2c.
    #[default]
    Preserve,
    /// Always HTTP/1.1 (HTTP/2 clients in front of an HTTP/1.1-only app).
    Http1,
}

impl std::str::FromStr for AppProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "preserve" | "auto" => Ok(Self::Preserve),
            "http1" => Ok(Self::Http1),
            other => Err(format!("unknown app protocol {other:?} (preserve | http1)")),
        }
    }
}

/// Why the app could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("HTTP exchange with the app failed: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("the app answered 101 to a request that did not ask to upgrade")]
    UnexpectedUpgrade,
    #[error("CONNECT tunnels are not proxied")]
    Connect,
}

/// Connection-pool settings.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// How long an idle app connection is kept.
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per app address.
    pub max_idle_per_app: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            max_idle_per_app: 32,
        }
    }
}

/// Most app addresses with a pool of their own; transparent mode sees one
/// per app port, so this is never reached in practice. Beyond it requests
/// still work, on a pool that is not kept.
const MAX_APPS: usize = 256;

type AppClient = Client<FixedConnector, ProxyBody>;

struct AppClients {
    h1: AppClient,
    h2: AppClient,
}

/// The pooled clients, per app address.
pub struct Forwarder {
    connect_timeout: Duration,
    pool: PoolConfig,
    apps: RwLock<HashMap<SocketAddr, Arc<AppClients>>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("apps", &self.apps.read().len())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(connect_timeout: Duration, pool: PoolConfig) -> Self {
        Self {
            connect_timeout,
            pool,
            apps: RwLock::new(HashMap::new()),
        }
    }

    fn clients(&self, app: SocketAddr) -> Arc<AppClients> {
        if let Some(c) = self.apps.read().get(&app) {
            return c.clone();
        }
        let build = || {
            let connector = FixedConnector {
                addr: app,
                timeout: self.connect_timeout,
            };
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(self.pool.idle_timeout)
                .pool_max_idle_per_host(self.pool.max_idle_per_app)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new());
            let h1 = builder.build(connector.clone());
            let h2 = builder.http2_only(true).build(connector);
            Arc::new(AppClients { h1, h2 })
        };
        let mut apps = self.apps.write();
        if apps.len() >= MAX_APPS && !apps.contains_key(&app) {
            return build();
        }
        apps.entry(app).or_insert_with(build).clone()
    }

    /// Sends an allowed request to the app. The request's URI is the
    /// normalized origin form; `Host` (or the HTTP/2 `:authority` it was
    /// filled from) names the authority. An `Upgrade` request answered 101
    /// comes back with both connections' upgrades, for the caller to join
    /// ([`super::upgrade`]).
    pub async fn forward(
        &self,
        app: SocketAddr,
        app_protocol: AppProtocol,
        mut req: Request<ProxyBody>,
    ) -> Result<Forwarded, ForwardError> {
        if req.method() == Method::CONNECT {
            return Err(ForwardError::Connect);
        }
        let h2 = req.version() == Version::HTTP_2 && app_protocol == AppProtocol::Preserve;
        // `strip` kept `upgrade` (and `connection: upgrade`) only for a real
        // upgrade request.
        let client_upgrade =
            (!h2 && req.headers().contains_key(UPGRADE)).then(|| hyper::upgrade::on(&mut req));

        // The client needs an absolute URI; its authority is what the app
        // sees as `:authority` over HTTP/2, and the pool key (the connector
        // always dials `app`).
        let authority = req
            .headers()
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| authority_of(app));
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ForwardError::Connect)?;

        let clients = self.clients(app);
        let mut resp = if h2 {
            // HTTP/2 carries the authority as `:authority` (RFC 9113 §8.3.1).
            req.headers_mut().remove(HOST);
            *req.version_mut() = Version::HTTP_2;
            clients.h2.request(req).await?
        } else {
            *req.version_mut() = Version::HTTP_11;
            clients.h1.request(req).await?
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ForwardError::UnexpectedUpgrade);
            };
            let upgrade = resp.headers().get(UPGRADE).cloned();
            strip_all_hop_by_hop(resp.headers_mut());
            if let Some(upgrade) = upgrade {
                resp.headers_mut().insert(UPGRADE, upgrade);
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            }
            let app_upgrade = hyper::upgrade::on(&mut resp);
            return Ok(Forwarded {
                response: resp,
                upgrade: Some((client_upgrade, app_upgrade)),
            });
        }
        strip_all_hop_by_hop(resp.headers_mut());
        Ok(Forwarded {
            response: resp,
            upgrade: None,
        })
    }
}

/// The app's answer; after a `101`, the client's and the app's upgraded
/// connections, still to be joined.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub upgrade: Option<(hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade)>,
}

fn authority_of(app: SocketAddr) -> Authority {
    // A socket address always formats as a valid authority.
    Authority::try_from(app.to_string()).unwrap_or_else(|_| Authority::from_static("localhost"))
}

/// Dials the one app address, whatever the URI says.
#[derive(Clone, Debug)]
struct FixedConnector {
    addr: SocketAddr,
    timeout: Duration,
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the app")
                })??;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Every hop-by-hop field of an app response (RFC 9110 §7.6.1): hyper frames
/// the message to the client itself, and HTTP/2 forbids them.
fn strip_all_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
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

/// Hop-by-hop fields of the response the proxy returns. [`Forwarder::forward`]
/// already removed them all from the app's response, except on a `101`,
/// where it left exactly `connection: upgrade` plus `upgrade`, which the
/// client needs to complete the switch; that pair is kept, anything else
/// removed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let upgrade_pair = headers
        .get_all(CONNECTION)
        .iter()
        .eq([&HeaderValue::from_static("upgrade")])
        && headers.get_all(UPGRADE).iter().count() == 1;
    let kept = upgrade_pair
        .then(|| headers.get(UPGRADE).cloned())
        .flatten();
    strip_all_hop_by_hop(headers);
    if let Some(upgrade) = kept {
        headers.insert(UPGRADE, upgrade);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed_but_an_upgrade_pair_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-a"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("x-b", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-b"));

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }
}
