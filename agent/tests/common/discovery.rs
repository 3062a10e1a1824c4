//! A test double of the operator's `Discovery.Watch`: a tonic service that
//! pushes the current policy and mesh destination table to every stream
//! (together on subscribe, then each again on its own change), reports what
//! agents send back, and ends every stream on demand.

use std::sync::Arc;

use palisade_policy::spiffe_cert::spiffe_id_of_certificate;
use palisade_policy::wire as pb;
use palisade_proto::discovery::v1::discovery_server::Discovery;
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{
    MeshDestination, MeshDestinations, WatchRequest, WatchResponse, WorkloadRef,
};
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::TD;

/// `MeshDestinations` `version` with `(network, port, spiffe_id)` entries.
pub fn mesh_destinations(version: &str, entries: &[(&str, u32, &str)]) -> MeshDestinations {
    MeshDestinations {
        version: version.into(),
        destinations: entries
            .iter()
            .map(|(network, port, id)| MeshDestination {
                network: (*network).into(),
                port: *port,
                spiffe_id: (*id).into(),
            })
            .collect(),
    }
}

/// What the fake operator saw.
#[derive(Debug)]
pub enum Seen {
    Subscribe {
        workload: WorkloadRef,
        /// SPIFFE ID of the client certificate.
        peer: Option<String>,
    },
    Ack(String),
    Nack(String, String),
}

/// The operator double: pushes the current `policy` and `destinations` to
/// every stream (together on subscribe, then each again on its own change),
/// ends every stream when `kill` changes.
pub struct FakeDiscovery {
    policy: watch::Sender<Option<pb::WorkloadPolicy>>,
    destinations: watch::Sender<Option<MeshDestinations>>,
    /// Changing it ends every open stream with UNAVAILABLE.
    pub kill: watch::Sender<u64>,
    seen: mpsc::UnboundedSender<Seen>,
}

impl FakeDiscovery {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Seen>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let fake = Arc::new(Self {
            policy: watch::channel(None).0,
            destinations: watch::channel(None).0,
            kill: watch::channel(0).0,
            seen,
        });
        (fake, rx)
    }

    pub fn push(&self, policy: pb::WorkloadPolicy) {
        self.policy.send_replace(Some(policy));
    }

    pub fn push_destinations(&self, destinations: MeshDestinations) {
        self.destinations.send_replace(Some(destinations));
    }
}

/// `FakeDiscovery` as a tonic service.
pub struct DiscoverySvc(pub Arc<FakeDiscovery>);

#[tonic::async_trait]
impl Discovery for DiscoverySvc {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .and_then(|leaf| spiffe_id_of_certificate(leaf.as_ref(), TD).ok())
            .map(|id| id.to_string());
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no subscribe"))?;
        let Some(Kind::Subscribe(workload)) = first.kind else {
            return Err(Status::invalid_argument("subscribe first"));
        };
        let fake = self.0.clone();
        let _ = fake.seen.send(Seen::Subscribe { workload, peer });
        let (tx, rx) = mpsc::channel(4);
        let mut policy = fake.policy.subscribe();
        let mut destinations = fake.destinations.subscribe();
        let mut kill = fake.kill.subscribe();
        tokio::spawn(async move {
            // On subscribe: whatever is current, in one response.
            let mut next = WatchResponse {
                policy: policy.borrow_and_update().clone(),
                destinations: destinations.borrow_and_update().clone(),
            };
            loop {
                if (next.policy.is_some() || next.destinations.is_some())
                    && tx.send(Ok(next)).await.is_err()
                {
                    return;
                }
                loop {
                    tokio::select! {
                        changed = policy.changed() => {
                            if changed.is_err() { return; }
                            next = WatchResponse {
                                policy: policy.borrow_and_update().clone(),
                                destinations: None,
                            };
                            break;
                        }
                        changed = destinations.changed() => {
                            if changed.is_err() { return; }
                            next = WatchResponse {
                                policy: None,
                                destinations: destinations.borrow_and_update().clone(),
                            };
                            break;
                        }
                        _ = kill.changed() => {
                            let _ = tx.send(Err(Status::unavailable("operator restarting"))).await;
                            return;
                        }
                        msg = inbound.message() => match msg {
                            Ok(Some(WatchRequest { kind: Some(Kind::Ack(a)) })) => {
                                let _ = fake.seen.send(Seen::Ack(a.version));
                            }
                            Ok(Some(WatchRequest { kind: Some(Kind::Nack(n)) })) => {
                                let _ = fake.seen.send(Seen::Nack(n.version, n.reason));
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return,
                        },
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
