//! The collector's own counters, rendered as Prometheus text on its admin
//! port. Labels are fixed, so the series count stays bounded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the storage latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            let n = bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the ingest service and the query API count.
#[derive(Debug, Default)]
pub struct CollectorMetrics {
    /// Decision events stored (duplicates not counted again).
    pub events_stored: Counter,
    /// Events agents reported lost (gap records).
    pub events_lost: Counter,
    /// Batches refused: malformed, or not the peer's own events.
    pub batches_refused: Counter,
    /// Batches received again after a reconnect and not stored twice.
    pub batches_duplicate: Counter,
    pub store_errors: Counter,
    pub store_latency: Histogram,
    /// Open `Audit.Report` streams.
    pub streams: Gauge,
    /// Query API requests refused for want of an identity or a token.
    pub queries_unauthorized: Counter,
}

impl CollectorMetrics {
    pub fn render(&self, out: &mut String) {
        let counters = [
            (
                "palisade_collector_events_stored_total",
                "Audit events stored.",
                &self.events_stored,
            ),
            (
                "palisade_collector_events_lost_total",
                "Events agents reported lost (stored as gap records).",
                &self.events_lost,
            ),
            (
                "palisade_collector_batches_refused_total",
                "Audit batches refused (malformed or not the peer's own).",
                &self.batches_refused,
            ),
            (
                "palisade_collector_batches_duplicate_total",
                "Audit batches received again and not stored twice.",
                &self.batches_duplicate,
            ),
            (
                "palisade_collector_store_errors_total",
                "Failed writes to the audit store.",
                &self.store_errors,
            ),
            (
                "palisade_collector_queries_unauthorized_total",
                "Query API requests without an allowed identity or token.",
                &self.queries_unauthorized,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP palisade_collector_report_streams Open Audit.Report streams.\n\
             # TYPE palisade_collector_report_streams gauge\n\
             palisade_collector_report_streams {}",
            self.streams.get()
        );
        self.store_latency.render(
            "palisade_collector_store_duration_seconds",
            "Time to store one audit batch.",
            out,
        );
    }
}
