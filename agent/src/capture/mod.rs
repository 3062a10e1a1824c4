//! Transparent capture (DESIGN §6): the `iptables -t nat` rules that
//! `palisade-agent init` installs in the pod's network namespace, so inbound
//! TCP reaches the agent on 15006 and the app's outbound TCP reaches it on
//! 15001, while the agent's own traffic (UID 2137), the admin port and
//! configured ports/CIDRs are left alone. See `docs/capture.md`.
//!
//! - [`plan`]: the pure planner, config in, `iptables` commands out.
//! - [`exec`]: runs a plan with `std::process::Command`.
//!
//! Installing is idempotent: our chains are created if missing and flushed
//! and refilled, and the jumps from PREROUTING/OUTPUT are added only when
//! `iptables -C` says they are absent, so a second run leaves
//! `iptables-save -t nat` unchanged. [`cleanup_plan`] removes it all.

pub mod exec;
pub mod plan;

pub use exec::{CaptureError, Iptables};
pub use plan::{CaptureConfig, Ipv4Cidr, Step, cleanup_plan, install_plan};
