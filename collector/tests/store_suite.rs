//! The audit store, one suite for both backends: every test below runs as
//! `sqlite::NAME` (a file in a temporary directory) and `postgres::NAME` (a
//! database of its own on a real PostgreSQL server the tests start, see
//! `store_support`). Tampering is done with plain SQL on a connection of
//! the test's own, as someone with access to the database would.

mod store_support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use palisade_collector::event::{BatchRecord, RecordKind, StoredEvent, StoredRow};
use palisade_collector::store::{
    Appended, AuditStore, ChainProblemKind, EventQuery, Retention, StatsQuery, StoreError,
};
use store_support::PgServer;

// --- backends -----------------------------------------------------------------

enum Raw {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A store under test, the address it was opened at, and a way around it.
struct Fixture {
    store: AuditStore,
    address: String,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Arc<PgServer>>,
}

impl Fixture {
    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let address = format!("sqlite:{}", path.display());
        let store = AuditStore::open(&address).await.unwrap();
        assert!(matches!(store, AuditStore::Sqlite(_)));
        Fixture {
            store,
            address,
            raw: Raw::Sqlite(path),
            _dir: Some(dir),
            _server: None,
        }
    }

    async fn postgres() -> Option<Fixture> {
        let server = PgServer::shared().await?;
        let address = server.create_database().await;
        let store = AuditStore::open(&address).await.unwrap();
        assert!(matches!(store, AuditStore::Postgres(_)));
        Some(Fixture {
            store,
            raw: Raw::Postgres(address.clone()),
            address,
            _dir: None,
            _server: Some(server),
        })
    }

    /// Another handle on the same database (a second collector).
    async fn reopen(&self) -> AuditStore {
        AuditStore::open(&self.address).await.unwrap()
    }

    /// Runs `sql` on the database directly, not through the store.
    async fn exec(&self, sql: &str) {
        match &self.raw {
            Raw::Sqlite(path) => {
                let path = path.clone();
                let sql = sql.to_owned();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).unwrap();
                    conn.execute_batch(&sql).unwrap();
                })
                .await
                .unwrap();
            }
            Raw::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let task = tokio::spawn(connection);
                client.batch_execute(sql).await.unwrap();
                drop(client);
                let _ = task.await;
            }
        }
    }
}

/// Each listed `async fn name(f: Fixture)` becomes `sqlite::name` and
/// `postgres::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(fixture) = super::Fixture::postgres().await else {
                        return;
                    };
                    super::$name(fixture).await;
                }
            )*
        }
    };
}

on_both_backends!(
    round_trip_keeps_every_field,
    duplicates_are_stored_once,
    out_of_range_values_are_refused,
    every_filter_and_every_page,
    stats_count_what_was_stored,
    verify_is_clean_when_untouched,
    verify_finds_an_edited_record,
    verify_finds_a_deleted_batch,
    verify_finds_swapped_batches,
    retention_by_age_removes_exactly_the_old_batches,
    retention_by_size_removes_the_oldest_first,
    concurrent_handles_keep_one_chain,
);

// --- fixtures -------------------------------------------------------------------

