//! The audit pipeline's counters, shared by the sink (request path), the
//! reporter task and `/metrics`. All plain atomics: the request path only
//! ever touches one, and only when it drops an event.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use palisade_proto::audit::v1 as pb;
use tokio::sync::mpsc;

#[derive(Debug, Default)]
pub(crate) struct AuditStats {
    /// Dropped on the request path (queue full) and not yet reported in a
    /// batch's `dropped_since_last`; the reporter takes it when it cuts one.
    pub(crate) dropped_unreported: AtomicU64,
    pub(crate) events_dropped: AtomicU64,
    pub(crate) batches_sent: AtomicU64,
    pub(crate) batches_acked: AtomicU64,
    pub(crate) spool_bytes: AtomicU64,
    pub(crate) connected: AtomicBool,
    pub(crate) connect_failures: AtomicU64,
}

impl AuditStats {
    /// `n` events are lost: counted, and owed to the next batch.
    pub(crate) fn dropped_on_request_path(&self, n: u64) {
        self.dropped_unreported.fetch_add(n, Ordering::Relaxed);
        self.events_dropped.fetch_add(n, Ordering::Relaxed);
    }
}

/// A read-only view of the audit pipeline for `/metrics` and tests.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    stats: Arc<AuditStats>,
    /// Weak, so the metrics do not keep the queue open after every sink
    /// is gone (the reporter then flushes and stops).
    queue: mpsc::WeakSender<pb::AuditEvent>,
}

impl AuditMetrics {
    pub(crate) fn new(stats: Arc<AuditStats>, queue: mpsc::WeakSender<pb::AuditEvent>) -> Self {
        Self { stats, queue }
    }

    /// Events waiting in the in-memory queue.
    pub fn queue_depth(&self) -> usize {
        self.queue
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// Bytes of batches in the disk spool.
    pub fn spool_bytes(&self) -> u64 {
        self.stats.spool_bytes.load(Ordering::Relaxed)
    }

    /// Events lost because the queue, or the memory and the spool, were full.
    pub fn events_dropped_total(&self) -> u64 {
        self.stats.events_dropped.load(Ordering::Relaxed)
    }

    /// Batches written to a collector stream, resends included.
    pub fn batches_sent_total(&self) -> u64 {
        self.stats.batches_sent.load(Ordering::Relaxed)
    }

    /// Batches the collector acknowledged as stored (each counted once).
    pub fn batches_acked_total(&self) -> u64 {
        self.stats.batches_acked.load(Ordering::Relaxed)
    }

    pub fn collector_connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }

    /// Connection attempts that failed (unreachable, refused handshake,
    /// wrong identity) or streams that broke.
    pub fn connect_failures_total(&self) -> u64 {
        self.stats.connect_failures.load(Ordering::Relaxed)
    }

    /// Prometheus text for `/metrics`.
    pub fn render_prometheus(&self, out: &mut String) {
        let samples: [(&str, &str, &str, u64); 7] = [
            (
                "palisade_audit_queue_depth",
                "gauge",
                "Audit events waiting in the in-memory queue.",
                self.queue_depth() as u64,
            ),
            (
                "palisade_audit_spool_bytes",
                "gauge",
                "Bytes of audit batches in the disk spool.",
                self.spool_bytes(),
            ),
            (
                "palisade_audit_events_dropped_total",
                "counter",
                "Audit events lost because the queue, or the memory and the spool, were full.",
                self.events_dropped_total(),
            ),
            (
                "palisade_audit_batches_sent_total",
                "counter",
                "Audit batches written to the collector stream, resends included.",
                self.batches_sent_total(),
            ),
            (
                "palisade_audit_batches_acked_total",
                "counter",
                "Audit batches the collector acknowledged as stored.",
                self.batches_acked_total(),
            ),
            (
                "palisade_audit_collector_connected",
                "gauge",
                "1 while an Audit.Report stream to the collector is open.",
                u64::from(self.collector_connected()),
            ),
            (
                "palisade_audit_connect_failures_total",
                "counter",
                "Failed connections to the collector and broken report streams.",
                self.connect_failures_total(),
            ),
        ];
        for (name, kind, help, value) in samples {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_value() {
        let stats = Arc::new(AuditStats::default());
        let (tx, _rx) = mpsc::channel(8);
        for _ in 0..3 {
            tx.try_send(pb::AuditEvent::default()).unwrap();
        }
        stats.dropped_on_request_path(5);
        stats.spool_bytes.store(4096, Ordering::Relaxed);
        stats.batches_sent.store(7, Ordering::Relaxed);
        stats.batches_acked.store(6, Ordering::Relaxed);
        stats.connected.store(true, Ordering::Relaxed);
        let metrics = AuditMetrics::new(stats, tx.downgrade());
        let mut out = String::new();
        metrics.render_prometheus(&mut out);
        for line in [
            "palisade_audit_queue_depth 3",
            "palisade_audit_spool_bytes 4096",
            "palisade_audit_events_dropped_total 5",
            "palisade_audit_batches_sent_total 7",
            "palisade_audit_batches_acked_total 6",
            "palisade_audit_collector_connected 1",
            "palisade_audit_connect_failures_total 0",
            "# TYPE palisade_audit_events_dropped_total counter",
            "# TYPE palisade_audit_queue_depth gauge",
        ] {
            assert!(out.lines().any(|l| l == line), "{line:?} missing in\n{out}");
        }
        // Gone queue: depth 0, not a panic or a stale value.
        drop(tx);
        assert_eq!(metrics.queue_depth(), 0);
    }
}
