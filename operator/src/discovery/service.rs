//! `palisade.discovery.v1.Discovery/Watch` (DESIGN §5).
//!
//! Order of checks: the client certificate first (a caller without a mesh
//! identity learns nothing), then the `subscribe` message and whether it
//! names exactly that identity, then whether there is a policy source.
//! After that the stream carries one compiled `WorkloadPolicy` per content
//! version, pushed only when the version for this subscriber changes, and
//! ACK/NACKs the other way. The mesh destination table ([`super::endpoints`])
//! rides on the same stream, also pushed only when its version changes, and
//! is not ACKed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::compile::{MeshConfig, NoSecrets, SecretSource, Workload, compile_workload};
use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::spiffe_id_of_certificate;
use palisade_proto::discovery::v1::discovery_server::Discovery;
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{WatchRequest, WatchResponse, WorkloadRef};
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::endpoints::{Endpoint, MeshRegistry, parse_endpoints};
use super::source::PolicySet;
use super::status::DiscoveryStatus;
use palisade_proto::discovery::limits::truncate_reason;

/// How long a caller may take to send `subscribe` after opening the stream.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

pub const MSG_NO_CERT: &str = "a client certificate issued by the mesh CA is required";
pub const MSG_NOT_YOU: &str = "the workload named does not match the client certificate";
pub const MSG_NO_SOURCE: &str =
    "no policy source is configured on this operator (start it with --source dir:<path>)";

pub struct DiscoveryService {
    trust_domain: String,
    mesh: MeshConfig,
    /// `None`: the operator runs without a policy source.
    policies: Option<watch::Receiver<Arc<PolicySet>>>,
    secrets: Arc<dyn SecretSource + Send + Sync>,
    status: Arc<DiscoveryStatus>,
    registry: Arc<MeshRegistry>,
}

/// The subscriber, checked against its certificate.
#[derive(Clone, Debug)]
struct Subscriber {
    spiffe_id: SpiffeId,
    instance: String,
    pod_name: String,
    peer: String,
    workload: Workload,
    /// Where it terminates mTLS, as advertised (validated, not verified).
    endpoints: Vec<Endpoint>,
}

impl DiscoveryService {
    /// `policies: None` keeps the service mounted but answers every Watch
    /// with FAILED_PRECONDITION, so agents get a clear reason (and retry).
    pub fn new(
        mesh: MeshConfig,
        policies: Option<watch::Receiver<Arc<PolicySet>>>,
        status: Arc<DiscoveryStatus>,
    ) -> Self {
        Self {
            trust_domain: mesh.trust_domain.clone(),
            mesh,
            policies,
            // Local mode has no Secrets; a policy with `secretRef` fails
            // to compile for its workloads, and that is logged.
            secrets: Arc::new(NoSecrets),
            status,
            registry: Arc::new(MeshRegistry::new()),
        }
    }

    /// Shares a registry (e.g. one the admin port renders metrics from)
    /// instead of the one `new` created.
    pub fn with_registry(mut self, registry: Arc<MeshRegistry>) -> Self {
        self.registry = registry;
        self
    }

    /// The agents' advertised endpoints and the destination table.
    pub fn registry(&self) -> &Arc<MeshRegistry> {
        &self.registry
    }

    pub fn with_secrets(mut self, secrets: Arc<dyn SecretSource + Send + Sync>) -> Self {
        self.secrets = secrets;
        self
    }

    pub fn status(&self) -> &Arc<DiscoveryStatus> {
        &self.status
    }

    /// The SPIFFE ID of the verified client certificate. rustls has already
    /// checked the chain against the CA's bundle; this reads the identity.
    fn peer_identity<T>(&self, request: &Request<T>, peer: &str) -> Result<SpiffeId, Status> {
        let certs = request.peer_certs().unwrap_or_default();
        let Some(leaf) = certs.first() else {
            tracing::warn!(%peer, "watch refused: no client certificate");
            return Err(Status::unauthenticated(MSG_NO_CERT));
        };
        spiffe_id_of_certificate(leaf.as_ref(), &self.trust_domain).map_err(|e| {
            tracing::warn!(%peer, error = %e, "watch refused: client certificate has no workload identity");
            Status::unauthenticated(MSG_NO_CERT)
        })
    }

