//! `palisade.identity.v1.Identity`: exchanges a token and a CSR for a
//! workload certificate (DESIGN §3).
//!
//! Order of checks: the token first (an unauthenticated caller learns
//! nothing about CSR handling), then the CSR signature, then issuance for
//! the token's identity only. Refusals carry fixed messages; the reasons go
//! to the log.

pub mod counters;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use palisade_policy::identity::SpiffeId;
use palisade_proto::identity::v1::identity_server::Identity;
use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::LeafProfile;
use crate::ca::csr::VerifiedCsr;
use crate::ca::reload::CurrentCa;
use crate::tokens::{TokenError, TokenValidator};

pub use counters::{CountersSnapshot, IssuanceCounters};

/// Tokens longer than this are refused unread (projected tokens are ~1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

pub const MSG_TOKEN: &str = "token not accepted";
pub const MSG_CSR: &str = "invalid certificate signing request";
const MSG_UNAVAILABLE: &str = "token validation unavailable, retry later";
const MSG_INTERNAL: &str = "certificate issuance failed";

pub struct IdentityService {
    /// Read once per call: a CA reloaded mid-call cannot mix the old
    /// issuer's leaf with the new chain or bundle.
    ca: CurrentCa,
    tokens: Arc<dyn TokenValidator>,
    trust_domain: String,
    max_ttl: Duration,
    counters: Arc<IssuanceCounters>,
}

impl IdentityService {
    pub fn new(
        ca: impl Into<CurrentCa>,
        tokens: Arc<dyn TokenValidator>,
        trust_domain: impl Into<String>,
        max_ttl: Duration,
        counters: Arc<IssuanceCounters>,
    ) -> Self {
        Self {
            ca: ca.into(),
            tokens,
            trust_domain: trust_domain.into(),
            max_ttl,
            counters,
        }
    }

    async fn certify_inner(
        &self,
        peer: Option<SocketAddr>,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, Status> {
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        let identity = if req.token.is_empty() || req.token.len() > MAX_TOKEN_BYTES {
            Err(TokenError::Rejected("empty or oversized token".into()))
        } else {
            self.tokens.validate(&req.token).await
        };
        let identity = match identity {
            Ok(sa) => sa,
            Err(TokenError::Rejected(reason)) => {
                self.counters.refused_token();
                tracing::warn!(%peer, %reason, "certify refused: token not accepted");
                return Err(Status::unauthenticated(MSG_TOKEN));
            }
            Err(TokenError::Unavailable(reason)) => {
                self.counters.failed();
                tracing::error!(%peer, %reason, "certify failed: cannot validate tokens");
                return Err(Status::unavailable(MSG_UNAVAILABLE));
            }
        };
        let csr = match VerifiedCsr::from_pem(&req.csr_pem) {
            Ok(csr) => csr,
            Err(e) => {
                self.counters.refused_csr();
                tracing::warn!(%peer, service_account = %identity, error = %e, "certify refused: invalid CSR");
                return Err(Status::invalid_argument(MSG_CSR));
            }
        };
        let spiffe_id = SpiffeId::for_service_account(
            &self.trust_domain,
            identity.namespace(),
            identity.name(),
        )
        .map_err(|e| self.internal(&peer, &format!("SPIFFE ID for {identity}: {e}")))?;
        let ttl = effective_ttl(req.requested_ttl_seconds, self.max_ttl);
        // Only the token's identity goes into the certificate; whatever the
        // CSR asked for besides its key was dropped by VerifiedCsr.
        let ca = self.ca.get();
        let leaf = ca
            .issue(
                csr.public_key(),
                &LeafProfile::workload(spiffe_id.clone(), ttl),
                SystemTime::now(),
            )
            .map_err(|e| self.internal(&peer, &e.to_string()))?;
        self.counters.issued();
        tracing::info!(
            %peer,
            spiffe_id = %spiffe_id,
            serial = %leaf.serial,
            ttl_seconds = ttl.as_secs(),
            "certificate issued"
        );
        let mut chain = Vec::with_capacity(1 + ca.intermediates().len());
        chain.push(leaf.pem());
        chain.extend(ca.intermediates_pem());
        Ok(CertifyResponse {
            cert_chain_pem: chain,
            trust_bundle_pem: ca.trust_bundle_pem(),
            expires_at: Some(timestamp(leaf.not_after)),
            spiffe_id: spiffe_id.to_string(),
        })
    }

    fn internal(&self, peer: &str, reason: &str) -> Status {
        self.counters.failed();
        tracing::error!(%peer, %reason, "certify failed");
        Status::internal(MSG_INTERNAL)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        self.certify_inner(peer, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// The requested lifetime, capped at the operator's maximum; 0 means the
/// maximum.
pub fn effective_ttl(requested_seconds: u32, max: Duration) -> Duration {
    match requested_seconds {
        0 => max,
        s => Duration::from_secs(u64::from(s)).min(max),
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_can_only_shrink() {
        let max = Duration::from_secs(86_400);
        assert_eq!(effective_ttl(0, max), max);
        assert_eq!(effective_ttl(60, max), Duration::from_secs(60));
        assert_eq!(effective_ttl(u32::MAX, max), max);
    }
}
