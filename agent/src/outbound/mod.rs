//! The outbound proxy (DESIGN §6): plaintext TCP from the local app in,
//! mTLS to meshed destinations out, the server's SPIFFE ID verified.
//!
//! It is a **connection-level tunnel**: it never parses HTTP. The inbound
//! agent at the other end does all HTTP enforcement (it has the policy, the
//! verified client identity, and must not trust anything the client side
//! decided anyway), so parsing here would only add latency and ways to
//! disagree about framing. Whatever the app speaks — HTTP/1.1, h2c with prior
//! knowledge (HTTP/2, gRPC with streaming and trailers), WebSocket, opaque
//! TCP — crosses unchanged. The one thing taken from the app's bytes is the
//! ALPN protocol to offer ([`detect`]), from a peek that consumes nothing.
//! `docs/outbound.md` has the whole story.
//!
//! Per connection:
//!
//! 1. destination: fixed (explicit mode, `--outbound LISTEN=DEST`) or the
//!    original destination of a connection iptables redirected (transparent
//!    mode, [`crate::orig_dst`]); a connection to the listener itself is a
//!    loop and is refused;
//! 2. [`DestinationTable`] lookup, the `--mesh-destination` flags first, then
//!    the table discovery pushed ([`DiscoveredDestinations`], read once per
//!    connection so a push applies to the next one): meshed → mTLS; unmatched
//!    (transparent mode only) → plain TCP passthrough or deny, as configured;
//!    an explicit destination neither covers accepts any identity of the
//!    trust domain;
//! 3. mTLS: our current certificate from the [`CertStore`] (renewals apply to
//!    new connections), the mesh trust bundle, the expected SPIFFE ID pinned
//!    in the verifier; any failure closes the app's connection — a meshed
//!    destination is never reached in plaintext;
//! 4. bytes copied both ways until both sides are done (half-close kept).
//!
//! Never panics on peer input; every failure is a logged connection close.

pub mod destinations;
pub mod detect;
pub mod discovered;
pub mod metrics;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::identity::SpiffeId;
use parking_lot::Mutex;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::identity::CertStore;
use crate::orig_dst::original_dst;
use crate::tls::{MeshTrust, TlsConfigError};

pub use destinations::{
    DestinationEntry, DestinationParseError, DestinationTable, ExpectedPeer, IpNetwork,
};
pub use detect::{Alpn, detect_alpn};
pub use discovered::{DestinationSources, DiscoveredDestinations, DiscoveredTable};
pub use metrics::{OutboundMetrics, OutboundOutcome};

/// What an explicit destination no table covers must present.
static ANY_IN_TRUST_DOMAIN: ExpectedPeer = ExpectedPeer::AnyInTrustDomain;

/// Beyond this many cached TLS connectors the cache starts over: with
/// discovery the identities seen change over a long life.
const MAX_CONNECTORS: usize = 1024;

/// DESIGN §6: the outbound listener's port in transparent mode.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// What happens to a connection (transparent mode) whose original
/// destination is in no [`DestinationTable`] entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnmatchedPolicy {
    /// Plain TCP straight to the original destination (Istio's `ALLOW_ANY`):
    /// the app keeps reaching the outside world and unmeshed services.
    #[default]
    Passthrough,
    /// Close the app's connection and log (Istio's `REGISTRY_ONLY`).
    Deny,
}

impl FromStr for UnmatchedPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "passthrough" => Ok(Self::Passthrough),
            "deny" => Ok(Self::Deny),
            other => Err(format!("{other:?} is not passthrough or deny")),
        }
    }
}

/// Where a listener's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundTarget {
    /// Explicit mode: always this destination, always meshed.
    Fixed(SocketAddr),
    /// Transparent mode: each connection's `SO_ORIGINAL_DST`.
    OriginalDst,
}

