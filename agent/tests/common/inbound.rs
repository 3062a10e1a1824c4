//! An inbound proxy in-process on loopback for the `inbound_*` and
//! `peer_garbage` tests: a fresh mesh CA, the proxy serving ORDERS in front
//! of a test app, mTLS clients dialing it, and the policy pieces they share.

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Response};
use http_body_util::Full;
use hyper::body::{Body, Bytes};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_agent::authn::JwtOptions;
use palisade_agent::inbound::{InboundConfig, InboundProxy, LoadedPolicy, SharedPolicy};
use palisade_agent::tls::MeshTrust;
use palisade_policy::wire as pb;
use parking_lot::Mutex;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::backend::{Http, loopback, serve};
use super::{ORDERS, TD, TestCa, WEB, trust};

/// A route matching the path prefix `prefix`, without rules.
pub fn route_prefix(id: &str, prefix: &str) -> pb::Route {
    pb::Route {
        id: id.into(),
        path: Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix(prefix.into())),
        }),
        ..Default::default()
    }
}

/// Version `v1` for `shop/orders`: mesh default (all authenticated), strict
/// mTLS, and `routes`.
pub fn mesh_policy(routes: Vec<pb::Route>) -> pb::WorkloadPolicy {
    pb::WorkloadPolicy {
        version: "v1".into(),
        workload: "shop/orders".into(),
        trust_domain: TD.into(),
        default_action: pb::DefaultAction::AllAuthenticated as i32,
        default_mtls: pb::MtlsMode::Strict as i32,
        routes,
        ..Default::default()
    }
}

/// `policy` loaded (it must load), or no policy at all.
pub fn shared(policy: Option<pb::WorkloadPolicy>) -> SharedPolicy {
    SharedPolicy::new(
        policy.map(|p| LoadedPolicy::load(p, JwtOptions::default(), None).expect("policy loads")),
    )
}

/// A header's value, if it is text.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// An inbound proxy for ORDERS on an ephemeral loopback port, with the mesh
/// CA and trust its clients use.
pub struct TestProxy {
    pub ca: TestCa,
    pub trust: MeshTrust,
    pub addr: SocketAddr,
}

impl TestProxy {
    /// Binds a proxy for ORDERS (a fresh mesh CA) in front of `app` under
    /// `policy`, after `configure` adjusted its config; not yet running.
    pub async fn bind(
        app: SocketAddr,
        policy: SharedPolicy,
        configure: impl FnOnce(&mut InboundConfig),
    ) -> (Self, InboundProxy) {
        let ca = TestCa::new("mesh root");
        let trust = trust(&[&ca]);
        let mut config = InboundConfig::new(app, trust.clone(), ca.store(ORDERS), policy);
        configure(&mut config);
        let proxy = InboundProxy::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .expect("bind");
        let addr = proxy.local_addr().unwrap();
        (Self { ca, trust, addr }, proxy)
    }

    /// [`TestProxy::bind`], running in the background.
    pub async fn start(
        app: SocketAddr,
        policy: SharedPolicy,
        configure: impl FnOnce(&mut InboundConfig),
    ) -> Self {
        let (this, proxy) = Self::bind(app, policy, configure).await;
        tokio::spawn(proxy.run());
        this
    }

    /// A client config presenting a certificate for `id` and offering `alpn`
    /// (none: the proxy detects the protocol from the first bytes).
    pub fn client_config(&self, id: &str, alpn: Option<&[u8]>) -> ClientConfig {
        let mut config = self
            .trust
            .client_config(Some(self.ca.store(id)), None)
            .unwrap();
        config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
        config
    }

    /// A TLS connection to the proxy with `config`.
    pub async fn connect(&self, config: ClientConfig) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("mesh.invalid").unwrap(), tcp)
            .await
    }

    /// An mTLS connection to the proxy as `id`, offering `alpn`.
    pub async fn tls_as(&self, id: &str, alpn: Option<&[u8]>) -> io::Result<TlsStream<TcpStream>> {
        self.connect(self.client_config(id, alpn)).await
    }

    /// An HTTP/1.1 client connection over mTLS as WEB.
    pub async fn h1<B>(&self) -> http1::SendRequest<B>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn Error + Send + Sync>>,
    {
        let tls = self
            .tls_as(WEB, Some(b"http/1.1"))
            .await
            .expect("handshake");
        let (sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 client connection over mTLS as WEB.
    pub async fn h2<B>(&self) -> http2::SendRequest<B>
    where
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn Error + Send + Sync>>,
    {
        let tls = self.tls_as(WEB, Some(b"h2")).await.expect("handshake");
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender
    }
}

/// An app (HTTP/1.1 and h2c) that records `METHOD target` of every request
/// and answers 200 "app"; requests for the path `hang`, if any, are recorded
/// but never answered.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<String>>>);

impl RequestLog {
    pub async fn start(hang: Option<&'static str>) -> (Self, SocketAddr) {
        let log = RequestLog::default();
        let addr = serve(
            loopback().await,
            Http::Auto,
            log.clone(),
            move |log: RequestLog, req| async move {
                log.0.lock().push(format!("{} {}", req.method(), req.uri()));
                if Some(req.uri().path()) == hang {
                    std::future::pending::<()>().await;
                }
                Response::new(Full::new(Bytes::from_static(b"app")))
            },
        );
        (log, addr)
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.0.lock().clone()
    }
}

/// Writes `bytes`, closes our sending side if `eof` (nothing more is coming,
/// so the proxy need not wait for its timeouts), reads until the proxy closes
/// (or `wait` passes); what was read.
pub async fn exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    bytes: &[u8],
    eof: bool,
    wait: Duration,
) -> Vec<u8> {
    // The proxy may close before reading everything: write errors are fine.
    let _ = io.write_all(bytes).await;
    if eof {
        let _ = io.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, io.read_to_end(&mut out)).await;
    out
}
