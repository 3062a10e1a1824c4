//! Two in-process agents (the `palisade_agent` library) certified by the real
//! `palisade-operator serve --cert-ttl 3s`: one HTTP/2 connection between them
//! over strict mTLS keeps carrying requests while both renew several times.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_agent::identity::{CertStore, RenewalConfig, RenewalEvent, Renewer, TokenSource};
use palisade_agent::tls::MeshTrust;
use palisade_e2e::{Operator, h2_connect, h2_get, start_h2_server, within};
use tokio::sync::broadcast;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB_TOKEN: &str = "e2e-web-token-0123456789abcdef";
const ORDERS_TOKEN: &str = "e2e-orders-token-0123456789abcdef";

/// One agent's identity half, as `palisade-agent identity` wires it, with
/// the token in a file like a projected ServiceAccount token.
struct Agent {
    trust: MeshTrust,
    store: Arc<CertStore>,
    events: broadcast::Receiver<RenewalEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_agent(operator: &Operator, token_file: std::path::PathBuf) -> Agent {
    let trust = operator.trust();
    let client = operator.identity_client(trust.clone(), TokenSource::File(token_file));
    let store = Arc::new(CertStore::new());
    // The production schedule: 70 % of the lifetime, 1 s floor, 1 s…60 s backoff.
    let renewer = Renewer::new(client, store.clone(), RenewalConfig::default());
    let events = renewer.subscribe();
    let task = tokio::spawn(renewer.run());
    Agent {
        trust,
        store,
        events,
        task,
    }
}

async fn first_certificate(agent: &mut Agent) -> String {
    let ev = tokio::time::timeout(Duration::from_secs(15), agent.events.recv())
        .await
        .expect("no certificate within 15 s")
        .expect("renewer gone");
    match ev {
        RenewalEvent::Issued { serial_hex, .. } => serial_hex,
        RenewalEvent::Failed { error, .. } => panic!("first certificate failed: {error}"),
    }
}

/// Drains the events seen so far: (certificates installed, failures).
fn drain(events: &mut broadcast::Receiver<RenewalEvent>) -> (usize, Vec<String>) {
    let mut issued = 0;
    let mut failed = Vec::new();
    while let Ok(ev) = events.try_recv() {
        match ev {
            RenewalEvent::Issued { .. } => issued += 1,
            RenewalEvent::Failed { error, .. } => failed.push(error),
        }
    }
    (issued, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_outlives_several_renewals() {
    within(Duration::from_secs(60), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let web_token = dir.path().join("web-token");
    let orders_token = dir.path().join("orders-token");
    std::fs::write(&web_token, format!("{WEB_TOKEN}\n")).unwrap();
    std::fs::write(&orders_token, format!("{ORDERS_TOKEN}\n")).unwrap();
    let operator = Operator::start_in(
        dir.path(),
        &[(WEB_TOKEN, "shop", "web"), (ORDERS_TOKEN, "shop", "orders")],
        "3s",
    )
    .await;

    let mut web = start_agent(&operator, web_token);
    let mut orders = start_agent(&operator, orders_token);
    let first_web = first_certificate(&mut web).await;
    let first_orders = first_certificate(&mut orders).await;
    assert_eq!(web.store.current().unwrap().spiffe_id().as_str(), WEB);
    assert_eq!(orders.store.current().unwrap().spiffe_id().as_str(), ORDERS);

    // orders serves (strict mTLS), web calls it and requires it to be orders.
    let server = start_h2_server(orders.trust.clone(), orders.store.clone()).await;
    let (mut long_lived, first_server_serial) =
        h2_connect(server, &web.trust, web.store.clone(), ORDERS)
            .await
            .expect("first connection");
    assert_eq!(first_server_serial, first_orders);

    let started = Instant::now();
    let mut requests = 0u32;
    let mut server_serials = BTreeSet::from([first_server_serial.clone()]);
    let mut client_serials = BTreeSet::from([first_web.clone()]);
    let mut probes = 0u32;
    let mut next_probe = Instant::now();
    // 10 s: past the first certificates' expiry (3 s) three times over.
    while started.elapsed() < Duration::from_secs(10) {
        let body = h2_get(&mut long_lived).await.unwrap_or_else(|e| {
            panic!(
                "request {requests} on the long-lived connection failed after {:?}: {e}\n\
                 operator output:\n{}",
                started.elapsed(),
                operator.proc.transcript()
            )
        });
        // Still the identity and certificate of the handshake that opened it,
        // long after that certificate expired.
        assert_eq!(body, format!("{WEB} {first_web}"));
        requests += 1;
        if Instant::now() >= next_probe {
            // A new handshake presents the current certificates on both sides.
            let (mut fresh, server_serial) =
                h2_connect(server, &web.trust, web.store.clone(), ORDERS)
                    .await
                    .unwrap_or_else(|e| panic!("new connection at {:?}: {e}", started.elapsed()));
            let body = h2_get(&mut fresh)
                .await
                .expect("request on a new connection");
            let (peer, client_serial) = body.split_once(' ').expect("body");
            assert_eq!(peer, WEB, "the server sees the client's SPIFFE ID");
            server_serials.insert(server_serial);
            client_serials.insert(client_serial.to_owned());
            probes += 1;
            next_probe = Instant::now() + Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(requests > 100, "only {requests} requests in 10 s");
    assert!(probes >= 10, "only {probes} new connections");
    // The long-lived connection is still usable at the end.
    assert_eq!(
        h2_get(&mut long_lived).await.unwrap(),
        format!("{WEB} {first_web}")
    );

    // 3 s certificates renewed at 70 %: about every 2.1 s, so 4 in 10 s.
    for (name, agent) in [("web", &mut web), ("orders", &mut orders)] {
        let (issued, failed) = drain(&mut agent.events);
        assert!(issued >= 3, "{name} renewed {issued} times");
        assert!(failed.is_empty(), "{name} renewals failed: {failed:?}");
    }
    assert!(
        server_serials.len() >= 4,
        "server serials seen by new handshakes: {server_serials:?}"
    );
    assert!(
        client_serials.len() >= 4,
        "client serials seen by new handshakes: {client_serials:?}"
    );
    assert_ne!(web.store.current().unwrap().serial_hex(), first_web);
    assert_ne!(orders.store.current().unwrap().serial_hex(), first_orders);
    // The operator logged an issuance for each identity, never a token.
    let issued = operator
        .proc
        .lines_matching(|l| l.contains("certificate issued"));
    assert!(issued.iter().any(|l| l.contains(WEB)), "{issued:#?}");
    assert!(issued.iter().any(|l| l.contains(ORDERS)), "{issued:#?}");
    assert!(
        operator
            .proc
            .lines_matching(|l| l.contains("token-0123456789"))
            .is_empty()
    );
}