const REPORTER: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// A decision as an agent would report it; `n` varies every field.
fn event(n: u64, time_us: i64) -> StoredEvent {
    let mut e = StoredEvent::new(RecordKind::Decision, time_us);
    e.request_id = format!("req-{n:06}");
    e.trace_id = format!("{:032x}", n * 7919);
    e.reporter = REPORTER.to_owned();
    e.source_principal = format!("spiffe://cluster.local/ns/shop/sa/client-{}", n % 3);
    e.source_ip = format!("10.0.{}.{}", n % 2, n % 5);
    e.destination_workload = format!("shop/orders-{}", n % 4);
    e.destination_port = 8080 + (n % 2) as u32;
    e.route = format!("route-{}", n % 25);
    e.method = ["GET", "POST", "DELETE"][(n % 3) as usize].to_owned();
    e.path = format!("/orders/{n}");
    e.decision = if n.is_multiple_of(5) { "deny" } else { "allow" }.to_owned();
    e.rule = format!("shop/orders-api routes[{}].allow[0]", n % 25);
    e.reason = if n.is_multiple_of(5) {
        "authz.denied"
    } else {
        ""
    }
    .to_owned();
    e.status = if n.is_multiple_of(5) { 403 } else { 200 };
    e.latency_us = 100 + n * 3;
    if n.is_multiple_of(7) {
        e.ratelimit_id = "per-client".to_owned();
        e.ratelimit_limit = Some(100);
        e.ratelimit_remaining = Some(n % 100);
    }
    e.jwt_subject = format!("user-{}", n % 11);
    e.api_key_client = if n.is_multiple_of(2) { "ci" } else { "" }.to_owned();
    e.audit_only = n.is_multiple_of(9);
    e.shadow_reason = if n.is_multiple_of(9) {
        "authz.denied"
    } else {
        ""
    }
    .to_owned();
    e.policy_version = "v42".to_owned();
    e.headers = vec![
        ("user-agent".to_owned(), format!("curl/{n}")),
        ("x-tenant".to_owned(), "acme".to_owned()),
    ];
    e
}

fn batch(instance: &str, sequence: u64, events: Vec<StoredEvent>) -> BatchRecord {
    BatchRecord {
        agent_instance_id: instance.to_owned(),
        sequence,
        reporter: REPORTER.to_owned(),
        received_us: 1_000_000 + sequence as i64,
        dropped_since_last: 0,
        events,
    }
}

/// `count` batches of `per_batch` events for `instance`, numbered from
/// sequence 1; event n has time 10_000 + n.
fn batches(instance: &str, count: u64, per_batch: u64) -> Vec<BatchRecord> {
    (1..=count)
        .map(|s| {
            let events = (0..per_batch)
                .map(|i| {
                    let n = (s - 1) * per_batch + i;
                    event(n, 10_000 + n as i64)
                })
                .collect();
            batch(instance, s, events)
        })
        .collect()
}

async fn append_all(store: &AuditStore, batches: &[BatchRecord]) {
    for b in batches {
        assert_eq!(
            store.append(b).await.unwrap(),
            Appended::Stored,
            "{}",
            b.sequence
        );
    }
}

/// Every row `q` matches, following the cursor page by page.
async fn all_pages(store: &AuditStore, q: &EventQuery) -> Vec<StoredRow> {
    let mut q = q.clone();
    let mut rows = Vec::new();
    for _ in 0..10_000 {
        let page = store.query(&q).await.unwrap();
        let limit = q.limit.unwrap_or(100).clamp(1, 1000) as usize;
        assert!(page.events.len() <= limit);
        rows.extend(page.events);
        match page.next_after_id {
            Some(after) => q.after_id = Some(after),
            None => return rows,
        }
    }
    panic!("pagination never ended");
}

