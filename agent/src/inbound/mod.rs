//! The inbound proxy (DESIGN §6): accept a connection (explicit mode: on one
//! listen address for one app; transparent mode: redirected by iptables, the
//! app being the original destination), terminate mTLS, run every request
//! through the pipeline and the policy engine, and forward what is allowed
//! to the app.
//!
//! The steps live one per module:
//! - this file: accept (connection limit) → TLS (strict or permissive per
//!   port) → HTTP or opaque, as the policy declares the port → serve HTTP/1
//!   or HTTP/2 with hyper's limits, graceful drain;
//! - [`detect`]: HTTP/1 or HTTP/2, from ALPN or the first bytes; a
//!   connection on an HTTP port that does not speak HTTP is closed and
//!   audited, never tunnelled;
//! - [`limits`]: the limits, and the HTTP/1 framing guard (smuggling);
//! - [`request`]: the per-request steps (admit → shape → authenticate →
//!   authorize → rate-limit → validate → forward → mask → audit), one
//!   module each, and the one exit that turns a refusal into a response;
//! - [`forward`]: the pooled connections to the app;
//! - [`upgrade`], [`tunnel`]: upgraded (WebSocket) connections, and byte
//!   tunnels that each new policy version re-authorizes;
//! - [`tcp`]: opaque TCP, identity-level authorization by the engine.
//!
//! Never panics on peer input: every failure becomes a logged connection
//! close or a fixed deny body.

/// `AsyncWrite` for an I/O wrapper that only looks at what is read
/// ([`detect::Rewind`], [`limits::H1Guard`]): every write goes straight to
/// its `inner`.
macro_rules! write_through_to_inner {
    ($wrapper:ident) => {
        impl<IO: ::tokio::io::AsyncWrite + Unpin> ::tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod body;
pub mod detect;
pub mod forward;
pub mod limits;
pub mod policy;
pub mod request;
pub mod tcp;
pub mod tunnel;
pub mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use palisade_policy::identity::SpiffeId;
use palisade_policy::wire;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditEvent, AuditSink};
use crate::identity::CertStore;
use crate::ratelimit::GlobalRateLimiter;
use crate::tls::{MeshTrust, MtlsMode, TlsConfigError, peer_identity};

pub use detect::{Detected, PortProtocol, Sniffed};
pub use forward::{AppProtocol, PoolConfig};
pub use limits::Limits;
pub use policy::{LoadedPolicy, PolicyUpdates, SharedPolicy};
pub use request::{ProxyBody, ResetStream};

use limits::{H1Guard, HeadVerdict, HeadVerdicts};

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Where allowed requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppTarget {
    /// Explicit mode: one app address for every connection.
    Fixed(SocketAddr),
    /// Transparent mode: the address the client dialled before iptables
    /// redirected it to the agent (`SO_ORIGINAL_DST`).
    OriginalDst,
}

/// What the proxy needs besides the listening socket.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// The application, reached over plaintext.
    pub app: AppTarget,
    pub trust: MeshTrust,
    /// Our certificate (also our SPIFFE ID for XFCC `By=`).
    pub certs: Arc<CertStore>,
    pub policy: SharedPolicy,
    /// The shared store for `scope: global` rate limits; without it every
    /// global limit acts as its failure mode says.
    pub global_limits: Option<Arc<GlobalRateLimiter>>,
    /// Longest a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest connecting to the app may take before answering 502.
    pub app_connect_timeout: Duration,
    /// How app ports the policy declares nothing about are treated; ports
    /// not listed are [`PortProtocol::Http`] (`--opaque-ports` sets
    /// `Opaque`). A port the policy gives HTTP rules is HTTP regardless.
    pub port_protocols: HashMap<u16, PortProtocol>,
    /// What the app is spoken to with, per app port; ports not listed are
    /// [`AppProtocol::Preserve`] (`--app-protocol PORT=http1`).
    pub app_protocols: HashMap<u16, AppProtocol>,
    /// On an HTTP port without ALPN, how long to wait for the client's
    /// first bytes; after it the connection is closed and audited.
    pub detect_timeout: Duration,
    /// `Upgrade` protocols passed to the app (lower case, e.g.
    /// `websocket`); any other upgrade, and `h2c` always, is refused.
    pub upgrade_protocols: Vec<String>,
    /// Header, stream and connection limits.
    pub limits: Limits,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
    /// Pooled connections to the app.
    pub app_pool: PoolConfig,
    /// Where audit events go besides the log (the collector's queue);
    /// [`AuditSink::disabled`] by default: log lines only.
    pub audit: AuditSink,
}

