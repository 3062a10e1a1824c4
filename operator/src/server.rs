//! The operator's gRPC endpoint (port 15012): TLS with a certificate from
//! its own CA, serving `Identity` and `Discovery`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::compile::MeshConfig;
use palisade_proto::discovery::v1::discovery_server::DiscoveryServer;
use palisade_proto::identity::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::reload::CurrentCa;
use crate::discovery::{DiscoveryService, DiscoveryStatus};
use crate::identity::{IdentityService, IssuanceCounters};
use crate::tls::{self, CurrentAcceptor, RotatingCert, TlsError};
use crate::tokens::TokenValidator;

/// gRPC messages here are small (a token and a CSR).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// The operator's namespace (names its serving identity).
    pub namespace: String,
    /// Maximum (and default) workload certificate lifetime.
    pub cert_ttl: Duration,
}

/// A bound, not yet serving endpoint; `local_addr` is known so the caller
/// can announce it before serving.
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: Arc<CurrentAcceptor>,
    service: IdentityService,
    /// `None` until [`Server::with_discovery`]; then Watch answers
    /// FAILED_PRECONDITION (no policy source).
    discovery: Option<DiscoveryService>,
    trust_domain: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Server {
    /// `ca` is read at each use, so a [`CurrentCa`] kept up to date by
    /// [`crate::ca::reload::ReloadingCa`] changes issuance, the serving
    /// certificate and the client roots without a restart.
    pub async fn bind(
        config: &ServeConfig,
        ca: impl Into<CurrentCa>,
        tokens: Arc<dyn TokenValidator>,
        counters: Arc<IssuanceCounters>,
    ) -> Result<Self, ServeError> {
        let profile =
            tls::serving_profile(&config.trust_domain, &config.namespace, config.cert_ttl)?;
        let ca: CurrentCa = ca.into();
        let initial = ca.get();
        let (cert, not_after) = tls::issue_serving_cert(&initial, &profile)?;
        let resolver = Arc::new(RotatingCert::new(cert));
        let acceptor = Arc::new(CurrentAcceptor::new(TlsAcceptor::from(tls::server_config(
            resolver.clone(),
            initial.trust_bundle(),
        )?)));
        let renewal = tokio::spawn(tls::renew_forever(
            ca.clone(),
            profile,
            resolver,
            acceptor.clone(),
            not_after,
        ));
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
        let service = IdentityService::new(
            ca,
            tokens,
            config.trust_domain.clone(),
            config.cert_ttl,
            counters,
        );
        Ok(Self {
            listener,
            local_addr,
            acceptor,
            service,
            discovery: None,
            trust_domain: config.trust_domain.clone(),
            renewal,
        })
    }

    /// Serves `Discovery.Watch` with this service (policies from a source).
    pub fn with_discovery(mut self, discovery: DiscoveryService) -> Self {
        self.discovery = Some(discovery);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let identity =
            IdentityServer::new(self.service).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let discovery = self.discovery.unwrap_or_else(|| {
            let mesh = MeshConfig {
                trust_domain: self.trust_domain.clone(),
                ..MeshConfig::default()
            };
            DiscoveryService::new(mesh, None, Arc::new(DiscoveryStatus::new()))
        });
        // Agents only send ACK/NACKs; policies go the other way.
        let discovery =
            DiscoveryServer::new(discovery).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let result = tonic::transport::Server::builder()
            // Watch streams live for hours: notice dead agents (and let
            // them notice a dead operator) without waiting for TCP.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(identity)
            .add_service(discovery)
            .serve_with_incoming_shutdown(tls::incoming(self.listener, self.acceptor), shutdown)
            .await;
        self.renewal.abort();
        Ok(result?)
    }
}
