//! Loopback mTLS set-ups shared by the handshake tests: an [`EchoServer`] on
//! the agent's inbound config, and a whole one-CA mesh around one.

use std::sync::Arc;

use palisade_agent::tls::{MeshTrust, MtlsMode};
use rustls::server::ResolvesServerCert;

use super::{EchoServer, ORDERS, TestCa, trust};

/// An [`EchoServer`] on `trust`'s inbound config in `mode`, presenting `certs`.
pub async fn echo_server(
    trust: &MeshTrust,
    certs: Arc<dyn ResolvesServerCert>,
    mode: MtlsMode,
) -> EchoServer {
    EchoServer::start(trust.server_config(certs, mode).unwrap(), trust.clone()).await
}

/// A new mesh CA, the trust built on it, and an [`echo_server`] in `mode`
/// presenting a valid ORDERS leaf from that CA.
pub async fn orders_mesh(mode: MtlsMode) -> (TestCa, MeshTrust, EchoServer) {
    let ca = TestCa::new("mesh root");
    let t = trust(&[&ca]);
    let server = echo_server(&t, ca.store(ORDERS), mode).await;
    (ca, t, server)
}
