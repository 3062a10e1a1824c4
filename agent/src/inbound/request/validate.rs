//! Step 6, validate: the body rules the engine cannot settle from headers
//! (a streamed size, JSON Schema); see `inbound::body::validate_request`.

use http::Request;
use palisade_policy::engine::BodyRules;

use super::Refusal;
use crate::inbound::body::{self, ClientBody, Validated};

pub(super) async fn validate<'a>(
    rules: Option<&'a BodyRules>,
    req: Request<ClientBody>,
) -> Result<Validated, Refusal<'a>> {
    body::validate_request(rules, req).await.map_err(|refusal| {
        // The message names a pointer and a keyword, never body values; the
        // client only gets the fixed deny body.
        tracing::debug!(error = %refusal, "request body refused");
        Refusal::new(refusal.status(), refusal.reason()).rule(rules.map(|r| &*r.id))
    })
}