/// What the proxy needs besides the listening socket.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    pub trust: MeshTrust,
    /// Our certificate, presented to every destination; read per handshake,
    /// so a renewed certificate is used by the next connection.
    pub certs: Arc<CertStore>,
    /// `--mesh-destination` flags: consulted first, so they override discovery.
    pub destinations: Arc<DestinationTable>,
    /// The table discovery pushes; `None`: no discovery configured.
    pub discovered: Option<DiscoveredDestinations>,
    /// Transparent mode only: explicit destinations are always meshed.
    pub unmatched: UnmatchedPolicy,
    /// Longest the TCP connect to a destination may take.
    pub connect_timeout: Duration,
    /// Longest the TLS handshake with a destination may take.
    pub handshake_timeout: Duration,
    /// Longest to wait for the app's first bytes to choose ALPN; a
    /// server-first protocol pays this once per connection.
    pub detect_timeout: Duration,
    pub metrics: Arc<OutboundMetrics>,
}

impl OutboundConfig {
    pub fn new(trust: MeshTrust, certs: Arc<CertStore>, destinations: DestinationTable) -> Self {
        Self {
            trust,
            certs,
            destinations: Arc::new(destinations),
            discovered: None,
            unmatched: UnmatchedPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_millis(200),
            metrics: Arc::default(),
        }
    }

    /// Also consults `discovered` for destinations the flags do not cover.
    pub fn with_discovered(mut self, discovered: DiscoveredDestinations) -> Self {
        self.discovered = Some(discovered);
        self
    }

    /// Both tables, for `/config_dump` and `/metrics`.
    pub fn destination_sources(&self) -> DestinationSources {
        DestinationSources {
            flags: self.destinations.clone(),
            discovered: self.discovered.clone(),
        }
    }

