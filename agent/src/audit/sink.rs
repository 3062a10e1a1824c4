//! Where recorded events go besides the log: [`AuditSink`], the request
//! path's end of a bounded in-memory queue, and [`AuditQueue`], the
//! reporter's end.
//!
//! The request path never waits on audit: [`AuditSink::submit`] converts
//! the event and `try_send`s it; when the queue is full the event is
//! dropped and counted, and the next batch to the collector says how many
//! were lost (`dropped_since_last`).
//!
//! A sink reaches the call sites as a field of the inbound proxy's
//! configuration (`InboundConfig::audit`), not as a process global, so
//! several proxies in one process (tests, several listeners) each report
//! through their own.

use std::sync::Arc;
use std::time::SystemTime;

use palisade_proto::audit::v1 as pb;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::metrics::{AuditMetrics, AuditStats};
use super::wire::to_wire;
use super::{AllowedSampler, AuditEvent};

/// Events the queue holds by default: ten seconds of a 1 000 denials/s
/// burst while the reporter is stalled on a slow disk or a collector
/// handshake; a typical denial is ~330 bytes on the wire and ~1 KB queued,
/// so a full queue is about 10 MB. The
/// Kubernetes API server's audit webhook buffers the same 10 000
/// (`--audit-webhook-batch-buffer-size`).
pub const DEFAULT_QUEUE_EVENTS: usize = 10_000;

/// The request path's handle on the audit queue. Cheap to clone (one
/// `Arc`); [`AuditSink::disabled`] (the default) records log lines only.
#[derive(Clone, Debug, Default)]
pub struct AuditSink {
    inner: Option<Arc<Inner>>,
    sampler: Arc<AllowedSampler>,
}

#[derive(Debug)]
struct Inner {
    queue: mpsc::Sender<pb::AuditEvent>,
    stats: Arc<AuditStats>,
}

/// The reporter's end of the queue, with the counters both ends share.
#[derive(Debug)]
pub struct AuditQueue {
    pub(crate) events: mpsc::Receiver<pb::AuditEvent>,
    pub(crate) stats: Arc<AuditStats>,
    pub(crate) metrics: AuditMetrics,
}

impl AuditQueue {
    pub fn metrics(&self) -> &AuditMetrics {
        &self.metrics
    }

    /// The oldest queued event, without waiting (for consumers other than
    /// the reporter: tests, benchmarks).
    pub fn try_recv(&mut self) -> Option<pb::AuditEvent> {
        self.events.try_recv().ok()
    }
}

/// A queue of `capacity` events (at least 1): the sink to give the
/// request path, and the end to give the [`AuditReporter`](super::AuditReporter).
pub fn channel(capacity: usize) -> (AuditSink, AuditQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stats = Arc::new(AuditStats::default());
    let metrics = AuditMetrics::new(stats.clone(), tx.downgrade());
    let sink = AuditSink {
        inner: Some(Arc::new(Inner {
            queue: tx,
            stats: stats.clone(),
        })),
        sampler: Arc::default(),
    };
    let queue = AuditQueue {
        events: rx,
        stats,
        metrics,
    };
    (sink, queue)
}

impl AuditSink {
    /// A sink that sends nowhere: events are log lines only.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether the next allowed request is recorded at `percent`; the
    /// count is shared by every clone of this sink (one per agent).
    pub fn sample_allowed(&self, percent: u32) -> bool {
        self.sampler.sample(percent)
    }

    /// Whether events go to a queue besides the log.
    pub fn is_attached(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `event` (stamped now) for the collector, or drops and counts
    /// it when the queue is full or gone. Never waits.
    pub fn submit(&self, event: &AuditEvent<'_>) {
        let Some(inner) = &self.inner else {
            return;
        };
        // Full already: drop before paying for the conversion. A slot freed
        // in between only means this one event is dropped a moment early.
        if inner.queue.capacity() == 0 {
            inner.stats.dropped_on_request_path(1);
            return;
        }
        match inner.queue.try_send(to_wire(event, SystemTime::now())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                inner.stats.dropped_on_request_path(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(id: &str) -> AuditEvent<'_> {
        AuditEvent {
            request_id: id,
            reason: "authz.denied",
            status: 403,
            ..AuditEvent::under(None)
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (sink, mut queue) = channel(2);
        for id in ["a", "b", "c", "d", "e"] {
            sink.submit(&denial(id));
        }
        assert_eq!(queue.metrics().queue_depth(), 2);
        assert_eq!(queue.metrics().events_dropped_total(), 3);
        assert_eq!(
            queue
                .stats
                .dropped_unreported
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        // The first two, in order, with the request id carried over.
        assert_eq!(queue.try_recv().unwrap().request_id, "a");
        assert_eq!(queue.try_recv().unwrap().request_id, "b");
        assert!(queue.try_recv().is_none());
        // Room again: the next one is queued.
        sink.submit(&denial("f"));
        assert_eq!(queue.events.recv().await.unwrap().request_id, "f");
        assert_eq!(queue.metrics().events_dropped_total(), 3);
    }

    #[tokio::test]
    async fn a_gone_reporter_counts_drops() {
        let (sink, queue) = channel(4);
        let metrics = queue.metrics().clone();
        drop(queue);
        sink.submit(&denial("a"));
        assert_eq!(metrics.events_dropped_total(), 1);
    }

    #[test]
    fn a_disabled_sink_sends_nothing() {
        let sink = AuditSink::disabled();
        assert!(!sink.is_attached());
        sink.submit(&denial("a"));
        assert!(!AuditSink::default().is_attached());
    }

    #[test]
    fn clones_share_one_queue() {
        let (sink, queue) = channel(4);
        let other = sink.clone();
        sink.submit(&denial("a"));
        other.submit(&denial("b"));
        assert_eq!(queue.metrics().queue_depth(), 2);
    }
}
