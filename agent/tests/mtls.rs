//! Real mTLS handshakes on loopback between the agent's server and client
//! configs: who is accepted, who is refused and why, and that the verified
//! SPIFFE ID reaches the code after the handshake.

mod common;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::tls::{echo_server, orders_mesh};
use common::{EchoClient, EchoServer, Leaf, ORDERS, TestCa, WEB, tls_error, trust};
use palisade_agent::tls::{MeshTrust, MtlsMode};
use palisade_policy::identity::SpiffeId;
use rustls::{CertificateError, ClientConfig};

/// A strict server (valid ORDERS leaf from `server_ca`, trusting only it) and a
/// client presenting `client_leaf` from `client_ca`; returns the server's
/// handshake error.
async fn refused_by_server(
    server_ca: &TestCa,
    client_ca: &TestCa,
    client_leaf: Leaf,
) -> rustls::Error {
    let t = trust(&[server_ca]);
    let mut server = echo_server(&t, server_ca.store(ORDERS), MtlsMode::Strict).await;
    let client = t
        .client_config(Some(client_ca.resolver(&client_leaf)), None)
        .unwrap();
    let err = dial_refused(&mut server, client, "server accepted a bad peer").await;
    rustls_error(&err)
}

/// [`refused_by_server`] with a server of its own new mesh CA.
async fn server_refuses(client_ca: &TestCa, client_leaf: Leaf) -> rustls::Error {
    refused_by_server(&TestCa::new("mesh root"), client_ca, client_leaf).await
}

/// Dials `server` with `client`, which must fail on the client side too;
/// returns the server's handshake error (`why` if the server accepted).
async fn dial_refused(server: &mut EchoServer, client: ClientConfig, why: &str) -> io::Error {
    let dial = EchoClient::dial(server.addr, client).await;
    assert!(dial.is_err(), "the client must see the refusal too");
    server.next().await.expect_err(why)
}

/// The rustls error inside a handshake error; panics if there is none.
fn rustls_error(err: &io::Error) -> rustls::Error {
    tls_error(err)
        .cloned()
        .unwrap_or_else(|| panic!("not a TLS error: {err}"))
}

fn other_message(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.to_string(),
        other => panic!("expected an identity refusal, got {other:?}"),
    }
}

fn hours(h: u64) -> Duration {
    Duration::from_secs(h * 3600)
}

/// A leaf for `id` valid only from `not_before` to `not_after`.
fn leaf_valid_between(id: &str, not_before: SystemTime, not_after: SystemTime) -> Leaf {
    let mut leaf = Leaf::spiffe(id);
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    leaf
}

