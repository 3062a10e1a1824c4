//! Counters of the outbound proxy, in Prometheus text format.
//!
//! `palisade_outbound_connections_total{outcome=…}` counts app connections
//! by how they ended up:
//!
//! - `mtls`: tunnelled over mTLS to a verified mesh peer;
//! - `passthrough`: an unmatched destination in transparent mode, forwarded
//!   as plain TCP (`--outbound-unmatched passthrough`);
//! - `denied`: refused before any connection was made (an unmatched
//!   destination under `--outbound-unmatched deny`, a connection looping back
//!   to the outbound listener, no original destination);
//! - `handshake_failed`: the TLS handshake with a meshed destination failed
//!   (wrong SPIFFE ID, unknown CA, a plaintext server, timeout) — the app's
//!   connection was closed, never downgraded;
//! - `connect_failed`: the destination did not accept a TCP connection in time.
//!
//! [`OutboundMetrics::render_prometheus`] appends the samples to a
//! `/metrics` body.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// How one app connection was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundOutcome {
    Mtls,
    Passthrough,
    Denied,
    HandshakeFailed,
    ConnectFailed,
}

impl OutboundOutcome {
    pub const ALL: [OutboundOutcome; 5] = [
        OutboundOutcome::Mtls,
        OutboundOutcome::Passthrough,
        OutboundOutcome::Denied,
        OutboundOutcome::HandshakeFailed,
        OutboundOutcome::ConnectFailed,
    ];

    /// The `outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            OutboundOutcome::Mtls => "mtls",
            OutboundOutcome::Passthrough => "passthrough",
            OutboundOutcome::Denied => "denied",
            OutboundOutcome::HandshakeFailed => "handshake_failed",
            OutboundOutcome::ConnectFailed => "connect_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct OutboundMetrics {
    connections: [AtomicU64; 5],
}

impl OutboundMetrics {
    pub fn record(&self, outcome: OutboundOutcome) {
        self.connections[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `palisade_outbound_connections_total` for one outcome.
    pub fn connections(&self, outcome: OutboundOutcome) -> u64 {
        self.connections[outcome.index()].load(Ordering::Relaxed)
    }

    /// Appends the counters in Prometheus text format (version 0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        const NAME: &str = "palisade_outbound_connections_total";
        let _ = writeln!(
            out,
            "# HELP {NAME} App connections the outbound proxy handled, by outcome."
        );
        let _ = writeln!(out, "# TYPE {NAME} counter");
        for outcome in OutboundOutcome::ALL {
            let _ = writeln!(
                out,
                "{NAME}{{outcome=\"{}\"}} {}",
                outcome.label(),
                self.connections(outcome)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_outcome_and_renders() {
        let m = OutboundMetrics::default();
        m.record(OutboundOutcome::Mtls);
        m.record(OutboundOutcome::Mtls);
        m.record(OutboundOutcome::HandshakeFailed);
        m.record(OutboundOutcome::Denied);
        assert_eq!(m.connections(OutboundOutcome::Mtls), 2);
        assert_eq!(m.connections(OutboundOutcome::Passthrough), 0);
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert_eq!(
            text,
            "\
# HELP palisade_outbound_connections_total App connections the outbound proxy handled, by outcome.
# TYPE palisade_outbound_connections_total counter
palisade_outbound_connections_total{outcome=\"mtls\"} 2
palisade_outbound_connections_total{outcome=\"passthrough\"} 0
palisade_outbound_connections_total{outcome=\"denied\"} 1
palisade_outbound_connections_total{outcome=\"handshake_failed\"} 1
palisade_outbound_connections_total{outcome=\"connect_failed\"} 0
"
        );
    }
}
