//! Step 8, mask: redact and mask a JSON response; one that cannot be
//! inspected is withheld (502), never passed on unmasked.

use http::Response;

use super::{ProxyBody, Refusal};
use crate::inbound::body::{self, MaskPlan};

pub(super) async fn mask<'a>(
    plan: Option<MaskPlan<'_>>,
    mut resp: Response<ProxyBody>,
) -> Result<Response<ProxyBody>, Refusal<'a>> {
    match body::mask_response(plan, &mut resp).await {
        Ok(()) => Ok(resp),
        Err(e) => {
            tracing::warn!(error = %e, "response cannot be masked; withholding it");
            Err(Refusal::new(502, e.reason()))
        }
    }
}
