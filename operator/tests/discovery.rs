//! `Discovery.Watch` end to end: the real `palisade-operator` binary with
//! `--source dir:`, real TLS with client certificates obtained through
//! `Identity.Certify`, real gRPC streams.

mod common;

use std::path::Path;

use common::watch::*;
use common::*;
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{MeshDestinations, Nack};
use palisade_proto::policy::v1::{DefaultAction, WorkloadPolicy, path_match};
use tonic::transport::Channel;
use tonic::{Code, Status};

const TOKEN_ORDERS: &str = "tok-orders-5e1f0c9a7b3d2e48";
const TOKEN_PAYMENTS: &str = "tok-payments-0b7c4d1e9f2a3c65";
const ID_ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const ID_PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";

fn policy_yaml(name: &str, path_prefix: &str) -> String {
    format!(
        r#"apiVersion: palisade.dev/v1alpha1
kind: ApiSecurityPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  ports: [8080]
  routes:
    - name: read
      match:
        path: {{prefix: {path_prefix}}}
        methods: [GET]
      allow:
        - namespaces: [web]
"#
    )
}

struct Setup {
    _tmp: tempfile::TempDir,
    policies: std::path::PathBuf,
    op: Operator,
}

fn start(with_source: bool, files: &[(&str, &str)]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        tmp.path(),
        &[
            (TOKEN_ORDERS, "shop", "orders"),
            (TOKEN_PAYMENTS, "shop", "payments"),
        ],
    );
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for (name, text) in files {
        std::fs::write(policies.join(name), text).unwrap();
    }
    let source = format!("dir:{}", policies.display());
    let mut extra = vec!["--source-poll-interval", "100ms"];
    if with_source {
        extra.extend(["--source", source.as_str()]);
    }
    let op = spawn_operator(&tmp.path().join("state"), &tokens, &extra);
    Setup {
        _tmp: tmp,
        policies,
        op,
    }
}

/// The operator serving `orders.yaml` for the orders workload.
fn start_with_orders() -> Setup {
    start(true, &[("orders.yaml", &policy_yaml("orders", "/orders"))])
}

/// A channel with the orders workload's certificate (from Certify).
async fn orders_channel(op: &Operator) -> Channel {
    channel(op, Some(identity_for(op, TOKEN_ORDERS, ID_ORDERS).await)).await
}

/// A channel with the payments workload's certificate (from Certify).
async fn payments_channel(op: &Operator) -> Channel {
    channel(
        op,
        Some(identity_for(op, TOKEN_PAYMENTS, ID_PAYMENTS).await),
    )
    .await
}

/// A Watch with orders' certificate, subscribing as a pod labelled `app`.
async fn watch_orders(op: &Operator, app: &str) -> Result<Watch, Status> {
    Watch::open(orders_channel(op).await, workload(ID_ORDERS, app)).await
}

