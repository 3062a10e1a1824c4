//! `Identity.Certify` against the operator: token + CSR in, a verified leaf
//! (and possibly a new trust bundle) out.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::identity::SpiffeId;
use palisade_proto::identity::v1::CertifyRequest;
use palisade_proto::identity::v1::identity_client::IdentityClient as GrpcClient;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::Endpoint;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::connector::OperatorConnector;
use super::key::{KeyError, WorkloadKey};
use super::store::{IssuedCert, IssuedCertError};
use crate::tls::{BundleError, MeshTrust, TlsConfigError, TrustBundle, Usage, VerifyError};

/// Where the proof of identity comes from. A file is re-read for every request
/// because projected ServiceAccount tokens are rotated by the kubelet.
#[derive(Clone)]
pub enum TokenSource {
    File(PathBuf),
    Static(String),
}

// Tokens are secrets: never print them.
impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Static(_) => f.write_str("Static(redacted)"),
        }
    }
}

impl TokenSource {
    fn read(&self) -> Result<String, CertifyError> {
        let token = match self {
            Self::File(path) => {
                std::fs::read_to_string(path).map_err(|source| CertifyError::Token {
                    path: path.display().to_string(),
                    source,
                })?
            }
            Self::Static(t) => t.clone(),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(CertifyError::EmptyToken);
        }
        Ok(token.to_owned())
    }
}

#[derive(Clone, Debug)]
pub struct IdentityClientConfig {
    /// `HOST:PORT` of the operator's identity service.
    pub operator_address: String,
    /// When set, the operator's certificate must carry exactly this SPIFFE ID.
    pub operator_id: Option<SpiffeId>,
    pub token: TokenSource,
    /// `None`: the operator's default lifetime.
    pub requested_ttl: Option<Duration>,
    /// Bound on connecting plus the request.
    pub timeout: Duration,
}

impl IdentityClientConfig {
    pub fn new(operator_address: impl Into<String>, token: TokenSource) -> Self {
        Self {
            operator_address: operator_address.into(),
            operator_id: None,
            token,
            requested_ttl: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the token file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("the token is empty")]
    EmptyToken,
    #[error("operator address {0:?} is not HOST:PORT")]
    Address(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot reach the operator: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the operator refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("malformed response: {0}")]
    Response(String),
    #[error("trust bundle in the response: {0}")]
    Bundle(#[from] BundleError),
    #[error("issued certificate does not verify: {0}")]
    Verify(#[from] VerifyError),
    #[error("issued certificate is not for our key")]
    KeyMismatch,
    #[error("the response names {claimed} but the certificate carries {in_cert}")]
    IdMismatch { claimed: String, in_cert: String },
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Issued(#[from] IssuedCertError),
}

/// A verified certificate, and the trust bundle the operator sent with it.
#[derive(Debug)]
pub struct Certified {
    pub cert: IssuedCert,
    pub trust_bundle: Option<TrustBundle>,
}

/// Talks to the operator's identity service; one connection per request, since
/// requests are rare and each should see the current trust bundle.
#[derive(Clone)]
pub struct IdentityClient {
    config: IdentityClientConfig,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    trust: MeshTrust,
}

impl fmt::Debug for IdentityClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl IdentityClient {
    pub fn new(config: IdentityClientConfig, trust: MeshTrust) -> Result<Self, CertifyError> {
        let host = config
            .operator_address
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| CertifyError::Address(config.operator_address.clone()))?;
        // Only sent as SNI; the verifier checks the SPIFFE ID, not this name.
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| CertifyError::Address(config.operator_address.clone()))?;
        let mut tls = trust.client_config(None, config.operator_id.clone())?;
        tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        Ok(Self {
            config,
            server_name,
            tls: Arc::new(tls),
            trust,
        })
    }

    pub fn trust(&self) -> &MeshTrust {
        &self.trust
    }

    /// One `Certify` round trip with a fresh key.
    pub async fn certify(&self) -> Result<Certified, CertifyError> {
        let token = self.config.token.read()?;
        let key = WorkloadKey::generate()?;
        let csr_pem = key.csr_pem()?;

        let endpoint = Endpoint::from_shared(format!("http://{}", self.config.operator_address))
            .map_err(|_| CertifyError::Address(self.config.operator_address.clone()))?
            .connect_timeout(self.config.timeout)
            .timeout(self.config.timeout);
        let connector = OperatorConnector::new(
            self.config.operator_address.as_str().into(),
            self.server_name.clone(),
            self.tls.clone(),
        );
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(CertifyError::Connect)?;
        let ttl = self
            .config
            .requested_ttl
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let response = GrpcClient::new(channel)
            .certify(CertifyRequest {
                token,
                csr_pem,
                requested_ttl_seconds: ttl,
            })
            .await?
            .into_inner();

        let chain = parse_pem_certs(&response.cert_chain_pem)?;
        let trust_bundle = if response.trust_bundle_pem.is_empty() {
            None
        } else {
            Some(TrustBundle::from_pem_list(&response.trust_bundle_pem)?)
        };
        self.check_issued(&chain, trust_bundle.as_ref(), &key)?;

        let cert = IssuedCert::new(
            chain,
            key.signing_key(self.trust.provider())?,
            self.trust.trust_domain(),
        )?;
        if !response.spiffe_id.is_empty() && response.spiffe_id != cert.spiffe_id().as_str() {
            return Err(CertifyError::IdMismatch {
                claimed: response.spiffe_id,
                in_cert: cert.spiffe_id().to_string(),
            });
        }
        Ok(Certified { cert, trust_bundle })
    }

    /// The issued chain must verify (both as a server and as a client leaf)
    /// against the bundle we will use with it, and be for the key we hold —
    /// otherwise installing it would only break every later handshake.
    fn check_issued(
        &self,
        chain: &[CertificateDer<'static>],
        new_bundle: Option<&TrustBundle>,
        key: &WorkloadKey,
    ) -> Result<(), CertifyError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| CertifyError::Response("empty certificate chain".into()))?;
        let current = self.trust.bundle().current();
        let anchors = new_bundle.unwrap_or(&current).anchors();
        let verifier = self.trust.peer_verifier();
        let now = self.trust.now()?;
        for usage in [Usage::Server, Usage::Client] {
            verifier.verify_with(anchors, leaf, intermediates, now, usage)?;
        }
        let (_, parsed) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| CertifyError::Response(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertifyError::KeyMismatch);
        }
        Ok(())
    }
}

fn parse_pem_certs(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, CertifyError> {
    let mut out = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(cert.map_err(|e| CertifyError::Response(format!("certificate PEM: {e}")))?);
        }
    }
    if out.is_empty() {
        return Err(CertifyError::Response("empty certificate chain".into()));
    }
    Ok(out)
}