impl InboundConfig {
    pub fn new(
        app: impl Into<AppTarget>,
        trust: MeshTrust,
        certs: Arc<CertStore>,
        policy: SharedPolicy,
    ) -> Self {
        Self {
            app: app.into(),
            trust,
            certs,
            policy,
            global_limits: None,
            handshake_timeout: Duration::from_secs(10),
            app_connect_timeout: Duration::from_secs(5),
            port_protocols: HashMap::new(),
            app_protocols: HashMap::new(),
            detect_timeout: Duration::from_secs(10),
            upgrade_protocols: vec!["websocket".to_owned()],
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(20),
            app_pool: PoolConfig::default(),
            audit: AuditSink::disabled(),
        }
    }

    /// How the agent's own configuration treats an app port.
    pub fn port_protocol(&self, port: u16) -> PortProtocol {
        self.port_protocols.get(&port).copied().unwrap_or_default()
    }

    /// What an app port is spoken to with.
    pub fn app_protocol(&self, port: u16) -> AppProtocol {
        self.app_protocols.get(&port).copied().unwrap_or_default()
    }
}

impl From<SocketAddr> for AppTarget {
    fn from(addr: SocketAddr) -> Self {
        Self::Fixed(addr)
    }
}

pub(crate) struct Shared {
    pub(crate) config: InboundConfig,
    strict: TlsAcceptor,
    permissive: TlsAcceptor,
    pub(crate) started: Instant,
    forwarder: forward::Forwarder,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    stats: ConnectionStats,
}

impl Shared {
    /// The forward step for an allowed request (see [`forward`]).
    pub(crate) async fn forward(
        &self,
        conn: &ConnInfo,
        req: Request<ProxyBody>,
    ) -> Result<forward::Forwarded, forward::ForwardError> {
        let protocol = self.config.app_protocol(conn.app.port());
        self.forwarder.forward(conn.app, protocol, req).await
    }
}

/// Connection and request counters of one listener.
#[derive(Clone, Debug)]
pub struct ConnectionStats {
    permits: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
    requests: Arc<Semaphore>,
    max_requests: usize,
    shed: Arc<AtomicU64>,
}

impl ConnectionStats {
    /// A place for one more request in flight, or `None` (counted as shed)
    /// when `max_requests_in_flight` are.
    pub(crate) fn admit_request(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.requests.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// Requests between arrival and their response head now.
    pub fn requests_in_flight(&self) -> usize {
        self.max_requests
            .saturating_sub(self.requests.available_permits())
    }

    /// Requests answered 503 because `max_requests_in_flight` were in flight.
    pub fn requests_shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Connections closed at accept because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }
}

/// One accepted connection: who is on the other end, and where its
/// requests go.
pub(crate) struct ConnInfo {
    pub(crate) peer_addr: IpAddr,
    /// The verified mTLS peer.
    pub(crate) peer: Option<SpiffeId>,
    /// The app address for this connection.
    pub(crate) app: SocketAddr,
    /// What every request of the connection tells the app about its client,
    /// computed once: `x-forwarded-client-cert` (None for plaintext) and the
    /// peer's address for `X-Forwarded-For`.
    pub(crate) xfcc: Option<HeaderValue>,
    pub(crate) forwarded_for: HeaderValue,
}

