//! Step 5, rate-limit: the `scope: global` limits that matched, checked in
//! the shared store; every one must admit. Local limits were the engine's.
//! Without a store, or when it cannot be reached, each limit does what its
//! `failureMode` says (closed: 429, open: admit).

use palisade_policy::wire;

use super::authorize::Outcome;
use super::{Exchange, Refusal};
use crate::inbound::LoadedPolicy;
use crate::ratelimit::GlobalOutcome;
use crate::ratelimit::headers::insert_global_headers;

/// The last global limit that admitted the request (for its headers).
pub(super) async fn check<'a>(
    ex: &mut Exchange<'a>,
    policy: &'a LoadedPolicy,
    outcome: &mut Outcome<'a>,
) -> Result<Option<GlobalOutcome>, Refusal<'a>> {
    let mut admitted = None;
    for (limit, key) in &outcome.global {
        let checked = match &ex.shared.config.global_limits {
            Some(store) => {
                store
                    .check(limit, key, crate::ratelimit::global::unix_now_ms())
                    .await
            }
            None => GlobalOutcome::StoreUnavailable {
                allowed: limit.failure_mode == wire::rate_limit::FailureMode::Open,
            },
        };
        if !checked.allowed() {
            let mut refusal =
                Refusal::new(429, checked.deny_reason().unwrap_or("ratelimit.exceeded"))
                    .rule(Some(&limit.id))
                    .challenge(policy.accepts_jwt());
            insert_global_headers(refusal.headers_mut(), &checked);
            return Err(refusal);
        }
        admitted = Some(checked);
    }
    Ok(admitted)
}
