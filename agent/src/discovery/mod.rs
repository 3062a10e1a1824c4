//! Policy distribution, agent side (DESIGN §5): a [`PolicyWatcher`] keeps
//! the [`SharedPolicy`](crate::inbound::SharedPolicy) in step with the
//! operator's `Discovery.Watch`, ACKing what it enforces and NACKing what it
//! cannot load; [`PolicyStatus`] reports it for `/config_dump` and `/metrics`.

mod connect;
mod status;
mod watcher;

pub use status::{LastNack, PolicySource, PolicyStatus, PolicyStatusSnapshot};
pub use watcher::{DiscoveryError, PolicyWatcher, PolicyWatcherConfig, WorkloadInfo};
