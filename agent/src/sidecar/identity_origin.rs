//! Where the sidecar's workload certificate comes from: fixed PEM files, or
//! the operator (issued, then renewed before it expires).

use std::path::PathBuf;
use std::sync::Arc;

use palisade_policy::identity::SpiffeId;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{
    CertStore, CertifyError, IdentityClient, IdentityClientConfig, IssuedCert, IssuedCertError,
    RenewalConfig, Renewer, TokenSource,
};
use crate::tls::MeshTrust;

/// The operator's identity service: where it listens and who it must be.
#[derive(Clone, Debug)]
pub struct OperatorEndpoint {
    /// `HOST:PORT`.
    pub address: String,
    /// The SPIFFE ID the operator's certificate must carry; `None`: any
    /// workload of the trust domain.
    pub id: Option<SpiffeId>,
}

/// Where the workload certificate comes from.
#[derive(Clone, Debug)]
pub enum IdentityOrigin {
    /// A PEM certificate chain (leaf first, SPIFFE ID SAN) and its PEM
    /// private key, installed once and never renewed: local use and tests.
    Files { cert: PathBuf, key: PathBuf },
    /// Issued by the operator against the proof of identity in `token_file`,
    /// and renewed at 70 % of its lifetime.
    Operator {
        operator: OperatorEndpoint,
        token_file: PathBuf,
    },
}

/// Why the workload certificate cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityOriginError {
    #[error("cannot read {}", path.display())]
    ReadCert {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} is not PEM certificates", path.display())]
    NotPemCerts {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("cannot read a PEM key from {}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("unusable private key")]
    UnusableKey(#[source] rustls::Error),
    #[error(transparent)]
    Cert(#[from] IssuedCertError),
    #[error(transparent)]
    Operator(#[from] CertifyError),
}

/// Why the identity flags do not name one origin.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFlagsError {
    #[error("--operator and --token-file (or --cert and --key) are required")]
    Incomplete,
    #[error("--operator-id is not a workload SPIFFE ID")]
    OperatorId(#[source] palisade_policy::identity::SpiffeIdError),
}

impl IdentityOrigin {
    /// The origin the `--cert`/`--key` or `--operator`/`--token-file`/
    /// `--operator-id` flags name (files win when both are given).
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        operator: Option<String>,
        token_file: Option<PathBuf>,
        operator_id: Option<&str>,
    ) -> Result<Self, IdentityFlagsError> {
        if let (Some(cert), Some(key)) = (cert, key) {
            return Ok(Self::Files { cert, key });
        }
        let (Some(address), Some(token_file)) = (operator, token_file) else {
            return Err(IdentityFlagsError::Incomplete);
        };
        let id = operator_id
            .map(SpiffeId::parse)
            .transpose()
            .map_err(IdentityFlagsError::OperatorId)?;
        Ok(Self::Operator {
            operator: OperatorEndpoint { address, id },
            token_file,
        })
    }

    /// Files: the certificate is in `store` on return, and there is no
    /// renewer. Operator: the renewer that fills `store` once it runs.
    pub fn provision(
        self,
        trust: &MeshTrust,
        trust_domain: &str,
        store: &Arc<CertStore>,
    ) -> Result<Option<Renewer>, IdentityOriginError> {
        match self {
            Self::Files { cert, key } => {
                let chain = CertificateDer::pem_file_iter(&cert)
                    .map_err(|source| IdentityOriginError::ReadCert {
                        path: cert.clone(),
                        source,
                    })?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| IdentityOriginError::NotPemCerts {
                        path: cert.clone(),
                        source,
                    })?;
                let key_der = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|source| IdentityOriginError::ReadKey { path: key, source })?;
                let signing = trust
                    .provider()
                    .key_provider
                    .load_private_key(key_der)
                    .map_err(IdentityOriginError::UnusableKey)?;
                store.install(IssuedCert::new(chain, signing, trust_domain)?);
                Ok(None)
            }
            Self::Operator {
                operator,
                token_file,
            } => {
                let mut config =
                    IdentityClientConfig::new(operator.address, TokenSource::File(token_file));
                config.operator_id = operator.id;
                let client = IdentityClient::new(config, trust.clone())?;
                Ok(Some(Renewer::new(
                    client,
                    store.clone(),
                    RenewalConfig::default(),
                )))
            }
        }
    }
}