async fn everything(store: &AuditStore) -> Vec<StoredRow> {
    all_pages(
        store,
        &EventQuery {
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await
}

fn problems(
    report: &palisade_collector::store::VerifyReport,
) -> Vec<(String, u64, ChainProblemKind)> {
    report
        .problems
        .iter()
        .map(|p| (p.agent_instance_id.clone(), p.sequence, p.kind))
        .collect()
}

// --- tests ----------------------------------------------------------------------

async fn round_trip_keeps_every_field(f: Fixture) {
    let mut full = event(7, 1_700_000_000_123_456);
    full.path = "/naïve/ünïcode/\u{1F512}".to_owned();
    full.ratelimit_limit = Some(i64::MAX as u64);
    full.ratelimit_remaining = Some(0);
    full.latency_us = i64::MAX as u64;
    full.headers = vec![
        ("accept".to_owned(), "a\"b\\c\n".to_owned()),
        ("accept".to_owned(), "second".to_owned()),
        ("x-empty".to_owned(), String::new()),
    ];
    let empty = StoredEvent::new(RecordKind::Decision, -5);
    let gap = StoredEvent::gap(REPORTER, 1_700_000_000_000_000, 12);
    let mut refused = StoredEvent::new(RecordKind::RefusedReport, 3);
    refused.source_principal = "spiffe://cluster.local/ns/evil/sa/x".to_owned();
    refused.reason = "reporter mismatch".to_owned();
    let mut first = batch("inst-1", 1, vec![gap.clone(), full.clone(), empty.clone()]);
    first.dropped_since_last = 12;
    let second = batch("inst-1", 2, vec![]);
    let third = batch("inst-2", 9, vec![refused.clone()]);
    append_all(&f.store, &[first, second, third]).await;

    let check = |rows: &[StoredRow]| {
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.agent_instance_id.as_str(), r.sequence, r.event.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("inst-1", 1, gap.clone()),
                ("inst-1", 1, full.clone()),
                ("inst-1", 1, empty.clone()),
                ("inst-2", 9, refused.clone()),
            ]
        );
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    };
    check(&everything(&f.store).await);
    // A second handle (tables already there) reads the same.
    let again = f.reopen().await;
    check(&everything(&again).await);
    assert_eq!(again.last_sequence("inst-1").await.unwrap(), Some(2));
    assert_eq!(again.last_sequence("inst-2").await.unwrap(), Some(9));
    assert_eq!(again.last_sequence("nobody").await.unwrap(), None);
    let report = again.verify().await.unwrap();
    assert_eq!(report.problems, vec![]);
    assert_eq!((report.instances, report.batches), (2, 3));
}

async fn duplicates_are_stored_once(f: Fixture) {
    let all = batches("inst", 4, 3);
    assert_eq!(f.store.append(&all[0]).await.unwrap(), Appended::Stored);
    assert_eq!(f.store.append(&all[0]).await.unwrap(), Appended::Duplicate);
    // A retry with other content is still the same (instance, sequence).
    let mut changed = all[0].clone();
    changed.events.pop();
    assert_eq!(f.store.append(&changed).await.unwrap(), Appended::Duplicate);
    // Several in one transaction, a repeat among them.
    let outcome = f
        .store
        .append_many(&[
            all[1].clone(),
            all[1].clone(),
            all[0].clone(),
            all[2].clone(),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        vec![
            Appended::Stored,
            Appended::Duplicate,
            Appended::Duplicate,
            Appended::Stored
        ]
    );
    assert_eq!(f.store.append_many(&[]).await.unwrap(), vec![]);
    let rows = everything(&f.store).await;
    let expected: Vec<_> = all[..3].iter().flat_map(|b| b.events.clone()).collect();
    assert_eq!(
        rows.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(f.store.last_sequence("inst").await.unwrap(), Some(3));
    assert_eq!(f.store.verify().await.unwrap().problems, vec![]);
}

async fn out_of_range_values_are_refused(f: Fixture) {
    let mut e = event(1, 1);
    e.latency_us = u64::MAX;
    let good = batch("inst", 1, vec![event(0, 0)]);
    let bad = batch("inst", 2, vec![e]);
    let err = f.store.append_many(&[good.clone(), bad]).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfRange {
                field: "latency_us",
                ..
            }
        ),
        "{err}"
    );
    let huge = batch("inst", u64::MAX, vec![]);
    assert!(matches!(
        f.store.append(&huge).await,
        Err(StoreError::OutOfRange {
            field: "sequence",
            ..
        })
    ));
    // Nothing of the refused call was written.
    assert_eq!(everything(&f.store).await, vec![]);
    assert_eq!(f.store.append(&good).await.unwrap(), Appended::Stored);
}

