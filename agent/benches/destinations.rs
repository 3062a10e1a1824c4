//! The outbound destination table, at cluster sizes: what one outbound
//! connection pays to learn whom its destination must be, and what one
//! discovery push costs to turn into a table.
//!
//! Tables hold N pod entries (`10.x.y.z/32:8080`, each its own identity) plus
//! one `10.0.0.0/8=*` catch-all, as a mesh of N pods with one advertised port
//! each would have.
//! - `lookup_hit/N`: a pod in the middle of the table (half a scan).
//! - `lookup_catch_all/N`: an address no pod entry covers (the whole scan,
//!   then the /8).
//! - `build/N`: a discovery push of N entries parsed into a table.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade_agent::outbound::{DestinationEntry, DestinationTable};

const SIZES: [usize; 3] = [100, 1_000, 5_000];

fn pod_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(0x0a00_0000 | ((i / 250) << 8) | (i % 250 + 1))
}

/// The parts of one push, as the watcher receives them.
fn push(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{}/32", pod_ip(i)),
                format!("spiffe://cluster.local/ns/ns{}/sa/sa{i}", i % 40),
            )
        })
        .collect()
}

/// What the discovery watcher does with a push.
fn build(parts: &[(String, String)]) -> DestinationTable {
    let entries = parts
        .iter()
        .filter_map(|(network, id)| DestinationEntry::from_parts(network, 8080, id).ok())
        .chain("10.0.0.0/8=*".parse().ok());
    DestinationTable::from_entries(entries).0
}

fn destinations(c: &mut Criterion) {
    let mut group = c.benchmark_group("destinations");
    for n in SIZES {
        let parts = push(n);
        let table = build(&parts);
        let hit = IpAddr::V4(pod_ip(n / 2));
        let miss = IpAddr::V4(Ipv4Addr::new(10, 255, 255, 254));
        assert!(
            table
                .lookup(hit, 8080)
                .is_some_and(|p| p.pinned().is_some())
        );
        assert!(
            table
                .lookup(miss, 8080)
                .is_some_and(|p| p.pinned().is_none())
        );
        group.bench_with_input(BenchmarkId::new("lookup_hit", n), &n, |b, _| {
            b.iter(|| black_box(table.lookup(black_box(hit), black_box(8080))).is_some())
        });
        group.bench_with_input(BenchmarkId::new("lookup_catch_all", n), &n, |b, _| {
            b.iter(|| black_box(table.lookup(black_box(miss), black_box(8080))).is_some())
        });
        group.bench_with_input(BenchmarkId::new("build", n), &n, |b, _| {
            b.iter(|| black_box(build(black_box(&parts))).len())
        });
    }
    group.finish();
}

criterion_group!(benches, destinations);
criterion_main!(benches);
