//! The policy the inbound proxy enforces, swapped atomically as a whole: the
//! engine plus the JWT and API-key verifiers built from the same version.

use std::sync::Arc;

use palisade_policy::PolicyEngine;
use palisade_policy::wire::WorkloadPolicy;
use parking_lot::RwLock;

use crate::authn::{ApiKeyVerifier, JwtOptions, JwtVerifier};

/// One loaded policy version.
#[derive(Debug)]
pub struct LoadedPolicy {
    pub engine: PolicyEngine,
    /// `None` when the policy has no JWT providers.
    pub jwt: Option<JwtVerifier>,
    /// `None` when the policy has no API keys.
    pub api_keys: Option<ApiKeyVerifier>,
}

impl LoadedPolicy {
    /// Loads the engine and builds the verifiers; any error refuses the
    /// whole version (the previous one stays in force).
    pub fn load(policy: WorkloadPolicy, jwt_options: JwtOptions) -> anyhow::Result<Self> {
        let jwt = if policy.jwt_providers.is_empty() {
            None
        } else {
            Some(JwtVerifier::new(&policy.jwt_providers, jwt_options)?)
        };
        let api_keys = match policy.api_keys.as_ref() {
            Some(auth) if !auth.header.is_empty() => Some(ApiKeyVerifier::new(auth)?),
            _ => None,
        };
        let engine = PolicyEngine::load(policy)?;
        Ok(Self {
            engine,
            jwt,
            api_keys,
        })
    }

    /// Whether a 401 carries `WWW-Authenticate: Bearer`.
    pub fn accepts_jwt(&self) -> bool {
        self.jwt.as_ref().is_some_and(|j| !j.is_empty())
    }
}

/// The current policy, shared by every connection; `None` until one is
/// loaded, and then every request is denied (fail closed).
#[derive(Clone, Debug, Default)]
pub struct SharedPolicy(Arc<RwLock<Option<Arc<LoadedPolicy>>>>);

impl SharedPolicy {
    pub fn new(policy: Option<LoadedPolicy>) -> Self {
        Self(Arc::new(RwLock::new(policy.map(Arc::new))))
    }

    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.0.read().clone()
    }

    /// Replaces the policy; returns the previous one.
    pub fn replace(&self, policy: LoadedPolicy) -> Option<Arc<LoadedPolicy>> {
        self.0.write().replace(Arc::new(policy))
    }
}