async fn every_filter_and_every_page(f: Fixture) {
    // 1200 decisions in 3 batches of 400, one batch from another reporter,
    // and a gap record.
    let mut all = batches("inst-a", 3, 400);
    for e in &mut all[2].events {
        e.reporter = "spiffe://cluster.local/ns/other/sa/agent".to_owned();
    }
    all[1].dropped_since_last = 4;
    all[1]
        .events
        .insert(0, StoredEvent::gap(REPORTER, 10_450, 4));
    append_all(&f.store, &all).await;
    let stored: Vec<StoredEvent> = all.iter().flat_map(|b| b.events.clone()).collect();

    let rows = everything(&f.store).await;
    assert_eq!(
        rows.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        stored
    );

    // Limits: 100 by default, never more than 1000.
    let page = f.store.query(&EventQuery::default()).await.unwrap();
    assert_eq!(page.events.len(), 100);
    assert_eq!(page.next_after_id, Some(page.events[99].id));
    let page = f
        .store
        .query(&EventQuery {
            limit: Some(5000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1000);
    let page = f
        .store
        .query(&EventQuery {
            after_id: Some(rows[rows.len() - 3].id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.next_after_id, None);

    type Pick = Box<dyn Fn(&StoredEvent) -> bool>;
    let some = |s: &str| Some(s.to_owned());
    let cases: Vec<(&str, EventQuery, Pick)> = vec![
        (
            "window",
            EventQuery {
                from_us: Some(10_100),
                to_us: Some(10_900),
                ..Default::default()
            },
            Box::new(|e| (10_100..10_900).contains(&e.time_us)),
        ),
        (
            "source principal",
            EventQuery {
                source: some("spiffe://cluster.local/ns/shop/sa/client-1"),
                ..Default::default()
            },
            Box::new(|e| e.source_principal == "spiffe://cluster.local/ns/shop/sa/client-1"),
        ),
        (
            "source ip",
            EventQuery {
                source: some("10.0.1.3"),
                ..Default::default()
            },
            Box::new(|e| e.source_ip == "10.0.1.3"),
        ),
        (
            "destination",
            EventQuery {
                destination: some("shop/orders-2"),
                ..Default::default()
            },
            Box::new(|e| e.destination_workload == "shop/orders-2"),
        ),
        (
            "decision",
            EventQuery {
                decision: some("deny"),
                ..Default::default()
            },
            Box::new(|e| e.decision == "deny"),
        ),
        (
            "route",
            EventQuery {
                route: some("route-7"),
                ..Default::default()
            },
            Box::new(|e| e.route == "route-7"),
        ),
        (
            "status",
            EventQuery {
                status: Some(403),
                ..Default::default()
            },
            Box::new(|e| e.status == 403),
        ),
        (
            "request id",
            EventQuery {
                request_id: some("req-000777"),
                ..Default::default()
            },
            Box::new(|e| e.request_id == "req-000777"),
        ),
        (
            "kind",
            EventQuery {
                kind: some("gap"),
                ..Default::default()
            },
            Box::new(|e| e.kind == RecordKind::Gap),
        ),
        (
            "reporter",
            EventQuery {
                reporter: some("spiffe://cluster.local/ns/other/sa/agent"),
                ..Default::default()
            },
            Box::new(|e| e.reporter == "spiffe://cluster.local/ns/other/sa/agent"),
        ),
        (
            "combined",
            EventQuery {
                from_us: Some(10_200),
                to_us: Some(11_000),
                decision: some("allow"),
                destination: some("shop/orders-1"),
                source: some("spiffe://cluster.local/ns/shop/sa/client-0"),
                ..Default::default()
            },
            Box::new(|e| {
                (10_200..11_000).contains(&e.time_us)
                    && e.decision == "allow"
                    && e.destination_workload == "shop/orders-1"
                    && e.source_principal == "spiffe://cluster.local/ns/shop/sa/client-0"
            }),
        ),
        (
            "nothing",
            EventQuery {
                route: some("' OR '1'='1"),
                ..Default::default()
            },
            Box::new(|_| false),
        ),
    ];
    for (name, q, pick) in cases {
        let expected: Vec<&StoredEvent> = stored.iter().filter(|e| pick(e)).collect();
        assert!(
            name == "nothing" || !expected.is_empty(),
            "{name}: empty case"
        );
        for limit in [7, 1000] {
            let q = EventQuery {
                limit: Some(limit),
                ..q.clone()
            };
            let got = all_pages(&f.store, &q).await;
            let ids: HashSet<i64> = got.iter().map(|r| r.id).collect();
            assert_eq!(ids.len(), got.len(), "{name}/{limit}: a row twice");
            assert!(
                got.windows(2).all(|w| w[0].id < w[1].id),
                "{name}: id order"
            );
            let got: Vec<&StoredEvent> = got.iter().map(|r| &r.event).collect();
            assert_eq!(got, expected, "{name}/{limit}");
        }
    }
}

async fn stats_count_what_was_stored(f: Fixture) {
    let mut all = batches("inst-a", 2, 300);
    all.extend(batches("inst-b", 1, 150));
    all[1].events.push(StoredEvent::gap(REPORTER, 10_100, 5));
    all[1].events.push(StoredEvent::gap(REPORTER, 10_200, 7));
    all[2].events.push(StoredEvent::gap(REPORTER, 99_999, 1000));
    let mut refused = StoredEvent::new(RecordKind::RefusedReport, 10_050);
    refused.decision = "deny".to_owned();
    all[2].events.push(refused);
    append_all(&f.store, &all).await;
    let stored: Vec<StoredEvent> = all.iter().flat_map(|b| b.events.clone()).collect();

    let expect = |from: Option<i64>, to: Option<i64>| {
        let inside = |e: &&StoredEvent| {
            from.is_none_or(|f| e.time_us >= f) && to.is_none_or(|t| e.time_us < t)
        };
        let decisions: Vec<&StoredEvent> = stored
            .iter()
            .filter(|e| e.kind == RecordKind::Decision)
            .filter(inside)
            .collect();
        let top = |key: fn(&StoredEvent) -> &str| {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for e in &decisions {
                *counts.entry(key(e).to_owned()).or_default() += 1;
            }
            let mut counts: Vec<(String, u64)> = counts.into_iter().collect();
            counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            counts.truncate(20);
            counts
        };
        let lost = stored
            .iter()
            .filter(|e| e.kind == RecordKind::Gap)
            .filter(inside)
            .map(|e| e.lost)
            .sum::<u64>();
        (
            decisions.len() as u64,
            top(|e| &e.decision),
            top(|e| &e.route),
            top(|e| &e.source_principal),
            lost,
        )
    };
    for (from, to) in [
        (None, None),
        (Some(10_100), Some(10_400)),
        (Some(10_150), None),
        (None, Some(10_150)),
    ] {
        let stats = f
            .store
            .stats(&StatsQuery {
                from_us: from,
                to_us: to,
            })
            .await
            .unwrap();
        let (total, by_decision, by_route, by_source, lost) = expect(from, to);
        assert_eq!(stats.total, total, "{from:?}..{to:?}");
        assert_eq!(stats.by_decision, by_decision, "{from:?}..{to:?}");
        assert_eq!(stats.by_route, by_route, "{from:?}..{to:?}");
        assert_eq!(stats.by_source, by_source, "{from:?}..{to:?}");
        assert_eq!(stats.lost, lost, "{from:?}..{to:?}");
    }
    let everything = f.store.stats(&StatsQuery::default()).await.unwrap();
    assert_eq!(everything.total, 750);
    assert_eq!(everything.lost, 1012);
    assert_eq!(everything.by_route.len(), 20, "25 routes, the top 20 kept");
    assert_eq!(
        everything.by_decision,
        vec![("allow".to_owned(), 600), ("deny".to_owned(), 150)]
    );
}

/// Two instances of 5 batches each, stored in turns.
async fn two_chains(f: &Fixture) {
    let a = batches("inst-a", 5, 4);
    let b = batches("inst-b", 5, 4);
    for (x, y) in a.iter().zip(&b) {
        append_all(&f.store, &[x.clone(), y.clone()]).await;
    }
}

async fn verify_is_clean_when_untouched(f: Fixture) {
    two_chains(&f).await;
    f.store.append(&batch("inst-c", 1, vec![])).await.unwrap();
    let mut gap = batch("inst-c", 2, vec![StoredEvent::gap(REPORTER, 1, 3)]);
    gap.dropped_since_last = 3;
    f.store.append(&gap).await.unwrap();
    let report = f.store.verify().await.unwrap();
    assert_eq!(report.problems, vec![]);
    assert_eq!((report.instances, report.batches), (3, 12));
    // An empty store.
    let empty = Fixture::sqlite().await;
    let report = empty.store.verify().await.unwrap();
    assert_eq!((report.instances, report.batches), (0, 0));
}

async fn verify_finds_an_edited_record(f: Fixture) {
    two_chains(&f).await;
    f.exec(
        "UPDATE audit_events SET decision = decision || 'x' WHERE id = \
         (SELECT MIN(e.id) FROM audit_events e JOIN audit_batches b ON b.id = e.batch_id \
          WHERE b.agent_instance_id = 'inst-a' AND b.sequence = 3)",
    )
    .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![("inst-a".to_owned(), 3, ChainProblemKind::Edited)],
        "{report:#?}"
    );
    // A batch column too.
    f.exec("UPDATE audit_batches SET reporter = 'spiffe://x' WHERE agent_instance_id = 'inst-b' AND sequence = 5")
        .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![
            ("inst-a".to_owned(), 3, ChainProblemKind::Edited),
            ("inst-b".to_owned(), 5, ChainProblemKind::Edited)
        ],
        "{report:#?}"
    );
}

async fn verify_finds_a_deleted_batch(f: Fixture) {
    two_chains(&f).await;
    f.exec(
        "DELETE FROM audit_events WHERE batch_id = \
           (SELECT id FROM audit_batches WHERE agent_instance_id = 'inst-a' AND sequence = 3); \
         DELETE FROM audit_batches WHERE agent_instance_id = 'inst-a' AND sequence = 3;",
    )
    .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![("inst-a".to_owned(), 3, ChainProblemKind::Missing)],
        "{report:#?}"
    );
    // The newest batch of the other instance, and then its first.
    f.exec(
        "DELETE FROM audit_events WHERE batch_id IN (SELECT id FROM audit_batches \
           WHERE agent_instance_id = 'inst-b' AND sequence IN (1, 5)); \
         DELETE FROM audit_batches WHERE agent_instance_id = 'inst-b' AND sequence IN (1, 5);",
    )
    .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![
            ("inst-a".to_owned(), 3, ChainProblemKind::Missing),
            ("inst-b".to_owned(), 1, ChainProblemKind::Missing),
            ("inst-b".to_owned(), 5, ChainProblemKind::Missing),
        ],
        "{report:#?}"
    );
}

