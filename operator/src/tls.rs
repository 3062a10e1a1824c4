//! The operator's TLS endpoint: its serving certificate (issued by its own
//! CA, renewed before expiry and swapped without a restart), the rustls
//! server configuration, and the stream of accepted TLS connections tonic
//! serves on.
//!
//! When the CA in force changes (local mode re-reads its files), the
//! serving certificate is re-issued from the new CA and the client
//! certificate roots are rebuilt from the new bundle, both at once; new
//! connections get them, established ones keep what they negotiated.

use std::io;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use palisade_policy::identity::SpiffeId;

use crate::ca::reload::CurrentCa;
use crate::ca::{Ca, CaError, LeafProfile};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] CaError),
    #[error("generating the serving key: {0}")]
    Key(rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid serving name: {0}")]
    Name(String),
    #[error("client certificate verifier: {0}")]
    ClientVerifier(String),
}

/// The names in the operator's serving certificate: its SPIFFE ID, the
/// in-cluster Service name, and loopback for local mode.
pub fn serving_profile(
    trust_domain: &str,
    namespace: &str,
    ttl: Duration,
) -> Result<LeafProfile, TlsError> {
    let spiffe_id =
        SpiffeId::for_service_account(trust_domain, namespace, crate::OPERATOR_SERVICE_ACCOUNT)
            .map_err(|e| TlsError::Name(e.to_string()))?;
    Ok(LeafProfile {
        spiffe_id,
        dns_names: vec![
            format!("{}.{namespace}.svc", crate::OPERATOR_SERVICE_ACCOUNT),
            "localhost".to_owned(),
        ],
        ip_addresses: vec![IpAddr::from([127, 0, 0, 1])],
        ttl,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Issues a serving certificate with a fresh in-memory key. Returns it with
/// its expiry.
pub fn issue_serving_cert(
    ca: &Ca,
    profile: &LeafProfile,
) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::Key)?;
    let now = SystemTime::now();
    let leaf = ca.issue(&key, profile, now)?;
    let mut chain = vec![leaf.der.clone()];
    chain.extend(ca.intermediates().iter().cloned());
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(chain, private, &provider())?;
    Ok((Arc::new(certified), leaf.not_after))
}

/// Serves whatever certificate was stored last, so renewal is a pointer swap.
#[derive(Debug)]
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl RotatingCert {
    pub fn new(initial: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(initial),
        }
    }

    pub fn replace(&self, next: Arc<CertifiedKey>) {
        // A poisoned lock still holds a valid Arc; keep serving with it.
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// TLS 1.3 preferred, 1.2 minimum, HTTP/2 only (gRPC). Client
/// certificates are requested but optional: `Identity.Certify` callers come
/// here before they have one, while `Discovery.Watch` requires one. A
/// certificate that is presented must chain to `client_roots` (the CA's
/// trust bundle) or the handshake fails; the services read the identity.
pub fn server_config(
    resolver: Arc<RotatingCert>,
    client_roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in client_roots {
        roots.add(root.clone())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session skips client-certificate
    // verification, so an expired agent certificate could live on.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The acceptor new connections use; swapped when the client roots change.
pub struct CurrentAcceptor {
    current: RwLock<TlsAcceptor>,
}

impl CurrentAcceptor {
    pub fn new(initial: TlsAcceptor) -> Self {
        Self {
            current: RwLock::new(initial),
        }
    }

    pub fn get(&self) -> TlsAcceptor {
        // A poisoned lock still holds a valid acceptor.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, next: TlsAcceptor) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
    }
}

/// Renews the serving certificate at 70 % of its lifetime, and at once when
/// the CA changes (then also the client roots), forever. On failure it
/// retries every few seconds and keeps serving the old one.
pub async fn renew_forever(
    ca: CurrentCa,
    profile: LeafProfile,
    resolver: Arc<RotatingCert>,
    acceptor: Arc<CurrentAcceptor>,
    mut not_after: SystemTime,
) {
    let mut changes = ca.subscribe();
    let mut watching = true;
    loop {
        let lifetime = profile.ttl;
        let renew_at = not_after
            .checked_sub(lifetime.mul_f64(0.3))
            .unwrap_or(not_after);
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(1));
        let ca_changed = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            changed = changes.changed(), if watching => {
                // Cannot happen while `ca` is held; stop watching rather
                // than spin if it ever does.
                watching = changed.is_ok();
                watching
            }
        };
        let current = ca.get();
        if ca_changed {
            // The old roots must stop admitting client certificates, and
            // new ones must admit them, from the next handshake on.
            match server_config(resolver.clone(), current.trust_bundle()) {
                Ok(config) => {
                    acceptor.replace(TlsAcceptor::from(config));
                    tracing::info!(
                        roots = current.trust_bundle().len(),
                        "client certificate roots follow the reloaded CA"
                    );
                }
                Err(e) => tracing::error!(error = %e,
                    "cannot use the reloaded trust bundle for client certificates; the previous roots stay in force"),
            }
        }
        match issue_serving_cert(&current, &profile) {
            Ok((cert, expiry)) => {
                resolver.replace(cert);
                not_after = expiry;
                if ca_changed {
                    tracing::info!(
                        "re-issued the operator's serving certificate from the reloaded CA"
                    );
                } else {
                    tracing::info!("renewed the operator's serving certificate");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "renewing the serving certificate failed; retrying");
                not_after = SystemTime::now() + lifetime.mul_f64(0.3) / 10;
            }
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a
/// slow client cannot hold up the others), yielding finished TLS streams.
pub fn incoming(
    listener: TcpListener,
    acceptor: Arc<CurrentAcceptor>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The server has stopped reading connections: stop accepting.
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.get();
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
