//! Palisade policy: the `ApiSecurityPolicy` resource, its validation and
//! compilation to the wire form (`crd` feature), and the pure decision engine
//! the agent runs on every request.
//!
//! The engine does no I/O and reads no clock: time comes in with the request.

pub mod body;
pub mod duration;
pub mod engine;
pub mod identity;
pub mod json;
pub mod masking;
pub mod normalize;
pub mod path_index;
pub mod ratelimit;
pub mod request_shape;
pub mod spiffe_cert;

#[cfg(feature = "crd")]
pub mod compile;
#[cfg(feature = "crd")]
pub mod crd;
#[cfg(feature = "crd")]
pub mod documents;
#[cfg(feature = "crd")]
pub mod validate;

pub use engine::{Decision, LoadError, PolicyEngine, Reason, Request, RequestTime, Verdict};
pub use palisade_proto::policy::v1 as wire;
