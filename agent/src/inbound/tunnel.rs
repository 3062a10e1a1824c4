//! Byte tunnels (opaque TCP, upgraded connections) that stay under policy:
//! bytes are copied both ways until either side closes, and every new policy
//! version re-authorizes the tunnel; one no longer allowed is closed.
//!
//! A request is authorized once, but a tunnel outlives the policy that let
//! it in: without this, revoking a peer would leave its open WebSocket or
//! database connection running until it chose to close.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use super::policy::{LoadedPolicy, PolicyUpdates};

/// Why a tunnel was closed by policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub status: u16,
    /// The reason code of the verdict that refused it.
    pub reason: &'static str,
    pub rule: Option<String>,
}

impl Revocation {
    pub fn of(verdict: &palisade_policy::Verdict<'_>) -> Self {
        Self {
            status: verdict.status,
            reason: verdict.reason.as_str(),
            rule: verdict.rule.map(str::to_owned),
        }
    }
}

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// One side closed (bytes copied up and down), or the copy failed.
    Closed(io::Result<(u64, u64)>),
    /// A new policy (the one given) no longer allows it.
    Revoked(Revocation, std::sync::Arc<LoadedPolicy>),
}

/// Copies between `a` and `b` until either closes, re-checking with
/// `still_allowed` on every policy version `updates` sees after the call.
pub async fn run<A, B, F, Fut>(
    mut a: A,
    mut b: B,
    mut updates: PolicyUpdates,
    mut still_allowed: F,
) -> TunnelEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(std::sync::Arc<LoadedPolicy>) -> Fut,
    Fut: Future<Output = Result<(), Revocation>>,
{
    // Versions before this point are the one the tunnel was admitted under.
    updates.borrow_and_update();
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            result = &mut copy => return TunnelEnd::Closed(result),
            changed = updates.changed() => {
                if changed.is_err() {
                    // No policy will ever change again: just finish.
                    return TunnelEnd::Closed(copy.await);
                }
                let current = updates.borrow_and_update().clone();
                let Some(policy) = current else { continue };
                if let Err(revoked) = still_allowed(policy.clone()).await {
                    return TunnelEnd::Revoked(revoked, policy);
                }
            }
        }
    }
}