    /// Whom the server at `dest` must be now: the flags' entry, else
    /// discovery's; `None` when neither covers it.
    pub fn expected_peer(&self, dest: SocketAddr) -> Option<ExpectedPeer> {
        let (ip, port) = (dest.ip(), dest.port());
        self.destinations.lookup(ip, port).cloned().or_else(|| {
            let current = self.discovered.as_ref()?.current();
            current.table.lookup(ip, port).cloned()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(
        "mesh destination {entry} names an identity outside trust domain {trust_domain:?}: \
         its certificate could never be verified"
    )]
    ForeignTrustDomain { entry: String, trust_domain: String },
    #[error("the destination {0} is the outbound listener itself")]
    Loop(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// Where connections of one listener go. Whom the destination must be is
/// looked up per connection, so a discovery push applies to the next one.
#[derive(Debug)]
enum Route {
    Fixed(SocketAddr),
    OriginalDst,
}

/// One TLS connector per (pinned identity, ALPN): building a rustls config
/// per connection would be wasted work, and the certificate and bundle are
/// read per handshake anyway. The key space is bounded by the table.
type ConnectorCache = Mutex<HashMap<(Option<SpiffeId>, Alpn), TlsConnector>>;

struct Shared {
    config: OutboundConfig,
    route: Route,
    /// The bound listener address, for loop detection.
    listen: SocketAddr,
    connectors: ConnectorCache,
}

/// A bound outbound listener; [`run`](Self::run) serves it.
pub struct OutboundProxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl OutboundProxy {
    /// Binds `listen`. Fails (at start, not per connection) on a table entry
    /// of another trust domain, a fixed destination that is the listener
    /// itself, or a TLS configuration rustls refuses. An explicit destination
    /// no table covers accepts any identity of the trust domain (warned about
    /// here when no flag covers it and discovery is not configured).
    pub async fn bind(
        listen: SocketAddr,
        target: OutboundTarget,
        config: OutboundConfig,
    ) -> Result<Self, OutboundError> {
        let trust_domain = config.trust.trust_domain();
        if let Some(entry) = config.destinations.entries().iter().find(|e| {
            e.peer
                .pinned()
                .is_some_and(|id| id.trust_domain() != trust_domain)
        }) {
            return Err(OutboundError::ForeignTrustDomain {
                entry: entry.to_string(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        // Refuse a configuration rustls would refuse now, not on the first connection.
        config.trust.client_config(None, None)?;

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| OutboundError::Bind {
                addr: listen,
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| OutboundError::Bind {
                addr: listen,
                source,
            })?;
        let route = match target {
            OutboundTarget::Fixed(dest) => {
                if dest == bound {
                    return Err(OutboundError::Loop(dest));
                }
                let flagged = config.destinations.lookup(dest.ip(), dest.port()).is_some();
                if !flagged && config.discovered.is_none() {
                    tracing::warn!(
                        %dest,
                        trust_domain,
                        "no --mesh-destination covers this --outbound destination: \
                         any workload identity of the trust domain is accepted"
                    );
                }
                Route::Fixed(dest)
            }
            OutboundTarget::OriginalDst => Route::OriginalDst,
        };
        Ok(Self {
            listener,
            shared: Arc::new(Shared {
                config,
                route,
                listen: bound,
                connectors: Mutex::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Explicit mode: the destination (whom it must be may change with
    /// discovery: [`OutboundConfig::expected_peer`]).
    pub fn fixed_destination(&self) -> Option<SocketAddr> {
        match &self.shared.route {
            Route::Fixed(dest) => Some(*dest),
            Route::OriginalDst => None,
        }
    }

    pub fn metrics(&self) -> &Arc<OutboundMetrics> {
        &self.shared.config.metrics
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    tokio::spawn(connection(self.shared.clone(), tcp, peer));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off, never exit.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Shared {
    fn record(&self, outcome: OutboundOutcome) {
        self.config.metrics.record(outcome);
    }

    fn connector(
        &self,
        pinned: Option<&SpiffeId>,
        alpn: Alpn,
    ) -> Result<TlsConnector, TlsConfigError> {
        let key = (pinned.cloned(), alpn);
        if let Some(c) = self.connectors.lock().get(&key) {
            return Ok(c.clone());
        }
        let certs: Arc<dyn ResolvesClientCert> = self.config.certs.clone();
        let mut config = self
            .config
            .trust
            .client_config(Some(certs), key.0.clone())?;
        config.alpn_protocols = alpn.protocols();
        let connector = TlsConnector::from(Arc::new(config));
        let mut cache = self.connectors.lock();
        if cache.len() >= MAX_CONNECTORS {
            cache.clear();
        }
        cache.insert(key, connector.clone());
        Ok(connector)
    }

    /// A connection whose destination is this listener would come straight
    /// back here (and again, until file descriptors run out).
    fn is_loop(&self, dest: SocketAddr, local: Option<SocketAddr>) -> bool {
        if dest.port() != self.listen.port() {
            return false;
        }
        let ip = dest.ip().to_canonical();
        ip == self.listen.ip().to_canonical()
            || ip.is_loopback()
            || ip.is_unspecified()
            || local.is_some_and(|l| l.ip().to_canonical() == ip)
    }
}

async fn connection(shared: Arc<Shared>, app: TcpStream, app_addr: SocketAddr) {
    let _ = app.set_nodelay(true);
    let dest = match &shared.route {
        Route::Fixed(dest) => *dest,
        Route::OriginalDst => match original_dst(&app) {
            Ok(dest) => dest,
            Err(e) => {
                // Not redirected by iptables: we cannot know where it was going.
                tracing::warn!(app = %app_addr, error = %e, "no original destination; closing");
                shared.record(OutboundOutcome::Denied);
                return;
            }
        },
    };
    if shared.is_loop(dest, app.local_addr().ok()) {
        tracing::warn!(app = %app_addr, %dest, "connection loops back to the outbound listener; closing");
        shared.record(OutboundOutcome::Denied);
        return;
    }
    // Flags first (they override discovery), then one snapshot of the
    // discovered table, kept for this connection only.
    let discovered;
    let mut expected = shared.config.destinations.lookup(dest.ip(), dest.port());
    if expected.is_none()
        && let Some(d) = &shared.config.discovered
    {
        discovered = d.current();
        expected = discovered.table.lookup(dest.ip(), dest.port());
    }
    if expected.is_none() && matches!(shared.route, Route::Fixed(_)) {
        // Explicit mode is always meshed.
        expected = Some(&ANY_IN_TRUST_DOMAIN);
    }
    match expected {
        Some(peer) => mtls(&shared, app, dest, peer).await,
        None => match shared.config.unmatched {
            UnmatchedPolicy::Passthrough => passthrough(&shared, app, dest).await,
            UnmatchedPolicy::Deny => {
                tracing::warn!(
                    app = %app_addr,
                    %dest,
                    "destination is not meshed and --outbound-unmatched is deny; closing"
                );
                shared.record(OutboundOutcome::Denied);
            }
        },
    }
}

async fn connect(shared: &Shared, dest: SocketAddr) -> Option<TcpStream> {
    let outcome =
        tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(dest)).await;
    let reason = match outcome {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            return Some(tcp);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {:?}", shared.config.connect_timeout),
    };
    tracing::warn!(%dest, reason, "cannot connect to the destination; closing the app connection");
    shared.record(OutboundOutcome::ConnectFailed);
    None
}

async fn mtls(shared: &Shared, app: TcpStream, dest: SocketAddr, peer: &ExpectedPeer) {
    if shared.config.certs.current().is_none() {
        // Without a certificate the server would refuse us anyway; say why here.
        tracing::warn!(%dest, expected = %peer, "no workload certificate yet; closing the app connection");
        shared.record(OutboundOutcome::HandshakeFailed);
        return;
    }
    let alpn = detect_alpn(&app, shared.config.detect_timeout).await;
    let connector = match shared.connector(peer.pinned(), alpn) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%dest, expected = %peer, reason = %e, "cannot build the TLS client config; closing");
            shared.record(OutboundOutcome::HandshakeFailed);
            return;
        }
    };
    let Some(tcp) = connect(shared, dest).await else {
        return;
    };
    // Our verifier checks the SPIFFE ID, never a host name, and the inbound
    // agent picks its certificate without looking at SNI; an IP server name
    // makes rustls send no SNI at all, so nothing about the destination
    // leaks in clear text beyond the IP the packets already carry.
    let name = ServerName::IpAddress(dest.ip().into());
    let tls = match tokio::time::timeout(
        shared.config.handshake_timeout,
        connector.connect(name, tcp),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(
                %dest,
                expected = %peer,
                reason = %e,
                "mTLS handshake failed; closing the app connection (no plaintext fallback)"
            );
            shared.record(OutboundOutcome::HandshakeFailed);
            return;
        }
        Err(_) => {
            tracing::warn!(
                %dest,
                expected = %peer,
                reason = "handshake timed out",
                "mTLS handshake failed; closing the app connection (no plaintext fallback)"
            );
            shared.record(OutboundOutcome::HandshakeFailed);
            return;
        }
    };
    shared.record(OutboundOutcome::Mtls);
    tracing::debug!(%dest, expected = %peer, alpn = alpn.as_str(), "mTLS tunnel established");
    tunnel(app, tls, dest).await;
}

async fn passthrough(shared: &Shared, app: TcpStream, dest: SocketAddr) {
    let Some(upstream) = connect(shared, dest).await else {
        return;
    };
    shared.record(OutboundOutcome::Passthrough);
    tracing::debug!(%dest, "unmatched destination: plain TCP passthrough");
    tunnel(app, upstream, dest).await;
}

/// Copies both ways until both directions are done. When one side finishes
/// sending, the other side's write half is shut down (for TLS: close_notify,
/// then TCP FIN), and the opposite direction keeps flowing.
async fn tunnel<U>(mut app: TcpStream, mut upstream: U, dest: SocketAddr)
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(%dest, sent, received, "outbound connection finished");
        }
        Err(e) => match rustls_error(&e) {
            // TLS 1.3 clients finish before the server judges their
            // certificate, so its refusal arrives here as an alert.
            Some(rustls::Error::AlertReceived(alert)) => {
                tracing::warn!(%dest, reason = ?alert, "the destination refused the connection");
            }
            _ => tracing::debug!(%dest, error = %e, "outbound connection ended with an error"),
        },
    }
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmatched_policy_parses() {
        assert_eq!("passthrough".parse(), Ok(UnmatchedPolicy::Passthrough));
        assert_eq!("deny".parse(), Ok(UnmatchedPolicy::Deny));
        assert!(
            "allow"
                .parse::<UnmatchedPolicy>()
                .unwrap_err()
                .contains("allow")
        );
        assert_eq!(UnmatchedPolicy::default(), UnmatchedPolicy::Passthrough);
    }
}

#[cfg(test)]
mod robustness;