async fn verify_finds_swapped_batches(f: Fixture) {
    two_chains(&f).await;
    f.exec(
        "UPDATE audit_batches SET sequence = -1 WHERE agent_instance_id = 'inst-a' AND sequence = 2; \
         UPDATE audit_batches SET sequence = 2 WHERE agent_instance_id = 'inst-a' AND sequence = 3; \
         UPDATE audit_batches SET sequence = 3 WHERE agent_instance_id = 'inst-a' AND sequence = -1;",
    )
    .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![
            ("inst-a".to_owned(), 2, ChainProblemKind::Reordered),
            ("inst-a".to_owned(), 3, ChainProblemKind::Reordered),
        ],
        "{report:#?}"
    );
    // Queries show the rows where they now are.
    let rows = all_pages(
        &f.store,
        &EventQuery {
            request_id: Some("req-000004".to_owned()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rows[0].sequence, 3);
}

async fn retention_by_age_removes_exactly_the_old_batches(f: Fixture) {
    // received_us: inst-a 100..600, inst-b 150, 250, 700; inst-c 100, 900,
    // 200 (a clock step: its third batch looks old but follows a young one).
    let mut a = batches("inst-a", 6, 3);
    for (i, b) in a.iter_mut().enumerate() {
        b.received_us = 100 * (i as i64 + 1);
    }
    let mut b = batches("inst-b", 3, 2);
    for (b, at) in b.iter_mut().zip([150, 250, 700]) {
        b.received_us = at;
    }
    let mut c = batches("inst-c", 3, 1);
    for (b, at) in c.iter_mut().zip([100, 900, 200]) {
        b.received_us = at;
    }
    append_all(&f.store, &a).await;
    append_all(&f.store, &b).await;
    append_all(&f.store, &c).await;

    // Cutoff 350: inst-a 1..=3, inst-b 1..=2, inst-c 1.
    let removed = f
        .store
        .apply_retention(
            Retention {
                max_age_us: Some(650),
                max_bytes: None,
            },
            1000,
        )
        .await
        .unwrap();
    assert_eq!(removed, 3 * 3 + 2 * 2 + 1);
    let left: Vec<(String, u64)> = everything(&f.store)
        .await
        .into_iter()
        .map(|r| (r.agent_instance_id, r.sequence))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let expected: Vec<(String, u64)> = [
        ("inst-a", 4),
        ("inst-a", 5),
        ("inst-a", 6),
        ("inst-b", 3),
        ("inst-c", 2),
        ("inst-c", 3),
    ]
    .into_iter()
    .map(|(i, s)| (i.to_owned(), s))
    .collect();
    assert_eq!(left, expected);
    let report = f.store.verify().await.unwrap();
    assert_eq!(report.problems, vec![], "{report:#?}");
    assert_eq!(report.batches, 6);
    // Nothing more to do at the same time; the high-water marks stay.
    let retention = Retention {
        max_age_us: Some(650),
        max_bytes: None,
    };
    assert_eq!(f.store.apply_retention(retention, 1000).await.unwrap(), 0);
    assert_eq!(f.store.last_sequence("inst-a").await.unwrap(), Some(6));

    // A retry of a removed batch is a duplicate; the chain goes on.
    assert_eq!(f.store.append(&a[1]).await.unwrap(), Appended::Duplicate);
    let next = batch("inst-a", 7, vec![event(99, 99)]);
    assert_eq!(f.store.append(&next).await.unwrap(), Appended::Stored);
    assert_eq!(f.store.verify().await.unwrap().problems, vec![]);

    // The anchor hides only what retention removed.
    f.exec(
        "DELETE FROM audit_events WHERE batch_id = \
           (SELECT id FROM audit_batches WHERE agent_instance_id = 'inst-a' AND sequence = 4); \
         DELETE FROM audit_batches WHERE agent_instance_id = 'inst-a' AND sequence = 4;",
    )
    .await;
    let report = f.store.verify().await.unwrap();
    assert_eq!(
        problems(&report),
        vec![("inst-a".to_owned(), 4, ChainProblemKind::Missing)],
        "{report:#?}"
    );
}

async fn retention_by_size_removes_the_oldest_first(f: Fixture) {
    let all = batches("inst-a", 24, 100);
    let other = batches("inst-b", 6, 100);
    append_all(&f.store, &all[..12]).await;
    append_all(&f.store, &other).await;
    append_all(&f.store, &all[12..]).await;
    let before = everything(&f.store).await;
    let size = f.store.size_bytes().await.unwrap();
    assert!(size > 0);

    let half = Retention {
        max_age_us: None,
        max_bytes: Some(size / 2),
    };
    let removed = f.store.apply_retention(half, 0).await.unwrap();
    let after = everything(&f.store).await;
    assert!(removed > 0 && !after.is_empty(), "removed {removed}");
    assert_eq!(before.len() - after.len(), removed as usize);
    // What is left is the newest part, whole batches.
    assert_eq!(after[..], before[before.len() - after.len()..]);
    assert!(after.iter().all(|r| r.id > before[removed as usize - 1].id));
    assert_eq!(after.len() % 100, 0);
    assert_eq!(f.store.verify().await.unwrap().problems, vec![]);
    // Under the limit: nothing more.
    let lenient = Retention {
        max_age_us: None,
        max_bytes: Some(size * 10),
    };
    assert_eq!(f.store.apply_retention(lenient, 0).await.unwrap(), 0);

    // Down to nothing, and the chains go on from where they were.
    let tiny = Retention {
        max_age_us: None,
        max_bytes: Some(1),
    };
    f.store.apply_retention(tiny, 0).await.unwrap();
    assert_eq!(everything(&f.store).await, vec![]);
    let report = f.store.verify().await.unwrap();
    assert_eq!(report.problems, vec![], "{report:#?}");
    let next = batch("inst-a", 25, vec![event(1, 1)]);
    assert_eq!(f.store.append(&next).await.unwrap(), Appended::Stored);
    let report = f.store.verify().await.unwrap();
    assert_eq!(report.problems, vec![], "{report:#?}");
    assert_eq!(report.batches, 1);
}

async fn concurrent_handles_keep_one_chain(f: Fixture) {
    let one = f.store.clone();
    let two = f.reopen().await;

    // Both collectors receive the same 40 batches (an agent retrying on
    // the other replica): each stored once.
    let same = batches("inst-same", 40, 5);
    let run = |store: AuditStore, batches: Vec<BatchRecord>| {
        tokio::spawn(async move {
            let mut outcome = Vec::new();
            for b in &batches {
                outcome.push(store.append(b).await.unwrap());
            }
            outcome
        })
    };
    let (x, y) = tokio::join!(
        run(one.clone(), same.clone()),
        run(two.clone(), same.clone())
    );
    let outcomes: Vec<Appended> = x.unwrap().into_iter().chain(y.unwrap()).collect();
    let stored = outcomes.iter().filter(|o| **o == Appended::Stored).count();
    assert_eq!((stored, outcomes.len() - stored), (40, 40));

    // Odd sequences through one, even through the other, and grouped
    // appends naming two instances in opposite orders.
    let mixed = batches("inst-mixed", 40, 5);
    let odd: Vec<_> = mixed
        .iter()
        .filter(|b| b.sequence % 2 == 1)
        .cloned()
        .collect();
    let even: Vec<_> = mixed
        .iter()
        .filter(|b| b.sequence % 2 == 0)
        .cloned()
        .collect();
    let p = batches("inst-p", 20, 2);
    let q = batches("inst-q", 20, 2);
    let grouped = |store: AuditStore, first: Vec<BatchRecord>, second: Vec<BatchRecord>| {
        tokio::spawn(async move {
            for (a, b) in first.iter().zip(&second) {
                let outcome = store.append_many(&[a.clone(), b.clone()]).await.unwrap();
                assert_eq!(outcome, vec![Appended::Stored; 2]);
            }
        })
    };
    let p_odd: Vec<_> = p.iter().filter(|b| b.sequence % 2 == 1).cloned().collect();
    let p_even: Vec<_> = p.iter().filter(|b| b.sequence % 2 == 0).cloned().collect();
    let q_odd: Vec<_> = q.iter().filter(|b| b.sequence % 2 == 1).cloned().collect();
    let q_even: Vec<_> = q.iter().filter(|b| b.sequence % 2 == 0).cloned().collect();
    let (a, b, c, d) = tokio::join!(
        run(one.clone(), odd),
        run(two.clone(), even),
        grouped(one.clone(), p_odd, q_odd),
        grouped(two.clone(), q_even, p_even),
    );
    assert!(
        a.unwrap()
            .iter()
            .chain(&b.unwrap())
            .all(|o| *o == Appended::Stored)
    );
    c.unwrap();
    d.unwrap();

    let rows = everything(&one).await;
    assert_eq!(rows.len(), 40 * 5 + 40 * 5 + 20 * 2 * 2);
    let report = two.verify().await.unwrap();
    assert_eq!(report.problems, vec![], "{report:#?}");
    assert_eq!((report.instances, report.batches), (4, 120));
    for (instance, last) in [("inst-same", 40), ("inst-mixed", 40), ("inst-p", 20)] {
        assert_eq!(one.last_sequence(instance).await.unwrap(), Some(last));
    }
}

// --- backend-independent ----------------------------------------------------------

#[tokio::test]
async fn addresses_pick_the_backend() {
    for bad in ["", "sqlite:", "mysql://db/audit", "postgres://[::1"] {
        let result = AuditStore::open(bad).await;
        assert!(
            matches!(result, Err(StoreError::Address(_))),
            "{bad:?}: {result:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.db");
    let store = AuditStore::open(plain.to_str().unwrap()).await.unwrap();
    assert!(matches!(store, AuditStore::Sqlite(_)));
    assert!(plain.exists());
}
