//! A test double of the operator's identity service: a real tonic server over
//! TLS that signs CSRs with an rcgen CA, for the identity the token names;
//! optionally with a minimal `Discovery` next to it that pushes mesh
//! destination tables ([`FakeDiscovery`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use palisade_proto::discovery::v1::discovery_server::DiscoveryServer;
use palisade_proto::identity::v1::identity_server::{Identity, IdentityServer};
use palisade_proto::identity::v1::{CertifyRequest, CertifyResponse};
use parking_lot::Mutex;
use rcgen::{CertificateParams, CertificateSigningRequestParams, SanType, SerialNumber};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::discovery::{DiscoverySvc, FakeDiscovery};
use super::{Leaf, OPERATOR, TestCa};

/// What the fake does wrong, when asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehaviour {
    #[default]
    None,
    /// Sign a key other than the CSR's.
    SignOtherKey,
    /// Put a foreign trust domain in the leaf.
    ForeignTrustDomain,
}

pub struct FakeOperator {
    pub ca: TestCa,
    pub ttl: Duration,
    /// token → SPIFFE ID
    pub tokens: HashMap<String, String>,
    /// While set, every request fails with UNAVAILABLE.
    pub fail: AtomicBool,
    pub misbehave: Mutex<Misbehaviour>,
    /// When each request arrived.
    pub calls: Mutex<Vec<Instant>>,
    serial: Mutex<u64>,
}

impl FakeOperator {
    pub fn new(ca: TestCa, ttl: Duration, tokens: &[(&str, &str)]) -> Arc<Self> {
        Arc::new(Self {
            ca,
            ttl,
            tokens: tokens
                .iter()
                .map(|(t, id)| ((*t).to_owned(), (*id).to_owned()))
                .collect(),
            fail: AtomicBool::new(false),
            misbehave: Mutex::new(Misbehaviour::None),
            calls: Mutex::new(Vec::new()),
            serial: Mutex::new(0x1000),
        })
    }

    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    pub fn call_times(&self) -> Vec<Instant> {
        self.calls.lock().clone()
    }

    /// Serve over TLS with a leaf for `server_id` from `server_ca`; returns the address.
    pub async fn serve(self: &Arc<Self>, server_ca: &TestCa, server_id: &str) -> SocketAddr {
        let (cert, key) = server_ca.leaf_cert(&Leaf::spiffe(server_id));
        let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = incoming.local_addr().expect("local addr");
        let svc = IdentityServer::new(Service(self.clone()));
        let server = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("tls config")
            .add_service(svc)
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        addr
    }

    /// The usual set-up: its own CA signs both the operator's certificate and workloads'.
    pub async fn serve_default(self: &Arc<Self>) -> SocketAddr {
        self.serve(&self.ca, OPERATOR).await
    }

    /// Identity and `discovery` on one TLS port, accepting on `listener`
    /// (made wherever the test needs it, e.g. in a network namespace), as
    /// `OPERATOR` with a leaf from its own CA; client certificates optional
    /// (the first Certify has none), as the operator serves them.
    pub fn serve_with_discovery(
        self: &Arc<Self>,
        discovery: &Arc<FakeDiscovery>,
        listener: TcpListener,
    ) -> SocketAddr {
        let (cert, key) = self.ca.leaf_cert(&Leaf::spiffe(OPERATOR));
        let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
        let tls = ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(&self.ca.pem))
            .client_auth_optional(true);
        let incoming = TcpIncoming::from(listener);
        let addr = incoming.local_addr().expect("local addr");
        let server = Server::builder()
            .tls_config(tls)
            .expect("tls config")
            .add_service(IdentityServer::new(Service(self.clone())))
            .add_service(DiscoveryServer::new(DiscoverySvc(discovery.clone())))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        addr
    }
}

struct Service(Arc<FakeOperator>);

#[tonic::async_trait]
impl Identity for Service {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let op = &self.0;
        op.calls.lock().push(Instant::now());
        if op.fail.load(Ordering::SeqCst) {
            return Err(Status::unavailable("operator is having a bad day"));
        }
        let req = request.into_inner();
        let Some(id) = op.tokens.get(&req.token) else {
            return Err(Status::unauthenticated("unknown token"));
        };
        let mut csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let misbehave = *op.misbehave.lock();
        let id = match misbehave {
            Misbehaviour::ForeignTrustDomain => id.replace("cluster.local", "evil.example"),
            _ => id.clone(),
        };
        // Like the real operator: the identity comes from the token, never the CSR.
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| Status::internal("uri"))?,
        )];
        let serial = {
            let mut s = op.serial.lock();
            *s += 1;
            *s
        };
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + op.ttl).into();
        csr.params = params;
        let cert = if misbehave == Misbehaviour::SignOtherKey {
            let other = rcgen::KeyPair::generate().map_err(|e| Status::internal(e.to_string()))?;
            csr.params.signed_by(&other, &op.ca.issuer)
        } else {
            csr.signed_by(&op.ca.issuer)
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        let mut resp = CertifyResponse {
            cert_chain_pem: vec![cert.pem()],
            trust_bundle_pem: vec![op.ca.pem.clone()],
            spiffe_id: id,
            ..Default::default()
        };
        resp.expires_at = Some(Default::default());
        if let Some(ts) = resp.expires_at.as_mut() {
            ts.seconds = (now + op.ttl)
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
        }
        Ok(Response::new(resp))
    }
}
