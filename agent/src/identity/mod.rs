//! Workload identity: an in-memory key, a certificate from the operator's
//! `Identity.Certify`, renewal before expiry, and the store that handshakes
//! read the current certificate from (DESIGN §3).

mod backoff;
mod client;
mod connector;
mod key;
mod renew;
mod status;
mod store;

pub use backoff::Backoff;
pub use client::{Certified, CertifyError, IdentityClient, IdentityClientConfig, TokenSource};
pub use key::{KeyError, WorkloadKey};
pub use renew::{RenewalConfig, RenewalEvent, Renewer, renewal_delay};
pub use status::{ExpiryGauge, Readiness};
pub use store::{CertStore, IssuedCert, IssuedCertError};

/// Also dials the operator for `Discovery.Watch` (DESIGN §5).
pub(crate) use connector::OperatorConnector;
