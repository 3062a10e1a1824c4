//! Proof of identity: a bearer token turned into a ServiceAccount.
//!
//! One trait, [`TokenValidator`], with two implementations: a local token
//! file ([`file::TokenFile`], kept up to date on edits by
//! [`reload::ReloadingTokenFile`]) and Kubernetes TokenReview
//! ([`review::TokenReviewer`]). The identity service only ever sees the
//! trait, so both modes issue exactly the same way.

pub mod file;
pub mod reload;
pub mod review;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A namespace and ServiceAccount name, both checked to be valid
/// Kubernetes names (so the SPIFFE ID built from them is well-formed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    namespace: String,
    name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("namespace {0:?} is not a DNS label (lower-case letters, digits, '-', at most 63)")]
    Namespace(String),
    #[error(
        "service account {0:?} is not a DNS subdomain (lower-case letters, digits, '-', '.', at most 253)"
    )]
    ServiceAccount(String),
}

impl ServiceAccount {
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        if !is_dns_label(namespace) {
            return Err(NameError::Namespace(namespace.to_owned()));
        }
        if name.len() > 253 || !name.split('.').all(is_dns_label) {
            return Err(NameError::ServiceAccount(name.to_owned()));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Why a token gave no identity. The strings are for the operator's log
/// only — callers get a fixed message — and never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The token is not valid (unknown, expired, wrong audience, not a
    /// ServiceAccount, ...).
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked (API server unreachable, RBAC, ...);
    /// the caller should retry.
    #[error("token validation unavailable: {0}")]
    Unavailable(String),
}

pub type ValidateFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ServiceAccount, TokenError>> + Send + 'a>>;

/// Turns a bearer token into the ServiceAccount it proves.
pub trait TokenValidator: Send + Sync + 'static {
    fn validate<'a>(&'a self, token: &'a str) -> ValidateFuture<'a>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_names_are_checked() {
        assert!(ServiceAccount::new("shop", "orders").is_ok());
        assert!(ServiceAccount::new("shop", "orders.v2").is_ok());
        assert!(ServiceAccount::new("Shop", "orders").is_err());
        assert!(ServiceAccount::new("shop.x", "orders").is_err());
        assert!(ServiceAccount::new("shop", "").is_err());
        assert!(ServiceAccount::new("shop", "a/b").is_err());
        assert!(ServiceAccount::new("-shop", "a").is_err());
        assert!(ServiceAccount::new("shop", "a..b").is_err());
    }
}
