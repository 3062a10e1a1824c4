//! Step 1, admit: a cap on requests in flight across all connections of the
//! listener. Beyond it the request is shed with 503 before any work is
//! spent on it (connection and stream limits bound each peer; this bounds
//! them all together).

use http::header::{HeaderValue, RETRY_AFTER};
use tokio::sync::OwnedSemaphorePermit;

use super::{Exchange, Refusal, reason};

/// Holds the request's place until the response head is returned.
pub(super) fn admit<'a>(ex: &Exchange<'a>) -> Result<OwnedSemaphorePermit, Refusal<'a>> {
    ex.shared.stats.admit_request().ok_or_else(|| {
        Refusal::new(503, reason::IN_FLIGHT).header(RETRY_AFTER, HeaderValue::from_static("1"))
    })
}
