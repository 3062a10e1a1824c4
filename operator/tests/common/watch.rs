//! A Discovery.Watch client as an agent uses it: a client certificate from
//! `Identity.Certify`, real TLS, one bidirectional stream.

use std::time::Duration;

use palisade_proto::discovery::v1::discovery_client::DiscoveryClient;
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{
    Ack, MeshDestinations, MeshEndpoint, WatchRequest, WatchResponse, WorkloadRef,
};
use palisade_proto::policy::v1::WorkloadPolicy;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{Operator, certify, csr, install_ring};

/// Each step waits at most this long for something to happen.
pub const STEP: Duration = Duration::from_secs(10);

/// A certificate for the workload `token` stands for (its SPIFFE ID is `id`).
pub async fn identity_for(op: &Operator, token: &str, id: &str) -> Identity {
    let mut client = op.client().await;
    let (key, csr_pem) = csr(vec![]);
    let resp = certify(&mut client, token, &csr_pem, 0).await.unwrap();
    assert_eq!(resp.spiffe_id, id);
    Identity::from_pem(resp.cert_chain_pem.concat(), key.serialize_pem())
}

pub async fn channel(op: &Operator, identity: Option<Identity>) -> Channel {
    install_ring();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(op.bundle_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Channel::from_shared(format!("https://localhost:{}", op.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connection to the operator")
}

pub fn workload(id: &str, app: &str) -> WorkloadRef {
    WorkloadRef {
        spiffe_id: id.to_owned(),
        namespace: "shop".into(),
        service_account: id.rsplit('/').next().unwrap().to_owned(),
        pod_name: "orders-7d9f-abcde".into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ports: vec![8080],
        agent_instance_id: "instance-1".into(),
        endpoints: vec![],
    }
}

/// An open Watch stream: requests go in through `tx`.
pub struct Watch {
    tx: mpsc::Sender<WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
}

impl Watch {
    pub async fn open(channel: Channel, subscribe: WorkloadRef) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(WatchRequest {
            kind: Some(Kind::Subscribe(subscribe)),
        })
        .await
        .unwrap();
        let responses = DiscoveryClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, responses })
    }

    pub async fn next(&mut self) -> WorkloadPolicy {
        self.next_response()
            .await
            .policy
            .expect("response without a policy")
    }

    pub async fn next_response(&mut self) -> WatchResponse {
        tokio::time::timeout(STEP, self.responses.message())
            .await
            .expect("nothing pushed in time")
            .expect("stream error")
            .expect("stream ended")
    }

    /// The next response, which must carry destinations and no policy.
    pub async fn next_destinations(&mut self) -> MeshDestinations {
        let r = self.next_response().await;
        assert!(
            r.policy.is_none(),
            "a table change resent the policy: {r:?}"
        );
        r.destinations.expect("response without destinations")
    }

    /// ACKs policy `version`.
    pub async fn ack(&self, version: &str) {
        self.send(Kind::Ack(Ack {
            version: version.to_owned(),
        }))
        .await;
    }

    pub async fn send(&self, kind: Kind) {
        self.tx
            .send(WatchRequest { kind: Some(kind) })
            .await
            .unwrap();
    }
}

/// A subscription of `id` (instance `instance`) advertising `endpoints`.
pub fn advertising(id: &str, instance: &str, endpoints: &[(&str, u32)]) -> WorkloadRef {
    let app = id.rsplit('/').next().unwrap();
    WorkloadRef {
        agent_instance_id: instance.into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, port)| MeshEndpoint {
                ip: (*ip).into(),
                port: *port,
            })
            .collect(),
        ..workload(id, app)
    }
}
