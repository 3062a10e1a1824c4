//! The trust bundle: the roots peers' chains must end at. Several roots at
//! once so the CA can be rotated (DESIGN §3); swapped as a whole at run time.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the trust bundle holds no certificate")]
    Empty,
    #[error("trust bundle certificate {index} is not PEM: {reason}")]
    Pem { index: usize, reason: String },
    #[error("trust bundle certificate {index} cannot be a trust anchor: {source}")]
    Anchor { index: usize, source: webpki::Error },
    #[error("cannot read trust bundle {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// One immutable set of roots, parsed into webpki trust anchors once.
#[derive(Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|source| BundleError::Anchor { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// Every `CERTIFICATE` block in `pem`, in order.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .enumerate()
            .map(|(index, r)| {
                r.map_err(|e| BundleError::Pem {
                    index,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_der(roots)
    }

    /// Several PEM documents (as in `CertifyResponse.trust_bundle_pem`).
    pub fn from_pem_list<S: AsRef<str>>(pems: &[S]) -> Result<Self, BundleError> {
        let joined: String = pems
            .iter()
            .map(|p| p.as_ref())
            .collect::<Vec<_>>()
            .join("\n");
        Self::from_pem(&joined)
    }

    pub fn from_pem_file(path: &Path) -> Result<Self, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// The bundle every verifier of this process reads, per handshake. Replacing it
/// affects new handshakes only: established connections were verified already.
#[derive(Clone, Debug)]
pub struct SharedTrustBundle(Arc<RwLock<Arc<TrustBundle>>>);

impl SharedTrustBundle {
    pub fn new(bundle: TrustBundle) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(bundle))))
    }

    /// The bundle now; cheap (one `Arc` clone under a read lock).
    pub fn current(&self) -> Arc<TrustBundle> {
        self.0.read().clone()
    }

    /// Swap in a new bundle, returning the old one.
    pub fn replace(&self, bundle: TrustBundle) -> Arc<TrustBundle> {
        std::mem::replace(&mut *self.0.write(), Arc::new(bundle))
    }
}
