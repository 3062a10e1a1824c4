//! The inbound proxy (DESIGN §6): accept a connection (explicit mode: on one
//! listen address for one app; transparent mode: redirected by iptables, the
//! app being the original destination), terminate mTLS, run every request
//! through the pipeline and the policy engine, and forward what is allowed
//! to the app.
//!
//! The steps live one per module:
//! - this file: accept → TLS (strict or permissive per port) → serve;
//! - [`request`]: strip → request id → authenticate → decide → global rate
//!   limits → forward → response headers → audit;
//! - [`forward`]: the connection to the app.
//!
//! Never panics on peer input: every failure becomes a logged connection
//! close or a fixed deny body.

pub mod forward;
pub mod policy;
pub mod request;

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use palisade_policy::identity::SpiffeId;
use palisade_policy::wire;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::identity::CertStore;
use crate::ratelimit::GlobalRateLimiter;
use crate::tls::{MeshTrust, MtlsMode, TlsConfigError, peer_identity};

pub use policy::{LoadedPolicy, SharedPolicy};
pub use request::ProxyBody;

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
        }
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
}

/// One accepted connection: who is on the other end, and where its
/// requests go.
pub(crate) struct ConnInfo {
    pub(crate) peer_addr: IpAddr,
    /// The verified mTLS peer and its leaf certificate (DER, for XFCC).
    pub(crate) peer: Option<(SpiffeId, Option<Vec<u8>>)>,
    /// The app address for this connection.
    pub(crate) app: SocketAddr,
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
        let shared = Arc::new(Shared {
            strict: tls(MtlsMode::Strict)?,
            permissive: tls(MtlsMode::Permissive)?,
            config,
            started: Instant::now(),
        });
        let listener = TcpListener::bind(listen).await?;
        Ok(Self { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    let shared = self.shared.clone();
                    tokio::spawn(connection(shared, tcp, peer));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off, never exit.
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
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

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer_addr: SocketAddr) {
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
                let info = ConnInfo {
                    peer_addr: peer_addr.ip(),
                    peer: None,
                    app,
                };
                serve(shared, TokioIo::new(tcp), info).await;
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
        Ok(id) => id.map(|id| {
            let der = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            (id, der)
        }),
        Err(e) => {
            tracing::debug!(peer = %peer_addr, error = %e, "no usable peer identity");
            return;
        }
    };
    let info = ConnInfo {
        peer_addr: peer_addr.ip(),
        peer,
        app,
    };
    serve(shared, TokioIo::new(tls), info).await;
}

async fn serve<IO>(shared: Arc<Shared>, io: TokioIo<IO>, info: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(request::handle(&shared, &info, req).await) }
    });
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "inbound connection ended with an error");
    }
}
