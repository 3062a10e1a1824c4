//! Policy distribution (DESIGN §5): where policies come from ([`source`]),
//! the `Discovery.Watch` stream that compiles and pushes them per workload
//! ([`service`]), and what each agent ACKed or NACKed ([`status`]).

pub mod service;
pub mod source;
pub mod status;

pub use service::DiscoveryService;
pub use source::{DirSource, PolicySet, SourceError, SourceSpec};
pub use status::{AgentRecord, DiscoveryStatus, NackRecord};