    fn authorize(
        &self,
        cert_id: &SpiffeId,
        subscribe: WorkloadRef,
        peer: &str,
    ) -> Result<Subscriber, Status> {
        let refuse = |why: &str| {
            tracing::warn!(%peer, certificate = %cert_id, claimed = %subscribe.spiffe_id,
                namespace = %subscribe.namespace, service_account = %subscribe.service_account,
                reason = why, "watch refused");
            Status::permission_denied(MSG_NOT_YOU)
        };
        if subscribe.spiffe_id != cert_id.as_str() {
            return Err(refuse("spiffe_id differs from the certificate"));
        }
        // Empty means "whatever the identity says"; anything else must agree
        // with it, or a workload could be compiled for another namespace.
        if !subscribe.namespace.is_empty() && subscribe.namespace != cert_id.namespace() {
            return Err(refuse("namespace differs from the SPIFFE ID"));
        }
        if !subscribe.service_account.is_empty()
            && subscribe.service_account != cert_id.service_account()
        {
            return Err(refuse("service account differs from the SPIFFE ID"));
        }
        let ports = subscribe
            .ports
            .iter()
            .map(|&p| u16::try_from(p).ok().filter(|p| *p != 0))
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| Status::invalid_argument("ports must be 1-65535"))?;
        let endpoints = parse_endpoints(&subscribe.endpoints).map_err(|e| {
            tracing::warn!(%peer, spiffe_id = %cert_id, error = %e, "watch refused: bad endpoints");
            Status::invalid_argument(e.to_string())
        })?;
        let instance = if subscribe.agent_instance_id.is_empty() {
            format!("{cert_id}@{peer}")
        } else {
            subscribe.agent_instance_id.clone()
        };
        Ok(Subscriber {
            spiffe_id: cert_id.clone(),
            instance,
            pod_name: subscribe.pod_name,
            peer: peer.to_owned(),
            workload: Workload {
                namespace: cert_id.namespace().to_owned(),
                service_account: cert_id.service_account().to_owned(),
                labels: subscribe.labels.into_iter().collect(),
                ports,
            },
            endpoints,
        })
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a: SocketAddr| a.to_string())
            .unwrap_or_default();
        let cert_id = self.peer_identity(&request, &peer)?;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no subscribe message")),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream ended before subscribe")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(Kind::Subscribe(subscribe)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be subscribe",
            ));
        };
        let subscriber = self.authorize(&cert_id, subscribe, &peer)?;
        let Some(policies) = self.policies.clone() else {
            tracing::info!(%peer, spiffe_id = %cert_id, "watch refused: no policy source configured");
            return Err(Status::failed_precondition(MSG_NO_SOURCE));
        };
        tracing::info!(
            %peer,
            spiffe_id = %subscriber.spiffe_id,
            instance = %subscriber.instance,
            pod = %subscriber.pod_name,
            labels = ?subscriber.workload.labels,
            ports = ?subscriber.workload.ports,
            endpoints = ?subscriber.endpoints,
            "agent subscribed"
        );
        // Small: a slow agent should see the newest version, not a backlog.
        let (tx, rx) = mpsc::channel(2);
        let session = Session {
            mesh: self.mesh.clone(),
            secrets: self.secrets.clone(),
            status: self.status.clone(),
            registry: self.registry.clone(),
            subscriber,
        };
        tokio::spawn(session.run(inbound, tx, policies));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    mesh: MeshConfig,
    secrets: Arc<dyn SecretSource + Send + Sync>,
    status: Arc<DiscoveryStatus>,
    registry: Arc<MeshRegistry>,
    subscriber: Subscriber,
}

/// Marks the stream closed however the session task ends.
struct Subscription<'a> {
    status: &'a DiscoveryStatus,
    instance: &'a str,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.status.unsubscribed(self.instance);
    }
}

