//! Path normalization and route-index lookup costs on the request hot path.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_policy::normalize::{NormalizeOptions, normalize_target};
use palisade_policy::path_index::{PathIndex, PathPattern};

/// 60 bytes, already normal: must take the borrowed fast path.
const NORMAL_60: &str = "/api/v1/tenants/acme-corp/orders/123456/items/987/detail.jsn";
/// 60 bytes needing decoding, slash merging and dot removal.
const DIRTY_60: &str = "/api/v1/tenants//acme/%2e/orders/x/../123456/items/%2E%2e/dj";

fn bench_normalize(c: &mut Criterion) {
    assert_eq!(NORMAL_60.len(), 60);
    assert_eq!(DIRTY_60.len(), 60);
    let options = NormalizeOptions::default();
    c.bench_function("normalize/already_normal_60B", |b| {
        b.iter(|| normalize_target(black_box(NORMAL_60), &options))
    });
    c.bench_function("normalize/needs_work_60B", |b| {
        b.iter(|| normalize_target(black_box(DIRTY_60), &options))
    });
}

/// 1,000 patterns: 400 exact, 300 template, 300 prefix, over 100 services.
fn thousand_patterns() -> PathIndex<u32> {
    let mut index = PathIndex::new();
    let mut id = 0;
    let mut add = |index: &mut PathIndex<u32>, pattern| {
        id += 1;
        if let Err(e) = index.insert(pattern, id) {
            panic!("bench pattern rejected: {e}");
        }
    };
    for svc in 0..100 {
        for ep in ["health", "ready", "metrics", "version"] {
            add(
                &mut index,
                PathPattern::Exact(format!("/api/v1/svc{svc}/{ep}")),
            );
        }
        for t in [
            "orders/{id}",
            "orders/{id}/items/{item}",
            "users/{user}/profile",
        ] {
            add(
                &mut index,
                PathPattern::Template(format!("/api/v1/svc{svc}/{t}")),
            );
        }
        for p in ["static", "admin", "internal/debug"] {
            add(
                &mut index,
                PathPattern::Prefix(format!("/api/v1/svc{svc}/{p}")),
            );
        }
    }
    index
}

fn bench_index(c: &mut Criterion) {
    let index = thousand_patterns();
    let mut group = c.benchmark_group("path_index_1000");
    for (name, path) in [
        ("template_hit", "/api/v1/svc42/orders/123456/items/987"),
        ("prefix_hit", "/api/v1/svc42/internal/debug/pprof/heap"),
        ("exact_hit", "/api/v1/svc42/health"),
        ("miss", "/api/v1/svc42/unknown/route/that/is/deep"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut best = None;
                index.for_each_match(black_box(path), |v, s| {
                    if best.is_none_or(|(bs, _)| s > bs) {
                        best = Some((s, *v));
                    }
                });
                best
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_normalize, bench_index);
criterion_main!(benches);