impl ConnInfo {
    fn new(
        shared: &Shared,
        peer_addr: IpAddr,
        peer: Option<SpiffeId>,
        peer_der: Option<&[u8]>,
        app: SocketAddr,
    ) -> Self {
        let xfcc = match (&peer, shared.config.certs.current()) {
            (Some(id), Some(local)) => Some(crate::pipeline::xfcc::xfcc_value(
                local.spiffe_id(),
                crate::pipeline::xfcc::PeerCert { id, der: peer_der },
            )),
            _ => None,
        };
        Self {
            peer_addr,
            peer,
            app,
            xfcc,
            forwarded_for: crate::pipeline::forwarded::address_value(peer_addr),
        }
    }
}

/// A bound inbound listener; [`run`](Self::run) serves it.
pub struct InboundProxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl InboundProxy {
    pub async fn bind(listen: SocketAddr, config: InboundConfig) -> anyhow::Result<Self> {
        let tls = |mode| -> Result<TlsAcceptor, TlsConfigError> {
            let certs = config.certs.clone();
            Ok(TlsAcceptor::from(Arc::new(
                config.trust.server_config(certs, mode)?,
            )))
        };
        let l = &config.limits;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_headers(l.max_headers)
            .max_header_size(l.max_header_bytes)
            // Also caps an incomplete head: hyper answers 431 once its read
            // buffer is full (it refuses a limit under 8 KiB).
            .max_buf_size(l.max_header_bytes.max(8 * 1024));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(l.h2_max_concurrent_streams)
            .max_header_list_size(l.h2_max_header_list_size)
            .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
            .keep_alive_interval(l.h2_keep_alive_interval)
            .keep_alive_timeout(l.h2_keep_alive_timeout);
        let max = l.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let max_requests = l.max_requests_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let stats = ConnectionStats {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::default(),
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            shed: Arc::default(),
        };
        let shared = Arc::new(Shared {
            strict: tls(MtlsMode::Strict)?,
            permissive: tls(MtlsMode::Permissive)?,
            forwarder: forward::Forwarder::new(config.app_connect_timeout, config.app_pool),
            config,
            started: Instant::now(),
            h1,
            h2,
            stats,
        });
        let listener = TcpListener::bind(listen).await?;
        Ok(Self { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// This listener's connection counters (a cheap handle; take it before
    /// `run`).
    pub fn stats(&self) -> ConnectionStats {
        self.shared.stats.clone()
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await;
    }

    /// Accepts connections until `shutdown` completes, then drains: the
    /// listener is closed (new connections are refused), every HTTP
    /// connection is told to finish its in-flight requests and close
    /// (HTTP/1: `Connection: close` on the current response, idle ones at
    /// once; HTTP/2: GOAWAY), and this returns once all connections ended or
    /// `drain_timeout` passed, whichever is first; what is left then is cut.
    /// Opaque and upgraded connections have no request boundary: they run
    /// until they end or the deadline.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let Self { listener, shared } = self;
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Ok(permit) = shared.stats.permits.clone().try_acquire_owned() else {
                            // Over the limit: close at once rather than queue
                            // work the agent cannot take on.
                            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(peer = %peer, "connection limit reached; closing");
                            drop(tcp);
                            continue;
                        };
                        let shared = shared.clone();
                        let drain = drain_rx.clone();
                        tasks.spawn(async move {
                            connection(shared, tcp, peer, drain).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off, never exit.
                        tracing::warn!(error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = drain_tx.send(true);
        tracing::info!(connections = tasks.len(), "inbound listener draining");
        let drained = tokio::time::timeout(shared.config.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "drain deadline passed; closing the remaining connections"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// The mTLS mode for an app port: the policy's, strict without a policy.
fn mtls_mode(shared: &Shared, port: u16) -> MtlsMode {
    match shared.config.policy.current() {
        Some(p) if p.engine.mtls_mode(port) == wire::MtlsMode::Permissive => MtlsMode::Permissive,
        _ => MtlsMode::Strict,
    }
}

/// The app address of a connection; `None` when it cannot be known (a
/// transparent-mode connection that was not redirected).
fn app_address(shared: &Shared, tcp: &TcpStream) -> Option<SocketAddr> {
    match shared.config.app {
        AppTarget::Fixed(addr) => Some(addr),
        AppTarget::OriginalDst => match crate::orig_dst::original_dst(tcp) {
            // Dialled the agent's own port directly: there is no app to
            // reach, and forwarding to ourselves would loop.
            Ok(dst) if tcp.local_addr().is_ok_and(|l| l == dst) => None,
            Ok(dst) => Some(dst),
            Err(e) => {
                tracing::debug!(error = %e, "no original destination");
                None
            }
        },
    }
}

async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(app) = app_address(&shared, &tcp) else {
        tracing::debug!(peer = %peer_addr, "inbound connection without an app destination; closing");
        return;
    };
    let timeout = shared.config.handshake_timeout;
    let mode = mtls_mode(&shared, app.port());
    if mode == MtlsMode::Permissive {
        // Permissive: plaintext HTTP is served too, without an identity.
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
                let info = ConnInfo::new(&shared, peer_addr.ip(), None, None, app);
                dispatch(shared, tcp, info, None, drain).await;
                return;
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    let acceptor = match mode {
        MtlsMode::Strict => &shared.strict,
        MtlsMode::Permissive => &shared.permissive,
    };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer_addr, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer_addr, "inbound handshake timed out");
            return;
        }
    };
    let conn = tls.get_ref().1;
    let peer = match peer_identity(conn, shared.config.trust.trust_domain()) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(peer = %peer_addr, error = %e, "no usable peer identity");
            return;
        }
    };
    let der = conn.peer_certificates().and_then(|c| c.first());
    let alpn = detect::from_alpn(conn.alpn_protocol());
    let info = ConnInfo::new(&shared, peer_addr.ip(), peer, der.map(|c| c.as_ref()), app);
    dispatch(shared, tls, info, alpn, drain).await;
}

/// Whether a connection for `port` is opaque TCP: the policy declares the
/// port `tcp` and gives it no HTTP rules, or (for a port the policy says
/// nothing about) `--opaque-ports` lists it. Everything else is HTTP.
fn serves_opaque(shared: &Shared, port: u16) -> bool {
    use palisade_policy::wire::PortProtocol as Declared;
    let configured = shared.config.port_protocol(port) == PortProtocol::Opaque;
    match shared.config.policy.current() {
        Some(p) => match p.engine.port_protocol(port) {
            Declared::Tcp => true,
            Declared::Unspecified => configured,
            Declared::Http | Declared::Grpc => {
                if configured {
                    tracing::debug!(
                        port,
                        "--opaque-ports lists a port the policy gives HTTP rules; serving HTTP"
                    );
                }
                false
            }
        },
        None => configured,
    }
}

/// The audit event of a connection on an HTTP port that never spoke HTTP.
fn audit_not_http(shared: &Shared, info: &ConnInfo, reason: &str, started: Instant) {
    let policy = shared.config.policy.current();
    let engine = policy.as_ref().map(|p| &p.engine);
    let connection_id = crate::pipeline::request_id::generate();
    AuditEvent {
        request_id: connection_id.to_str().unwrap_or_default(),
        source_identity: info.peer.as_ref().map(SpiffeId::as_str),
        source_ip: Some(info.peer_addr),
        destination_port: info.app.port(),
        method: "-",
        allowed: false,
        reason,
        latency: started.elapsed(),
        ..AuditEvent::under(engine)
    }
    .record(&shared.config.audit, engine);
}

/// Reason codes of connections closed before any request.
pub mod reason {
    /// The first bytes on an HTTP port cannot start an HTTP request.
    pub const NOT_HTTP: &str = "protocol.not_http";
    /// Nothing that decides the protocol within the detection timeout.
    pub const DETECT_TIMEOUT: &str = "protocol.detect_timeout";
}

/// Serves the connection as opaque TCP if its port is declared so;
/// otherwise as HTTP/1 or HTTP/2 (from ALPN or the first bytes), closing
/// and auditing a connection that does not speak HTTP.
async fn dispatch<IO>(
    shared: Arc<Shared>,
    mut io: IO,
    info: ConnInfo,
    alpn: Option<Detected>,
    drain: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if serves_opaque(&shared, info.app.port()) {
        return tcp::proxy(shared, io, info).await;
    }
    let (detected, prefix) = match alpn {
        Some(d) => (d, Vec::new()),
        None => {
            let started = Instant::now();
            match detect::sniff(&mut io, shared.config.detect_timeout).await {
                Ok(Sniffed::Decided(Detected::NotHttp, _)) => {
                    tracing::info!(peer = %info.peer_addr, port = info.app.port(), "not HTTP on an HTTP port; closing");
                    audit_not_http(&shared, &info, reason::NOT_HTTP, started);
                    return;
                }
                Ok(Sniffed::Decided(d, prefix)) => (d, prefix),
                Ok(Sniffed::Silent { bytes }) => {
                    tracing::info!(peer = %info.peer_addr, port = info.app.port(), bytes, "no HTTP request within the detection timeout; closing");
                    audit_not_http(&shared, &info, reason::DETECT_TIMEOUT, started);
                    return;
                }
                Ok(Sniffed::Closed { bytes: 0 }) => {
                    tracing::debug!(peer = %info.peer_addr, "closed before sending anything");
                    return;
                }
                Ok(Sniffed::Closed { .. }) => {
                    tracing::debug!(peer = %info.peer_addr, "closed before a request line");
                    audit_not_http(&shared, &info, reason::NOT_HTTP, started);
                    return;
                }
                Err(e) => {
                    tracing::debug!(peer = %info.peer_addr, error = %e, "detection read failed");
                    return;
                }
            }
        }
    };
    let io = detect::Rewind::new(prefix, io);
    match detected {
        Detected::Http2 => serve_h2(shared, io, info, drain).await,
        Detected::Http1 | Detected::NotHttp => serve_h1(shared, io, info, drain).await,
    }
}

async fn serve_h1<IO>(shared: Arc<Shared>, io: IO, info: ConnInfo, mut drain: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, verdicts) = H1Guard::new(io, shared.config.limits.max_header_bytes);
    let service = service(shared.clone(), info, Some(verdicts));
    let conn = shared
        .h1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    serve_until_drained(conn, |c| c.graceful_shutdown(), &mut drain, "HTTP/1").await;
}

async fn serve_h2<IO>(shared: Arc<Shared>, io: IO, info: ConnInfo, mut drain: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service(shared.clone(), info, None);
    let conn = shared.h2.serve_connection(TokioIo::new(io), service);
    serve_until_drained(conn, |c| c.graceful_shutdown(), &mut drain, "HTTP/2").await;
}

/// Drives `conn` to its end; once the listener drains, asks it to finish
/// gracefully (`graceful_shutdown`) and waits for that.
async fn serve_until_drained<C, E>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    drain: &mut watch::Receiver<bool>,
    protocol: &str,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drained(drain) => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "inbound {protocol} connection ended with an error");
    }
}

/// Completes once the listener drains (or is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    // The guard the wait returns must not live across an await.
    let _ = drain.wait_for(|d| *d).await;
}

/// The hyper service of one connection. `verdicts`: the HTTP/1 framing
/// guard's, one per request in order.
fn service(
    shared: Arc<Shared>,
    info: ConnInfo,
    verdicts: Option<HeadVerdicts>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = ResetStream,
    Future = impl Future<Output = Result<Response<ProxyBody>, ResetStream>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    let info = Arc::new(info);
    service_fn(move |req| {
        // Taken now, in request order (the future may run later).
        let framing = verdicts
            .as_ref()
            .map_or(HeadVerdict::Ok, HeadVerdicts::next);
        let shared = shared.clone();
        let info = info.clone();
        async move { request::serve(&shared, &info, req, framing).await }
    })
}

#[cfg(test)]
mod robustness;
