//! `palisade-collector serve`: the mesh identity, the store, and the three
//! listeners (ingest over mTLS, the query API over TLS, the plain admin
//! endpoint with probes and metrics).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use palisade_agent::identity::{CertStore, Renewer};
use palisade_agent::sidecar::IdentityOrigin;
use palisade_agent::tls::{MeshTrust, MtlsMode, SharedTrustBundle, TrustBundle};
use palisade_proto::audit::v1::audit_server::AuditServer;
use rustls::server::ResolvesServerCert;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{QueryAccess, QueryApi};
use crate::ingest::{AuditService, Ingest};
use crate::metrics::CollectorMetrics;
use crate::observers::Observers;
use crate::store::{AuditStore, Retention};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch of 10,000 events of a few hundred bytes each fits.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

pub struct ServeConfig {
    pub trust_bundle: std::path::PathBuf,
    pub trust_domain: String,
    pub identity: IdentityOrigin,
    pub store: String,
    pub listen: SocketAddr,
    pub query_listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub access: QueryAccess,
    pub retention: Retention,
    pub observers: Observers,
}

/// A running collector: its bound addresses, and the tasks serving them.
pub struct Collector {
    pub listen: SocketAddr,
    pub query_listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    ingest_server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    renewer: Option<Renewer>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("trust bundle: {0}")]
    Bundle(#[from] palisade_agent::tls::BundleError),
    #[error("TLS: {0}")]
    Tls(#[from] palisade_agent::tls::TlsConfigError),
    #[error("identity: {0}")]
    Identity(#[from] palisade_agent::sidecar::IdentityOriginError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the ingest server stopped: {0}")]
    Server(String),
}

impl Collector {
    pub async fn start(config: ServeConfig) -> Result<Self, ServeError> {
        let bundle = TrustBundle::from_pem_file(&config.trust_bundle)?;
        let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &config.trust_domain)?;
        let certs = Arc::new(CertStore::new());
        let renewer = config
            .identity
            .provision(&trust, &config.trust_domain, &certs)?;
        let store = Arc::new(AuditStore::open(&config.store).await?);
        let metrics = Arc::new(CollectorMetrics::default());
        let ingest = Ingest::new(
            store.clone(),
            metrics.clone(),
            config.observers,
            &config.trust_domain,
        );
        let resolver: Arc<dyn ResolvesServerCert> = certs.clone();
        let mut tasks = Vec::new();

        let listener = bind(config.listen).await?;
        let listen = local_addr(&listener, config.listen)?;
        let strict = TlsAcceptor::from(Arc::new(
            trust.server_config(resolver.clone(), MtlsMode::Strict)?,
        ));
        let service = AuditServer::new(AuditService::new(ingest.clone(), &config.trust_domain))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let ingest_server = tokio::spawn(
            tonic::transport::Server::builder()
                // Report streams live for hours: notice dead agents.
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(service)
                .serve_with_incoming(incoming(listener, strict)),
        );
        tracing::info!(listen = %listen, store = %redacted(&config.store), "audit ingest listening");

        let mut query_listen = None;
        if let Some(addr) = config.query_listen {
            let listener = bind(addr).await?;
            query_listen = Some(local_addr(&listener, addr)?);
            let acceptor = TlsAcceptor::from(Arc::new(
                trust.server_config(resolver, MtlsMode::Permissive)?,
            ));
            let api = Arc::new(QueryApi::new(
                ingest.clone(),
                config.access,
                metrics.clone(),
            ));
            tasks.push(tokio::spawn(api.serve(
                listener,
                acceptor,
                config.trust_domain.clone(),
            )));
            tracing::info!(listen = ?query_listen, "query API listening");
        }

        let mut admin = None;
        if let Some(addr) = config.admin {
            let listener = bind(addr).await?;
            admin = Some(local_addr(&listener, addr)?);
            let ingest = ingest.clone();
            let certs = certs.clone();
            tasks.push(tokio::spawn(serve_admin(listener, move |path| {
                admin_answer(path, &certs, &ingest, &metrics)
            })));
        }

        if config.retention != Retention::default() {
            let retention = config.retention;
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(RETENTION_EVERY);
                loop {
                    every.tick().await;
                    match store
                        .apply_retention(retention, crate::ingest::now_us())
                        .await
                    {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "retention removed old records"),
                        Err(e) => tracing::warn!(error = %e, "retention failed"),
                    }
                }
            }));
        }
        Ok(Self {
            listen,
            query_listen,
            admin,
            ingest_server,
            renewer,
            tasks,
        })
    }

    /// Serves until the ingest server or the certificate renewer stops.
    pub async fn run(mut self) -> Result<(), ServeError> {
        let renewer = self.renewer.take();
        let result = tokio::select! {
            served = &mut self.ingest_server => match served {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ServeError::Server(e.to_string())),
                Err(e) => Err(ServeError::Server(e.to_string())),
            },
            () = async { match renewer { Some(r) => r.run().await, None => std::future::pending().await } } => {
                Err(ServeError::Server("the certificate renewer stopped".into()))
            }
        };
        for task in &self.tasks {
            task.abort();
        }
        result
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.ingest_server.abort();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A PostgreSQL address may carry a password: never log it.
fn redacted(store: &str) -> String {
    match store.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => store.to_owned(),
        },
        None => store.to_owned(),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
    listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a
/// slow client cannot hold up the others).
fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// `/healthz` (the process answers), `/readyz` (a certificate is installed),
/// `/metrics` (Prometheus text).
fn admin_answer(
    path: &str,
    certs: &CertStore,
    ingest: &Ingest,
    metrics: &CollectorMetrics,
) -> (StatusCode, String) {
    match path {
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" if certs.is_ready() => (StatusCode::OK, "ready\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no workload certificate yet\n".into(),
        ),
        "/metrics" => {
            let mut out = String::new();
            metrics.render(&mut out);
            ingest.render_observer_metrics(&mut out);
            (StatusCode::OK, out)
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

async fn serve_admin<F>(listener: TcpListener, answer: F)
where
    F: Fn(&str) -> (StatusCode, String) + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (status, body) = answer(req.uri().path());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("postgres://audit:hunter2@db:5432/audit"),
            "postgres://…@db:5432/audit"
        );
        assert_eq!(redacted("/var/lib/audit.db"), "/var/lib/audit.db");
    }
}