impl Session {
    async fn run(
        self,
        mut inbound: Streaming<WatchRequest>,
        tx: mpsc::Sender<Result<WatchResponse, Status>>,
        mut policies: watch::Receiver<Arc<PolicySet>>,
    ) {
        let sub = &self.subscriber;
        self.status
            .subscribed(&sub.instance, sub.spiffe_id.as_str(), &sub.pod_name);
        let _subscription = Subscription {
            status: &self.status,
            instance: &sub.instance,
        };
        // Registered after `subscribed`, withdrawn (guard dropped) before
        // the stream is marked closed. The receiver is taken after
        // registering, so the first table already contains this agent.
        let _registration =
            self.registry
                .register(sub.spiffe_id.as_str(), &sub.instance, sub.endpoints.clone());
        let mut tables = self.registry.subscribe();
        let mut sent: Option<String> = None;
        let mut sent_table: Option<String> = None;
        let mut recompile = true;
        let mut retable = true;
        loop {
            let policy = if std::mem::take(&mut recompile) {
                let set = policies.borrow_and_update().clone();
                self.compile(&set, sent.as_deref())
                    .map(|p| (p, set.revision))
            } else {
                None
            };
            let destinations = if std::mem::take(&mut retable) {
                let table = tables.borrow_and_update().clone();
                (sent_table.as_deref() != Some(table.version.as_str())).then_some(table)
            } else {
                None
            };
            // Both in one response when both changed: the agent applies the
            // destinations, then the policy. An absent field means unchanged.
            if policy.is_some() || destinations.is_some() {
                let pushed = policy.as_ref().map(|(p, rev)| (p.version.clone(), *rev));
                let response = WatchResponse {
                    policy: policy.map(|(p, _)| p),
                    destinations: destinations.as_deref().cloned(),
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                if let Some(table) = destinations {
                    tracing::debug!(instance = %sub.instance, version = %table.version,
                        destinations = table.destinations.len(), "mesh destinations pushed");
                    sent_table = Some(table.version.clone());
                }
                if let Some((version, revision)) = pushed {
                    tracing::info!(spiffe_id = %sub.spiffe_id, instance = %sub.instance,
                        %version, revision, "policy pushed");
                    self.status.sent(&sub.instance, &version);
                    sent = Some(version);
                }
            }
            tokio::select! {
                changed = policies.changed() => match changed {
                    Ok(()) => recompile = true,
                    // The source is gone (shutting down).
                    Err(_) => break,
                },
                changed = tables.changed() => match changed {
                    Ok(()) => retable = true,
                    // The registry is gone (shutting down).
                    Err(_) => break,
                },
                message = inbound.message() => match message {
                    Ok(Some(req)) => {
                        if let Err(status) = self.handle(req, sent.as_deref()) {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(instance = %sub.instance, %status, "watch stream error");
                        break;
                    }
                },
                () = tx.closed() => break,
            }
        }
        tracing::info!(spiffe_id = %sub.spiffe_id, instance = %sub.instance,
            peer = %sub.peer, "agent unsubscribed");
    }

    /// The policy to push, or `None` when this subscriber already has the
    /// same version or compilation failed (it keeps what it has).
    fn compile(
        &self,
        set: &PolicySet,
        sent: Option<&str>,
    ) -> Option<palisade_policy::wire::WorkloadPolicy> {
        let sub = &self.subscriber;
        match compile_workload(&set.policies, &sub.workload, &self.mesh, &*self.secrets) {
            Ok(policy) if sent == Some(policy.version.as_str()) => None,
            Ok(policy) => Some(policy),
            Err(e) => {
                tracing::error!(spiffe_id = %sub.spiffe_id, instance = %sub.instance,
                    error = %e, revision = set.revision,
                    "cannot compile policy for this workload; it keeps its current version");
                None
            }
        }
    }

    fn handle(&self, req: WatchRequest, sent: Option<&str>) -> Result<(), Status> {
        let sub = &self.subscriber;
        match req.kind {
            Some(Kind::Ack(ack)) => {
                if sent != Some(ack.version.as_str()) {
                    tracing::debug!(instance = %sub.instance, version = %ack.version,
                        "ACK for a version other than the last one sent");
                }
                tracing::info!(spiffe_id = %sub.spiffe_id, instance = %sub.instance,
                    version = %ack.version, "agent enforces policy version (ACK)");
                self.status.acked(&sub.instance, &ack.version);
                Ok(())
            }
            Some(Kind::Nack(nack)) => {
                let reason = truncate_reason(&nack.reason);
                tracing::warn!(spiffe_id = %sub.spiffe_id, instance = %sub.instance,
                    pod = %sub.pod_name, version = %nack.version, %reason,
                    "agent refused policy version (NACK); it keeps its previous version");
                self.status.nacked(&sub.instance, &nack.version, reason);
                Ok(())
            }
            Some(Kind::Subscribe(_)) => Err(Status::invalid_argument(
                "subscribe may only be sent once per stream",
            )),
            None => Err(Status::invalid_argument("empty WatchRequest")),
        }
    }
}
