//! Step 3, authenticate: a JWT and an API key, verified when the policy
//! accepts them. A missing credential is no error (policy decides what an
//! anonymous request may do); a failed one is carried to the engine, which
//! answers 401.

use std::sync::Arc;

use http::HeaderMap;
use serde_json::Value;

use crate::inbound::LoadedPolicy;

/// What the request proved beyond its connection.
#[derive(Debug, Default)]
pub(crate) struct Credentials<'p> {
    pub claims: Option<Arc<Value>>,
    pub api_key_client: Option<&'p str>,
    /// The stable code of a credential that failed verification.
    pub error: Option<&'static str>,
}

pub(crate) async fn authenticate<'p>(
    policy: &'p LoadedPolicy,
    headers: &HeaderMap,
) -> Credentials<'p> {
    let mut out = Credentials::default();
    if let Some(jwt) = &policy.jwt {
        match jwt.verify(headers).await {
            Ok(v) => out.claims = Some(v.claims),
            Err(e) if e.is_missing() => {}
            Err(e) => out.error = Some(e.code()),
        }
    }
    if let Some(keys) = &policy.api_keys {
        match keys.verify(headers) {
            Ok(client) => out.api_key_client = Some(client),
            Err(e) if e.is_missing() => {}
            Err(e) => {
                out.error.get_or_insert(e.code());
            }
        }
    }
    out
}
