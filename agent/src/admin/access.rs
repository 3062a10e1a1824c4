//! Who may read what on the admin port (DESIGN §6).
//!
//! The admin port is exempt from transparent capture, so every pod of the
//! cluster can connect to it in plain TCP. The kubelet's probes and
//! Prometheus need exactly that; nothing else on the port does. So the rule
//! is an allowlist: the probes (`/healthz`, `/readyz`, `/app-health/<name>`)
//! and `/metrics` answer every client, and every other path — `/config_dump`
//! (the compiled policy, the workload identity, the meshed destinations) and
//! whatever is added later — answers only clients connecting from a loopback
//! address, i.e. from inside the pod. Others get `403` with a fixed body,
//! whatever the method, and the refusal is logged at debug.
//!
//! The rule looks at the TCP peer address the kernel reports, nothing a
//! client can write (no header). A remote host cannot borrow a loopback
//! source: the kernel drops packets from 127.0.0.0/8 or `::1` that arrive on
//! a non-loopback interface (martian source; `route_localnet` is off in a pod
//! namespace), and a spoofer could not complete the TCP handshake anyway.

use std::net::IpAddr;

/// Paths served to every client: the kubelet's probes and Prometheus.
const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Prefix of the app's health probes, also asked by the kubelet.
const APP_HEALTH_PREFIX: &str = "/app-health/";

/// The body of a refusal: fixed, naming nothing of the agent.
pub const FORBIDDEN_BODY: &str = "forbidden: this admin path is served on loopback only\n";

/// Whether `ip` is a loopback address: 127.0.0.0/8, `::1`, or an
/// IPv4-mapped loopback (`::ffff:127.x.y.z`, how an IPv4 client shows up on
/// a listener bound to `[::]`). The deprecated IPv4-compatible form
/// (`::127.0.0.1`) is not loopback: the kernel does not route it to `lo`.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether `path` may be answered to a client that is not on loopback.
pub fn open_to_pod_network(path: &str) -> bool {
    OPEN_PATHS.contains(&path)
        || path
            .strip_prefix(APP_HEALTH_PREFIX)
            .is_some_and(|name| !name.is_empty())
}

/// Whether a request for `path` from `peer` may be answered at all.
pub fn allowed(peer: IpAddr, path: &str) -> bool {
    is_loopback(peer) || open_to_pod_network(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn loopback_addresses() {
        for text in [
            "127.0.0.1",
            "127.0.0.53",
            "127.255.255.254",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.1.2.3",
        ] {
            assert!(is_loopback(ip(text)), "{text} is loopback");
        }
        for text in [
            "10.0.0.1",
            "192.168.1.1",
            "0.0.0.0",
            "128.0.0.1",
            "126.255.255.255",
            "::",
            "::2",
            "fe80::1",
            "fd00::1",
            // IPv4-mapped, not loopback inside.
            "::ffff:10.0.0.1",
            // IPv4-compatible (deprecated): not routed to lo.
            "::127.0.0.1",
            // NAT64 of 127.0.0.1: a remote address.
            "64:ff9b::7f00:1",
        ] {
            assert!(!is_loopback(ip(text)), "{text} is not loopback");
        }
    }

    #[test]
    fn probes_and_metrics_are_open_the_rest_is_loopback_only() {
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/app-health/ready",
            "/app-health/live",
        ] {
            assert!(open_to_pod_network(path), "{path}");
            assert!(allowed(ip("10.0.0.9"), path), "{path}");
            assert!(allowed(ip("::ffff:10.0.0.9"), path), "{path}");
        }
        // Everything else, spelled any way, is loopback only: the rule is an
        // allowlist, so a variant the router does not know is refused too.
        for path in [
            "/config_dump",
            "/config_dump/",
            "//config_dump",
            "/CONFIG_DUMP",
            "/config%5Fdump",
            "/healthz/../config_dump",
            "/metrics/",
            "/app-health/",
            "/app-health",
            "/",
            "",
            "/nope",
        ] {
            assert!(!open_to_pod_network(path), "{path:?}");
            for remote in ["10.0.0.9", "::ffff:10.0.0.9", "fd00::9", "::127.0.0.1"] {
                assert!(!allowed(ip(remote), path), "{path:?} from {remote}");
            }
            for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
                assert!(allowed(ip(local), path), "{path:?} from {local}");
            }
        }
    }
}
