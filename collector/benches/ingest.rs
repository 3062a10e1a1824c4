//! SQLite ingest: batches of 500 realistic decisions appended one
//! transaction each (the ingest service's path), into a file in a temporary
//! directory, reported as events per second. The database keeps growing
//! over the run, as a live one does.
//!
//! Batches are shaped like an agent's: 20 agent instances take turns, each
//! reporting decisions of its own workload (the collector binds
//! `destination_workload` to the reporting agent), for that workload's
//! routes and its callers, with a fresh random request id per event.
//!
//! A second case groups 4 batches in one `append_many` transaction, as the
//! ingest service may for batches arriving together.
//!
//! `cargo bench -p palisade-collector --bench ingest`

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use palisade_collector::event::{BatchRecord, RecordKind, StoredEvent};
use palisade_collector::store::{Appended, AuditStore};

const EVENTS_PER_BATCH: u64 = 500;
const AGENTS: u64 = 20;
const ROUTES_PER_WORKLOAD: u64 = 8;
const CALLERS_PER_WORKLOAD: u64 = 6;
const PRINCIPALS: u64 = 40;

/// A cheap deterministic mix (no RNG dependency needed).
fn mix(n: u64) -> u64 {
    let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Decision `n` made by agent `agent`'s workload.
fn event(agent: u64, n: u64) -> StoredEvent {
    let r = mix(n);
    let mut e = StoredEvent::new(RecordKind::Decision, 1_700_000_000_000_000 + n as i64 * 10);
    e.request_id = format!("{:016x}{:016x}", r, mix(r));
    e.trace_id = format!("{:016x}{:016x}", mix(r ^ 1), mix(r ^ 2));
    e.reporter = format!("spiffe://cluster.local/ns/shop/sa/svc-{agent}");
    let caller = (agent * 3 + r % CALLERS_PER_WORKLOAD) % PRINCIPALS;
    e.source_principal = format!("spiffe://cluster.local/ns/shop/sa/client-{caller}");
    // The calling pod's address: each caller runs two pods.
    e.source_ip = format!("10.0.{caller}.{}", 10 + (r >> 8) % 2);
    e.destination_workload = format!("shop/svc-{agent}");
    e.destination_port = 8080;
    let route = (r >> 32) % ROUTES_PER_WORKLOAD;
    e.route = format!("svc-{agent}-api-{route}");
    e.method = ["GET", "GET", "GET", "POST", "PUT", "DELETE"][((r >> 40) % 6) as usize].to_owned();
    e.path = format!("/api/v1/orders/{}/items", (r >> 12) % 100_000);
    let deny = (r >> 44).is_multiple_of(10);
    let verdict = if deny { "deny" } else { "allow" };
    e.decision = verdict.to_owned();
    e.rule = format!("shop/svc-{agent} routes[{route}].{verdict}[0]");
    e.reason = if deny { "authz.denied" } else { "" }.to_owned();
    e.status = if deny { 403 } else { 200 };
    e.latency_us = 80 + (r >> 48) % 2000;
    if (r >> 52).is_multiple_of(4) {
        e.ratelimit_id = "per-client".to_owned();
        e.ratelimit_limit = Some(1000);
        e.ratelimit_remaining = Some((r >> 20) % 1000);
    }
    e.jwt_subject = format!("user-{}", (r >> 28) % 5000);
    e.policy_version = "sha256:3f1c9a".to_owned();
    e.headers = vec![
        ("user-agent".to_owned(), "orders-client/2.3.1".to_owned()),
        ("x-tenant".to_owned(), format!("tenant-{}", r % 40)),
    ];
    e
}

fn ingest(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let address = dir.path().join("audit.db");
    let store = runtime
        .block_on(AuditStore::open(address.to_str().expect("utf-8 path")))
        .expect("open store");
    let mut batches = 0u64;
    let mut next_batch = move || {
        let agent = batches % AGENTS;
        let sequence = batches / AGENTS + 1;
        let first = batches * EVENTS_PER_BATCH;
        batches += 1;
        BatchRecord {
            agent_instance_id: format!("agent-{agent}"),
            sequence,
            reporter: format!("spiffe://cluster.local/ns/shop/sa/svc-{agent}"),
            received_us: 1_700_000_000_000_000 + batches as i64 * 5_000,
            dropped_since_last: 0,
            events: (first..first + EVENTS_PER_BATCH)
                .map(|n| event(agent, n))
                .collect(),
        }
    };

    let mut group = c.benchmark_group("sqlite_ingest");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(EVENTS_PER_BATCH));
    group.bench_function("append_batch_of_500", |b| {
        b.iter_batched(
            &mut next_batch,
            |batch| {
                let outcome = runtime.block_on(store.append(&batch)).expect("append");
                assert_eq!(outcome, Appended::Stored);
            },
            BatchSize::SmallInput,
        );
    });
    // Batches arriving together from several agents, one transaction.
    const GROUP: u64 = 4;
    group.throughput(Throughput::Elements(EVENTS_PER_BATCH * GROUP));
    group.bench_function("append_many_4_batches_of_500", |b| {
        b.iter_batched(
            || (0..GROUP).map(|_| next_batch()).collect::<Vec<_>>(),
            |batches| {
                let outcome = runtime
                    .block_on(store.append_many(&batches))
                    .expect("append_many");
                assert!(outcome.iter().all(|o| *o == Appended::Stored));
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