#[tokio::test]
async fn valid_peer_is_accepted_and_its_identity_reaches_the_pipeline() {
    let (ca, t, mut server) = orders_mesh(MtlsMode::Strict).await;
    let expected = SpiffeId::parse(ORDERS).unwrap();
    let client = t
        .client_config(Some(ca.store(WEB)), Some(expected))
        .unwrap();
    let mut conn = EchoClient::dial(server.addr, client).await.unwrap();
    let seen = server.next().await.unwrap().expect("an identity");
    assert_eq!(seen.as_str(), WEB);
    assert_eq!(seen.namespace(), "shop");
    assert_eq!(seen.service_account(), "web");
    assert_eq!(conn.seen_as, WEB);
    conn.echo(b"hello over mtls").await.unwrap();
    let (_, session) = conn.stream.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn expired_leaf_is_refused() {
    let ca = TestCa::new("mesh root");
    let now = SystemTime::now();
    let leaf = leaf_valid_between(WEB, now - hours(2), now - hours(1));
    // Same CA as the server trusts: only the dates are wrong.
    let err = server_refuses_same_ca(&ca, leaf).await;
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn not_yet_valid_leaf_is_refused() {
    let ca = TestCa::new("mesh root");
    let now = SystemTime::now();
    let leaf = leaf_valid_between(WEB, now + hours(1), now + hours(2));
    let err = server_refuses_same_ca(&ca, leaf).await;
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn leaf_from_a_foreign_ca_is_refused() {
    let foreign = TestCa::new("someone else's root");
    let err = server_refuses(&foreign, Leaf::spiffe(WEB)).await;
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn wrong_trust_domain_is_refused() {
    let ca = TestCa::new("mesh root");
    let err =
        server_refuses_same_ca(&ca, Leaf::spiffe("spiffe://evil.example/ns/shop/sa/web")).await;
    let msg = other_message(&err);
    assert!(msg.contains("trust domain"), "{msg}");
}

#[tokio::test]
async fn two_uri_sans_are_refused() {
    let ca = TestCa::new("mesh root");
    let mut leaf = Leaf::spiffe(WEB);
    leaf.uris.push(ORDERS.to_owned());
    let err = server_refuses_same_ca(&ca, leaf).await;
    let msg = other_message(&err);
    assert!(msg.contains("2 URI SANs"), "{msg}");
}

#[tokio::test]
async fn dns_only_san_is_refused() {
    let ca = TestCa::new("mesh root");
    let mut leaf = Leaf::spiffe(WEB);
    leaf.uris.clear();
    leaf.dns.push("web.shop.svc.cluster.local".into());
    let err = server_refuses_same_ca(&ca, leaf).await;
    let msg = other_message(&err);
    assert!(msg.contains("no URI SAN"), "{msg}");
}

#[tokio::test]
async fn strict_mode_refuses_a_client_without_certificate() {
    let (_ca, t, mut server) = orders_mesh(MtlsMode::Strict).await;
    let client = t.client_config(None, None).unwrap();
    let err = dial_refused(&mut server, client, "accepted without a certificate").await;
    assert_eq!(
        tls_error(&err),
        Some(&rustls::Error::NoCertificatesPresented)
    );
}

#[tokio::test]
async fn permissive_mode_accepts_a_client_without_certificate_and_no_identity() {
    let (_ca, t, mut server) = orders_mesh(MtlsMode::Permissive).await;
    let client = t.client_config(None, None).unwrap();
    let mut conn = EchoClient::dial(server.addr, client).await.unwrap();
    assert_eq!(server.next().await.unwrap(), None);
    assert_eq!(conn.seen_as, "-");
    conn.echo(b"anonymous").await.unwrap();
}

#[tokio::test]
async fn permissive_mode_still_refuses_a_bad_certificate() {
    let (_ca, t, mut server) = orders_mesh(MtlsMode::Permissive).await;
    let foreign = TestCa::new("foreign");
    let client = t
        .client_config(Some(foreign.resolver(&Leaf::spiffe(WEB))), None)
        .unwrap();
    let err = dial_refused(&mut server, client, "a presented bad cert passed").await;
    assert_eq!(
        tls_error(&err),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

/// Client side: the server's certificate goes through the same rule.
async fn client_refuses(server_leaf: Leaf, expected: Option<&str>) -> rustls::Error {
    let ca = TestCa::new("mesh root");
    let t = trust(&[&ca]);
    let _server = echo_server(&t, ca.resolver(&server_leaf), MtlsMode::Permissive).await;
    let expected = expected.map(|e| SpiffeId::parse(e).unwrap());
    let client = t.client_config(Some(ca.store(WEB)), expected).unwrap();
    let err = EchoClient::dial(_server.addr, client)
        .await
        .err()
        .expect("client accepted a bad server");
    rustls_error(&err)
}

#[tokio::test]
async fn client_refuses_a_server_of_another_trust_domain() {
    let err = client_refuses(
        Leaf::spiffe("spiffe://evil.example/ns/shop/sa/orders"),
        None,
    )
    .await;
    assert!(other_message(&err).contains("trust domain"));
}

#[tokio::test]
async fn client_refuses_a_server_that_is_not_the_expected_identity() {
    let err = client_refuses(Leaf::spiffe(WEB), Some(ORDERS)).await;
    let msg = other_message(&err);
    assert!(
        msg.contains("expected spiffe://cluster.local/ns/shop/sa/orders"),
        "{msg}"
    );
}

#[tokio::test]
async fn client_refuses_an_expired_server() {
    let now = SystemTime::now();
    let leaf = leaf_valid_between(ORDERS, now - hours(2), now - hours(1));
    let err = client_refuses(leaf, Some(ORDERS)).await;
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[derive(Debug)]
struct FixedTime(SystemTime);

impl rustls::time_provider::TimeProvider for FixedTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(rustls_pki_types::UnixTime::since_unix_epoch(
            self.0.duration_since(SystemTime::UNIX_EPOCH).ok()?,
        ))
    }
}

#[tokio::test]
async fn verification_time_is_injectable() {
    // The server lives two hours ahead: a leaf valid for the next hour is
    // already expired by its clock.
    let ca = TestCa::new("mesh root");
    let later: MeshTrust =
        trust(&[&ca]).with_time_provider(Arc::new(FixedTime(SystemTime::now() + hours(2))));
    let mut server = echo_server(&later, ca.store(ORDERS), MtlsMode::Strict).await;
    let client: ClientConfig = trust(&[&ca])
        .client_config(Some(ca.store(WEB)), None)
        .unwrap();
    let err = dial_refused(&mut server, client, "accepted by the future clock").await;
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ),
        "{err:?}"
    );
}

/// Like [`server_refuses`] but the bad leaf is signed by the CA the server trusts.
async fn server_refuses_same_ca(ca: &TestCa, client_leaf: Leaf) -> rustls::Error {
    refused_by_server(ca, ca, client_leaf).await
}
