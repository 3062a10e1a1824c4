//! Root rotation: with old and new roots in the bundle, leaves from either
//! talk to each other; once the old root is swapped out of the (live) bundle,
//! its leaves are refused on new handshakes while established connections go on.

mod common;

use common::{EchoClient, EchoServer, ORDERS, TestCa, WEB, tls_error, trust};
use palisade_agent::tls::{MtlsMode, TrustBundle};
use rustls::CertificateError;

#[tokio::test]
async fn old_and_new_roots_during_rotation_then_old_removed() {
    let old = TestCa::new("root 2025");
    let new = TestCa::new("root 2026");
    // Two agents, each with its own bundle holding both roots.
    let a = trust(&[&old, &new]); // leaf from the old root
    let b = trust(&[&old, &new]); // leaf from the new root
    let a_store = old.store(WEB);
    let b_store = new.store(ORDERS);

    let mut a_server = EchoServer::start(
        a.server_config(a_store.clone(), MtlsMode::Strict).unwrap(),
        a.clone(),
    )
    .await;
    let mut b_server = EchoServer::start(
        b.server_config(b_store.clone(), MtlsMode::Strict).unwrap(),
        b.clone(),
    )
    .await;

    // old → new and new → old, both verified both ways.
    let mut established = EchoClient::dial(
        b_server.addr,
        a.client_config(Some(a_store.clone()), None).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(established.seen_as, WEB);
    assert_eq!(b_server.next().await.unwrap().unwrap().as_str(), WEB);
    let conn = EchoClient::dial(
        a_server.addr,
        b.client_config(Some(b_store.clone()), None).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(conn.seen_as, ORDERS);
    assert_eq!(a_server.next().await.unwrap().unwrap().as_str(), ORDERS);

    // Rotation finished: only the new root remains, swapped into the live bundles.
    let only_new = || TrustBundle::from_der(vec![new.der.clone()]).unwrap();
    a.bundle().replace(only_new());
    b.bundle().replace(only_new());

    // The old root's leaf is refused by a server…
    assert!(
        EchoClient::dial(
            b_server.addr,
            a.client_config(Some(a_store.clone()), None).unwrap()
        )
        .await
        .is_err()
    );
    let err = b_server.next().await.expect_err("old leaf accepted");
    assert_eq!(
        tls_error(&err),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
    // …and by a client, when a server presents it.
    let err = EchoClient::dial(
        a_server.addr,
        b.client_config(Some(b_store.clone()), None).unwrap(),
    )
    .await
    .err()
    .expect("old server leaf accepted");
    assert_eq!(
        tls_error(&err),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );

    // New-root leaves still work with each other.
    let new_store = new.store(WEB);
    let conn = EchoClient::dial(
        b_server.addr,
        b.client_config(Some(new_store), None).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(conn.seen_as, WEB);
    b_server.next().await.unwrap();

    // The connection made before the swap was verified then and carries on.
    established.echo(b"still here").await.unwrap();
}
