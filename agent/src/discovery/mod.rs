//! Policy distribution, agent side (DESIGN §5): a [`PolicyWatcher`] keeps
//! the [`SharedPolicy`](crate::inbound::SharedPolicy) in step with the
//! operator's `Discovery.Watch`, ACKing what it enforces and NACKing what it
//! cannot load; [`PolicyStatus`] reports it for `/config_dump` and `/metrics`.
//! The same stream advertises where this agent terminates mTLS and brings
//! back the mesh's destination table for the outbound proxy
//! ([`DiscoveredDestinations`](crate::outbound::DiscoveredDestinations)).

mod connect;
mod destinations;
mod status;
mod watcher;

pub use status::{LastNack, PolicySource, PolicyStatus, PolicyStatusSnapshot};
pub use watcher::{
    AdvertisedEndpoint, DiscoveryError, PolicyWatcher, PolicyWatcherConfig, WorkloadInfo,
};
