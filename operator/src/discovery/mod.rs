//! Policy distribution (DESIGN §5): where policies come from ([`source`]),
//! the `Discovery.Watch` stream that compiles and pushes them per workload
//! ([`service`]), what each agent ACKed or NACKed ([`status`]), and the
//! mesh destination table built from the endpoints agents advertise
//! ([`endpoints`]).

pub mod endpoints;
pub mod service;
pub mod source;
pub mod status;

pub use endpoints::{EndpointError, MeshRegistry, Registration};
pub use service::DiscoveryService;
pub use source::{DirSource, PolicySet, SourceError, SourceSpec};
pub use status::{AgentRecord, DiscoveryStatus, NackRecord};
