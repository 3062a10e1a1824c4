//! `decide` on workloads with 10, 100 and 1,000 routes and 50 roles: an
//! allowed request through role-based rules, the common case on the hot path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use palisade_policy::engine::{PolicyEngine, Request, RequestTime};
use palisade_policy::identity::SpiffeId;
use palisade_policy::wire as pb;

const ROLES: usize = 50;

/// A workload with `routes` routes of mixed kinds (a third exact, a third
/// templates, a third prefixes), each allowing a few roles, plus a global
/// deny route and a rate limit, as a generated WorkloadPolicy.
fn workload(routes: usize) -> pb::WorkloadPolicy {
    let roles = (0..ROLES)
        .map(|i| pb::Role {
            id: format!("bench/p/roles/r{i}"),
            principals: vec![format!("spiffe://cluster.local/ns/ns{i}/sa/client")],
            claims: vec![pb::ClaimMatch {
                name: "groups".into(),
                values: vec![format!("g{i}")],
            }],
            ..Default::default()
        })
        .collect();
    let mut out: Vec<pb::Route> = (0..routes)
        .map(|i| {
            let path = match i % 3 {
                0 => pb::path_match::Kind::Exact(format!("/svc{i}/items")),
                1 => pb::path_match::Kind::Template(format!("/svc{i}/items/{{id}}")),
                _ => pb::path_match::Kind::Prefix(format!("/svc{i}/static")),
            };
            pb::Route {
                id: format!("bench/p/routes[{i}]"),
                path: Some(pb::PathMatch { kind: Some(path) }),
                methods: vec!["GET".into(), "POST".into()],
                allow: vec![pb::Rule {
                    id: format!("bench/p/routes[{i}]/allow[0]"),
                    roles: vec![(i % ROLES) as u32, ((i + 7) % ROLES) as u32],
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    out.push(pb::Route {
        id: "bench/p/routes/admin".into(),
        path: Some(pb::PathMatch {
            kind: Some(pb::path_match::Kind::Prefix("/admin".into())),
        }),
        deny: vec![pb::Rule {
            id: "bench/p/routes/admin/deny[0]".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    out.push(pb::Route {
        id: "bench/p/routes/limit".into(),
        rate_limit: Some(pb::RateLimit {
            id: "bench/p/routes/limit/rateLimit".into(),
            algorithm: pb::rate_limit::Algorithm::TokenBucket as i32,
            amount: u64::MAX / 4,
            period_ms: 1000,
            key: pb::rate_limit::KeyKind::Principal as i32,
            scope: pb::rate_limit::Scope::Local as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    pb::WorkloadPolicy {
        version: "bench".into(),
        default_action: pb::DefaultAction::AllAuthenticated as i32,
        default_mtls: pb::MtlsMode::Strict as i32,
        roles,
        routes: out,
        ..Default::default()
    }
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide_allowed");
    for routes in [10usize, 100, 1000] {
        let engine = PolicyEngine::load(workload(routes)).expect("policy loads");
        // The request hits a template route near the end of the table, held by
        // the role matched through the principal.
        let i = (routes - 2) / 3 * 3 + 1;
        let target = format!("/svc{i}/items/42?expand=true");
        let peer = SpiffeId::parse(&format!(
            "spiffe://cluster.local/ns/ns{}/sa/client",
            (i + 7) % ROLES
        ))
        .expect("spiffe id");
        let headers = HeaderMap::new();
        let method = Method::GET;
        let request = Request {
            method: &method,
            target: &target,
            host: Some("svc.shop.svc.cluster.local"),
            headers: &headers,
            port: 8080,
            peer_addr: "10.0.0.1".parse().expect("ip"),
            peer: Some(&peer),
            jwt_claims: None,
            api_key_client: None,
            credential_error: None,
            has_body: false,
            time: RequestTime {
                unix_seconds: 1_795_608_000,
                monotonic: Duration::from_secs(1),
            },
        };
        assert!(
            engine.decide(&request).allowed(),
            "benchmark request must be allowed"
        );
        group.bench_with_input(BenchmarkId::from_parameter(routes), &request, |b, r| {
            b.iter(|| black_box(engine.decide(black_box(r)).verdict.allowed))
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
