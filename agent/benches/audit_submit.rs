//! What the request path pays for audit with a collector attached: building
//! a typical denial's [`AuditEvent`] (as the inbound pipeline does, borrowed
//! from the request) and recording it through the [`AuditSink`] — the wire
//! conversion and the `try_send` into the bounded queue.
//!
//! - `audit_submit/queue_not_full`: the event is converted and queued. The
//!   queue is emptied outside the timed section, between rounds.
//! - `audit_submit/queue_full`: the queue is full, the event is dropped and
//!   counted (what a flood costs once the reporter cannot keep up).
//!
//! No `tracing` subscriber is installed, so the log line the event also
//! becomes costs only its disabled-callsite check here; in the agent its
//! cost is the log formatter's, the same as before the sink existed.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_agent::audit::{self, AuditEvent, AuditSink, RateLimitSeen};

const QUEUE: usize = 10_000;

/// The peer's address, known per connection (not parsed per request).
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 12, 4, 7));

/// A denial as `Exchange::audit_event` builds it: every field borrowed.
fn record_denial(sink: &AuditSink, n: u64) {
    let request_id = "6f1c2b0e-8d4a-4f6e-9b1a-3c5d7e9f0a12";
    let event = AuditEvent {
        request_id,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        source_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
        source_ip: Some(black_box(PEER)),
        destination_workload: "shop/orders-api",
        destination_port: 8080,
        policy_version: "shop/orders-api@42",
        route: Some("orders"),
        method: "POST",
        path: Some("/orders/12345/items"),
        allowed: false,
        reason: "authz.denied",
        rule: Some("shop/orders-api routes[1].deny[0]"),
        status: 403,
        latency: Duration::from_micros(180 + n % 7),
        rate_limit: Some(RateLimitSeen {
            limit_id: "per-client",
            limit: 100,
            remaining: 37,
            reset_after: Duration::from_millis(800),
        }),
        jwt_subject: Some("alice@example.com"),
        api_key_client: None,
        shadow_reason: None,
    };
    // `None`: no sampling applies to a denial anyway.
    black_box(&event).record(sink, None);
}

fn submit(c: &mut Criterion) {
    let mut group = c.benchmark_group("audit_submit");

    group.bench_function("queue_not_full", |b| {
        let (sink, mut queue) = audit::channel(QUEUE);
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let round = left.min(QUEUE as u64);
                let start = Instant::now();
                for n in 0..round {
                    record_denial(&sink, n);
                }
                spent += start.elapsed();
                left -= round;
                // Empty the queue untimed, so the next round is queued too.
                while queue.try_recv().is_some() {}
            }
            assert_eq!(queue.metrics().events_dropped_total(), 0);
            spent
        });
    });

    group.bench_function("queue_full", |b| {
        let (sink, queue) = audit::channel(QUEUE);
        for n in 0..QUEUE as u64 {
            record_denial(&sink, n);
        }
        assert_eq!(queue.metrics().queue_depth(), QUEUE);
        b.iter(|| record_denial(&sink, 1));
        assert!(queue.metrics().events_dropped_total() > 0);
    });

    group.finish();
}

criterion_group!(benches, submit);
criterion_main!(benches);