/// Prefixes of the routes, in order.
fn prefixes(p: &WorkloadPolicy) -> Vec<String> {
    p.routes
        .iter()
        .filter_map(|r| match r.path.as_ref()?.kind.as_ref()? {
            path_match::Kind::Prefix(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write-then-rename, like editors and ConfigMap updates: the poller
    // never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn pushes_on_change_keeps_last_good_on_a_broken_edit_and_records_nacks() {
    let s = start_with_orders();
    let mut watch = watch_orders(&s.op, "orders").await.expect("watch accepted");

    // The first version reflects the YAML.
    let v1 = watch.next().await;
    assert_eq!(v1.workload, ID_ORDERS);
    assert_eq!(prefixes(&v1), vec!["/orders"]);
    assert_eq!(v1.routes[0].id, "shop/orders/routes/read");
    assert_eq!(v1.routes[0].methods, vec!["GET"]);
    assert_eq!(v1.routes[0].allow[0].namespaces, vec!["web"]);
    assert!(!v1.version.is_empty());
    watch.ack(&v1.version).await;
    wait_for_log(&s.op, "agent enforces policy version (ACK)").await;

    // An edit is pushed as a new version.
    write(
        &s.policies,
        "orders.yaml",
        &policy_yaml("orders", "/v2/orders"),
    );
    let v2 = watch.next().await;
    assert_ne!(v2.version, v1.version);
    assert_eq!(prefixes(&v2), vec!["/v2/orders"]);

    // A broken edit (unknown field) is rejected, naming file and field.
    let broken = policy_yaml("orders", "/v3/orders").replace("methods: [GET]", "methodz: [GET]");
    write(&s.policies, "orders.yaml", &broken);
    let line = wait_for_log(&s.op, "policy file rejected").await;
    assert!(line.contains("orders.yaml"), "{line}");
    let log = s.op.log();
    assert!(
        log.contains("spec.routes[0].match.methodz"),
        "the log names the bad field:\n{log}"
    );

    // Another file changes what this workload gets. The next version must
    // still carry orders.yaml's last good content (so nothing was pushed
    // for the broken edit: the stream is ordered).
    write(&s.policies, "extra.yaml", &policy_yaml("extra", "/extra"));
    let v3 = watch.next().await;
    let mut got = prefixes(&v3);
    got.sort();
    assert_eq!(got, vec!["/extra", "/v2/orders"]);

    // An agent that cannot load a version NACKs it; the operator records it.
    watch
        .send(Kind::Nack(Nack {
            version: v3.version.clone(),
            reason: "jwt provider shop/extra/jwt[0]: no issuer".into(),
        }))
        .await;
    let line = wait_for_log(&s.op, "agent refused policy version (NACK)").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&v3.version), "{line}");
    assert!(line.contains("no issuer"), "{line}");
    assert!(line.contains("instance-1"), "{line}");
}

#[tokio::test]
async fn unchanged_content_pushes_nothing_new() {
    let s = start_with_orders();
    let mut watch = watch_orders(&s.op, "orders").await.unwrap();
    let v1 = watch.next().await;
    // A comment and a policy for another workload: nothing this workload
    // enforces changes.
    let commented = format!("# reviewed\n{}", policy_yaml("orders", "/orders"));
    write(&s.policies, "orders.yaml", &commented);
    wait_for_count(&s.op, "policy file loaded", 2).await;
    let other = policy_yaml("billing", "/billing").replace("app: orders", "app: billing");
    write(&s.policies, "billing.yaml", &other);
    wait_for_log(&s.op, "policy set updated revision=2").await;
    // Then a real change: it is the very next message.
    write(&s.policies, "orders.yaml", &policy_yaml("orders", "/new"));
    let v2 = watch.next().await;
    assert_ne!(v1.version, v2.version);
    assert_eq!(prefixes(&v2), vec!["/new"]);
}

#[tokio::test]
async fn a_workload_no_policy_selects_gets_the_mesh_default() {
    let s = start_with_orders();
    let mut watch = watch_orders(&s.op, "not-orders").await.unwrap();
    let p = watch.next().await;
    assert!(p.routes.is_empty(), "{p:?}");
    assert!(p.sources.is_empty(), "{p:?}");
    assert_eq!(p.default_action, DefaultAction::AllAuthenticated as i32);
    assert_eq!(p.workload, ID_ORDERS);
}

#[tokio::test]
async fn watch_requires_a_client_certificate_for_the_named_workload() {
    let s = start_with_orders();

    // No client certificate at all.
    let err = Watch::open(channel(&s.op, None).await, workload(ID_ORDERS, "orders"))
        .await
        .err()
        .expect("refused without a client certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let ch = orders_channel(&s.op).await;
    // orders' certificate, asking for payments' policy.
    let err = Watch::open(ch.clone(), workload(ID_PAYMENTS, "orders"))
        .await
        .err()
        .expect("refused for another identity");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The right SPIFFE ID, but another namespace.
    let mut other_ns = workload(ID_ORDERS, "orders");
    other_ns.namespace = "billing".into();
    let err = Watch::open(ch.clone(), other_ns)
        .await
        .err()
        .expect("refused for another namespace");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The right SPIFFE ID, but another service account.
    let mut other_sa = workload(ID_ORDERS, "orders");
    other_sa.service_account = "payments".into();
    let err = Watch::open(ch.clone(), other_sa)
        .await
        .err()
        .expect("refused for another service account");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    wait_for_log(&s.op, "watch refused").await;

    // And the same channel, asking for itself, is served.
    let mut ok = Watch::open(ch, workload(ID_ORDERS, "orders"))
        .await
        .unwrap();
    assert_eq!(prefixes(&ok.next().await), vec!["/orders"]);
}

#[tokio::test]
async fn without_a_source_watch_is_refused_and_certify_still_works() {
    let s = start(false, &[]);
    let err = watch_orders(&s.op, "orders")
        .await
        .err()
        .expect("no source, no watch");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--source"), "{err:?}");
}

#[tokio::test]
async fn a_file_broken_at_start_up_is_logged_and_the_others_are_served() {
    let broken = policy_yaml("bad", "/bad").replace("prefix: /bad", "prefix: bad");
    let s = start(
        true,
        &[
            ("orders.yaml", &policy_yaml("orders", "/orders")),
            ("bad.yaml", &broken),
        ],
    );
    let line = wait_for_log(&s.op, "policy file rejected").await;
    assert!(line.contains("bad.yaml"), "{line}");
    let mut watch = watch_orders(&s.op, "orders").await.unwrap();
    assert_eq!(prefixes(&watch.next().await), vec!["/orders"]);
}

/// (network, port, spiffe_id) of every entry, in table order.
fn entries(t: &MeshDestinations) -> Vec<(String, u32, String)> {
    t.destinations
        .iter()
        .map(|d| (d.network.clone(), d.port, d.spiffe_id.clone()))
        .collect()
}

fn entry(network: &str, port: u32, id: &str) -> (String, u32, String) {
    (network.to_owned(), port, id.to_owned())
}

#[tokio::test]
async fn destinations_list_every_agent_and_drop_departed_ones() {
    let s = start_with_orders();
    let orders_ch = orders_channel(&s.op).await;
    let payments_ch = payments_channel(&s.op).await;

    let mut orders = Watch::open(
        orders_ch,
        advertising(ID_ORDERS, "orders-1", &[("127.0.0.1", 18080)]),
    )
    .await
    .expect("watch accepted");
    // The first response carries the policy and the table together.
    let first = orders.next_response().await;
    let policy = first.policy.expect("first response has the policy");
    assert_eq!(prefixes(&policy), vec!["/orders"]);
    let alone = first.destinations.expect("first response has the table");
    assert!(!alone.version.is_empty());
    assert_eq!(
        entries(&alone),
        vec![entry("127.0.0.1/32", 18080, ID_ORDERS)]
    );

    let mut payments = Watch::open(
        payments_ch,
        advertising(
            ID_PAYMENTS,
            "payments-1",
            &[("127.0.0.1", 18081), ("fd00::7", 0)],
        ),
    )
    .await
    .expect("watch accepted");
    let both = vec![
        entry("127.0.0.1/32", 18080, ID_ORDERS),
        entry("127.0.0.1/32", 18081, ID_PAYMENTS),
        entry("fd00::7/128", 0, ID_PAYMENTS),
    ];
    let first = payments.next_response().await;
    assert!(first.policy.is_some(), "{first:?}");
    let table = first.destinations.expect("first response has the table");
    assert_eq!(entries(&table), both);
    assert!(!table.version.is_empty());
    assert_ne!(table.version, alone.version);
    // The agent already subscribed gets the new table, without the policy.
    let pushed = orders.next_destinations().await;
    assert_eq!(entries(&pushed), both);
    assert_eq!(pushed.version, table.version);

    // payments goes away: orders gets the table without it, which is the
    // table it started with.
    drop(payments);
    let after = orders.next_destinations().await;
    assert_eq!(
        entries(&after),
        vec![entry("127.0.0.1/32", 18080, ID_ORDERS)]
    );
    assert_eq!(after.version, alone.version);
}

#[tokio::test]
async fn two_identities_claiming_one_endpoint_are_not_pinned() {
    let s = start_with_orders();
    let orders_ch = orders_channel(&s.op).await;
    let payments_ch = payments_channel(&s.op).await;
    let mut orders = Watch::open(
        orders_ch,
        advertising(
            ID_ORDERS,
            "orders-1",
            &[("10.0.0.5", 8080), ("10.0.0.5", 0)],
        ),
    )
    .await
    .unwrap();
    orders.next_response().await;
    let mut payments = Watch::open(
        payments_ch,
        advertising(ID_PAYMENTS, "payments-1", &[("10.0.0.5", 8080)]),
    )
    .await
    .unwrap();
    // Only the contested (ip, port) loses its pin; port 0 is another entry.
    let expected = vec![
        entry("10.0.0.5/32", 0, ID_ORDERS),
        entry("10.0.0.5/32", 8080, "*"),
    ];
    let table = payments
        .next_response()
        .await
        .destinations
        .expect("first response has the table");
    assert_eq!(entries(&table), expected);
    assert_eq!(entries(&orders.next_destinations().await), expected);
    let line = wait_for_log(&s.op, "several identities claim the same mesh endpoint").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(ID_ORDERS), "{line}");
    assert!(line.contains(ID_PAYMENTS), "{line}");
}

#[tokio::test]
async fn invalid_endpoints_are_refused_naming_the_field() {
    let s = start_with_orders();
    let ch = orders_channel(&s.op).await;
    let cases: &[(&[(&str, u32)], &str)] = &[
        (&[("x", 80)], "endpoints[0].ip: \"x\" is not an IP address"),
        (&[("127.0.0.1", 80), ("0.0.0.0", 80)], "endpoints[1].ip"),
        (&[("::", 80)], "endpoints[0].ip"),
        (&[("239.1.2.3", 80)], "endpoints[0].ip"),
        (&[("255.255.255.255", 80)], "endpoints[0].ip"),
        (&[("10.0.0.1", 70000)], "endpoints[0].port: 70000"),
    ];
    for (endpoints, field) in cases {
        let err = Watch::open(ch.clone(), advertising(ID_ORDERS, "o", endpoints))
            .await
            .err()
            .unwrap_or_else(|| panic!("{endpoints:?} accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{endpoints:?}: {err:?}");
        assert!(
            err.message().contains(field),
            "{endpoints:?}: {:?} does not name {field:?}",
            err.message()
        );
    }
    let many = vec![("10.0.0.1", 80); 17];
    let err = Watch::open(ch.clone(), advertising(ID_ORDERS, "o", &many))
        .await
        .err()
        .expect("17 endpoints accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("endpoints"), "{err:?}");

    // Nothing refused made it into the table: a valid subscriber sees only
    // itself (loopback and 16 endpoints are fine).
    let mut ok = Watch::open(ch, advertising(ID_ORDERS, "o", &[("127.0.0.1", 0)]))
        .await
        .expect("valid endpoints accepted");
    let table = ok.next_response().await.destinations.unwrap();
    assert_eq!(entries(&table), vec![entry("127.0.0.1/32", 0, ID_ORDERS)]);
}

#[tokio::test]
async fn policy_and_destination_changes_are_pushed_separately() {
    let s = start_with_orders();
    let orders_ch = orders_channel(&s.op).await;
    let payments_ch = payments_channel(&s.op).await;
    let mut orders = Watch::open(
        orders_ch,
        advertising(ID_ORDERS, "orders-1", &[("127.0.0.1", 18080)]),
    )
    .await
    .unwrap();
    let first = orders.next_response().await;
    let v1 = first.policy.unwrap();
    let t1 = first.destinations.unwrap();

    // A policy edit: the policy alone.
    write(&s.policies, "orders.yaml", &policy_yaml("orders", "/v2"));
    let r = orders.next_response().await;
    assert!(
        r.destinations.is_none(),
        "policy change resent the table: {r:?}"
    );
    let v2 = r.policy.expect("the new policy");
    assert_ne!(v2.version, v1.version);
    assert_eq!(prefixes(&v2), vec!["/v2"]);
    orders.ack(&v2.version).await;

    // Another agent arrives: the table alone (next_destinations checks
    // that the policy is absent).
    let _payments = Watch::open(
        payments_ch,
        advertising(ID_PAYMENTS, "payments-1", &[("127.0.0.1", 18081)]),
    )
    .await
    .unwrap();
    let t2 = orders.next_destinations().await;
    assert_ne!(t2.version, t1.version);

    // An agent that advertises nothing changes no table: the next message
    // orders gets is the next policy, alone.
    let extra_ch = orders_channel(&s.op).await;
    let mut silent = Watch::open(extra_ch, advertising(ID_ORDERS, "orders-2", &[]))
        .await
        .unwrap();
    let first = silent.next_response().await;
    assert_eq!(first.destinations.map(|t| t.version), Some(t2.version));
    write(&s.policies, "orders.yaml", &policy_yaml("orders", "/v3"));
    let r = orders.next_response().await;
    assert!(r.destinations.is_none(), "{r:?}");
    assert_eq!(prefixes(&r.policy.unwrap()), vec!["/v3"]);
    // The ACK still counts for the policy version (destinations are not ACKed).
    wait_for_log(&s.op, "agent enforces policy version (ACK)").await;
}
