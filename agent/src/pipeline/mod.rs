//! The pure, per-request header steps of the inbound pipeline (DESIGN §6),
//! one module per step. None of them does I/O; [`crate::inbound`] calls them
//! in order (see `docs/pipeline.md`).
//!
//! Order on the inbound path, for the steps here:
//!
//! 1. [`strip`]: remove spoofable identity headers and hop-by-hop headers,
//!    before anything reads the request.
//! 2. [`request_id`]: keep a mesh peer's `x-request-id` or mint one.
//! 3. (the policy engine decides)
//! 4. [`deny`]: the fixed error response when the decision refuses.
//! 5. [`xfcc`]: `x-forwarded-client-cert` for the app, from the verified
//!    peer certificate only; [`forwarded`]: `X-Forwarded-For` from the
//!    connection's peer unless it is a trusted hop.
//! 6. [`response_headers`]: the decision's `Deprecation` / `Sunset` / `Link`
//!    on the app's response.

pub mod deny;
pub mod forwarded;
pub mod request_id;
pub mod response_headers;
pub mod strip;
pub mod xfcc;

#[cfg(test)]
mod robustness;
