//! The policy the inbound proxy enforces, swapped atomically as a whole: the
//! engine plus the JWT and API-key verifiers built from the same version.

use std::sync::Arc;

use palisade_policy::PolicyEngine;
use palisade_policy::wire::WorkloadPolicy;
use tokio::sync::watch;

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
    /// whole version (the previous one stays in force). Local rate limits
    /// that `previous` already enforces with the same settings keep their
    /// state.
    pub fn load(
        policy: WorkloadPolicy,
        jwt_options: JwtOptions,
        previous: Option<&LoadedPolicy>,
    ) -> anyhow::Result<Self> {
        let jwt = if policy.jwt_providers.is_empty() {
            None
        } else {
            Some(JwtVerifier::new(&policy.jwt_providers, jwt_options)?)
        };
        let api_keys = match policy.api_keys.as_ref() {
            Some(auth) if !auth.header.is_empty() => Some(ApiKeyVerifier::new(auth)?),
            _ => None,
        };
        let engine = PolicyEngine::load_after(policy, previous.map(|p| &p.engine))?;
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
/// loaded, and then every request is denied (fail closed). Long-lived
/// tunnels [`subscribe`](Self::subscribe) to be re-authorized on each new
/// version.
#[derive(Clone, Debug)]
pub struct SharedPolicy(Arc<watch::Sender<Option<Arc<LoadedPolicy>>>>);

impl Default for SharedPolicy {
    fn default() -> Self {
        Self::new(None)
    }
}

/// A subscription to policy versions (see [`SharedPolicy::subscribe`]).
pub type PolicyUpdates = watch::Receiver<Option<Arc<LoadedPolicy>>>;

impl SharedPolicy {
    pub fn new(policy: Option<LoadedPolicy>) -> Self {
        Self(Arc::new(watch::Sender::new(policy.map(Arc::new))))
    }

    pub fn current(&self) -> Option<Arc<LoadedPolicy>> {
        self.0.borrow().clone()
    }

    /// Replaces the policy; returns the previous one.
    pub fn replace(&self, policy: LoadedPolicy) -> Option<Arc<LoadedPolicy>> {
        self.0.send_replace(Some(Arc::new(policy)))
    }

    /// Wakes on every version replaced after this call.
    pub fn subscribe(&self) -> PolicyUpdates {
        self.0.subscribe()
    }
}
