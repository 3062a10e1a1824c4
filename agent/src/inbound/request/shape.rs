//! Step 2, shape: the request as parsed must mean one thing. Spoofable and
//! hop-by-hop headers were stripped and the request id set before the
//! steps ran (`pipeline::strip`, `pipeline::request_id`); here the framing
//! guard's verdict, the target's length and
//! [`palisade_policy::request_shape`] decide, each refusal a 400 (414 for a
//! long target).

use palisade_policy::request_shape::{self, Head, ShapeError, ShapeOptions};

use super::{Exchange, Refusal, reason};
use crate::inbound::limits::HeadVerdict;

pub(super) fn check<'a>(
    ex: &Exchange<'a>,
    head: &mut http::request::Parts,
    stripped_cleanly: bool,
    framing: HeadVerdict,
) -> Result<(), Refusal<'a>> {
    let target_len = head.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + head.uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > ex.shared.config.limits.max_request_target {
        return Err(Refusal::new(414, reason::TARGET_TOO_LONG));
    }
    if !stripped_cleanly {
        return Err(Refusal::new(400, reason::CONNECTION_NOMINATES_FRAMING));
    }
    let shape_head = Head {
        method: &head.method,
        version: head.version,
        authority: head.uri.authority().map(|a| a.as_str()),
        ambiguous_framing: framing == HeadVerdict::AmbiguousFraming,
    };
    let options = ShapeOptions {
        drop_underscore_headers: ex
            .policy
            .is_some_and(|p| p.engine.drop_underscore_headers()),
        upgrade_protocols: &ex.shared.config.upgrade_protocols,
    };
    request_shape::check(&shape_head, &mut head.headers, &options).map_err(|e| {
        let refusal = Refusal::new(400, e.code());
        // After an ambiguous head hyper's framing and the client's may
        // differ: nothing more is read from the connection.
        if e == ShapeError::AmbiguousFraming {
            refusal.close()
        } else {
            refusal
        }
    })
}
