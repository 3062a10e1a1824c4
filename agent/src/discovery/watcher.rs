//! The agent's half of `Discovery.Watch` (DESIGN §5).
//!
//! One stream at a time: connect over mutual TLS (our certificate from the
//! [`CertStore`], the operator's checked by the SPIFFE verifier), name
//! ourselves (with the endpoints where we terminate mTLS), then for every
//! response: its `MeshDestinations`, if any, become the outbound proxy's
//! discovered table (not ACKed: bad entries are skipped, the rest applies);
//! its `WorkloadPolicy`, if any, is loaded completely, swapped in as a whole
//! and ACKed, or refused with a NACK and the previous one kept. A response
//! with neither is NACKed. When the stream fails the policy and the table in
//! force stay in force (DESIGN §1) and the watcher reconnects with jittered
//! exponential backoff.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_policy::identity::SpiffeId;
use palisade_policy::wire::WorkloadPolicy;
use palisade_proto::discovery::limits::truncate_reason;
use palisade_proto::discovery::v1::discovery_client::DiscoveryClient;
use palisade_proto::discovery::v1::watch_request::Kind;
use palisade_proto::discovery::v1::{
    Ack, MeshDestinations, MeshEndpoint, Nack, WatchRequest, WatchResponse, WorkloadRef,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::connect::Connector;
use super::destinations::table_from_wire;
use super::status::PolicyStatus;
use crate::authn::JwtOptions;
use crate::identity::{Backoff, CertStore};
use crate::inbound::{LoadedPolicy, SharedPolicy};
use crate::outbound::DiscoveredDestinations;
use crate::tls::{MeshTrust, TlsConfigError};

/// Compiled policies with large JSON Schemas can exceed tonic's 4 MiB default.
const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// How often to look for the first certificate before subscribing.
const CERT_POLL: Duration = Duration::from_millis(100);

/// Where this agent terminates mTLS for its workload, as advertised to the
/// operator (which builds every agent's outbound table from them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdvertisedEndpoint {
    pub ip: IpAddr,
    /// `None`: every port of `ip` (transparent capture).
    pub port: Option<u16>,
}

impl fmt::Display for AdvertisedEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ip, self.port) {
            (IpAddr::V6(ip), Some(port)) => write!(f, "[{ip}]:{port}"),
            (ip, Some(port)) => write!(f, "{ip}:{port}"),
            (ip, None) => write!(f, "{ip}:*"),
        }
    }
}

/// Who this agent is, beyond its certificate.
#[derive(Clone, Debug, Default)]
pub struct WorkloadInfo {
    /// Default: the namespace of the certificate's SPIFFE ID.
    pub namespace: Option<String>,
    /// Default: the service account of the certificate's SPIFFE ID.
    pub service_account: Option<String>,
    pub pod_name: String,
    pub labels: BTreeMap<String, String>,
    /// The application ports this agent fronts.
    pub ports: Vec<u16>,
    /// Stable id of this agent instance (pod UID or random).
    pub agent_instance_id: String,
    /// Where this agent accepts mTLS for the workload; empty: nothing to
    /// advertise (other agents then learn no destination for us).
    pub endpoints: Vec<AdvertisedEndpoint>,
}

#[derive(Clone, Debug)]
pub struct PolicyWatcherConfig {
    /// `HOST:PORT` of the operator (the same endpoint as identity).
    pub operator_address: String,
    /// When set, the operator's certificate must carry exactly this ID.
    pub operator_id: Option<SpiffeId>,
    pub workload: WorkloadInfo,
    /// For the JWT verifiers of each loaded version.
    pub jwt_options: JwtOptions,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Bound on connecting, the TLS handshake and the operator's first answer.
    pub connect_timeout: Duration,
}

impl PolicyWatcherConfig {
    pub fn new(operator_address: impl Into<String>, workload: WorkloadInfo) -> Self {
        Self {
            operator_address: operator_address.into(),
            operator_id: None,
            workload,
            jwt_options: JwtOptions::default(),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("operator address {0:?} is not HOST:PORT")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("cannot reach the operator: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the operator did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the operator refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("no workload certificate yet")]
    NoCertificate,
}

/// Keeps the agent's policy in step with the operator. Build with
/// [`PolicyWatcher::new`], read [`PolicyWatcher::status`], then
/// [`run`](PolicyWatcher::run) it forever.
pub struct PolicyWatcher {
    config: PolicyWatcherConfig,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    store: Arc<CertStore>,
    policy: SharedPolicy,
    status: Arc<PolicyStatus>,
    /// Where pushed `MeshDestinations` go.
    destinations: DiscoveredDestinations,
    /// Entries naming another trust domain are skipped.
    trust_domain: String,
}

impl fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PolicyWatcher {
    pub fn new(
        config: PolicyWatcherConfig,
        trust: &MeshTrust,
        store: Arc<CertStore>,
        policy: SharedPolicy,
    ) -> Result<Self, DiscoveryError> {
        let address = &config.operator_address;
        let host = address
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| DiscoveryError::Address(address.clone()))?;
        // Only SNI; the verifier checks the SPIFFE ID, not this name.
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| DiscoveryError::Address(address.clone()))?;
        // The store resolves to whatever certificate is current at each
        // handshake, so a reconnect after renewal presents the new one.
        let mut tls = trust.client_config(Some(store.clone()), config.operator_id.clone())?;
        tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        Ok(Self {
            config,
            server_name,
            tls: Arc::new(tls),
            store,
            policy,
            status: Arc::new(PolicyStatus::new()),
            destinations: DiscoveredDestinations::new(),
            trust_domain: trust.trust_domain().to_owned(),
        })
    }

    /// Shares the discovered destination table with the outbound proxy.
    pub fn with_destinations(mut self, destinations: DiscoveredDestinations) -> Self {
        self.destinations = destinations;
        self
    }

    pub fn destinations(&self) -> &DiscoveredDestinations {
        &self.destinations
    }

    /// Shares the status with `/config_dump` and `/metrics`.
    pub fn with_status(mut self, status: Arc<PolicyStatus>) -> Self {
        self.status = status;
        self
    }

    pub fn status(&self) -> &Arc<PolicyStatus> {
        &self.status
    }

    /// Watches forever: waits for the first certificate, then keeps one
    /// stream open, reconnecting with backoff.
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            self.wait_for_certificate().await;
            let result = self.session(&mut backoff).await;
            self.status.set_connected(false);
            self.status.stream_failed();
            let delay = backoff.next_delay();
            let version = self.status.discovery_version();
            match result {
                Ok(()) => tracing::warn!(
                    retry_in = ?delay, in_force = ?version,
                    "policy stream closed by the operator; reconnecting, the current policy stays in force"
                ),
                Err(e) => tracing::warn!(
                    error = %e, retry_in = ?delay, in_force = ?version,
                    "policy stream failed; reconnecting, the current policy stays in force"
                ),
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn wait_for_certificate(&self) {
        let mut logged = false;
        while self.store.current().is_none() {
            if !logged {
                tracing::info!("waiting for the workload certificate before subscribing to policy");
                logged = true;
            }
            tokio::time::sleep(CERT_POLL).await;
        }
    }

    /// What we tell the operator about ourselves; identity from the
    /// certificate we are about to present.
    fn workload_ref(&self, id: &SpiffeId) -> WorkloadRef {
        let w = &self.config.workload;
        WorkloadRef {
            spiffe_id: id.to_string(),
            namespace: w
                .namespace
                .clone()
                .unwrap_or_else(|| id.namespace().to_owned()),
            service_account: w
                .service_account
                .clone()
                .unwrap_or_else(|| id.service_account().to_owned()),
            pod_name: w.pod_name.clone(),
            labels: w.labels.clone().into_iter().collect(),
            ports: w.ports.iter().map(|&p| u32::from(p)).collect(),
            agent_instance_id: w.agent_instance_id.clone(),
            endpoints: w
                .endpoints
                .iter()
                .map(|e| MeshEndpoint {
                    ip: e.ip.to_string(),
                    port: e.port.map_or(0, u32::from),
                })
                .collect(),
        }
    }

    /// One stream, until it ends. Resets `backoff` once a policy arrives
    /// (an operator that accepts and then fails at once is still backed off).
    async fn session(&self, backoff: &mut Backoff) -> Result<(), DiscoveryError> {
        let cert = self.store.current().ok_or(DiscoveryError::NoCertificate)?;
        let subscribe = self.workload_ref(cert.spiffe_id());
        let (tx, rx) = mpsc::channel(4);
        // Cannot fail: the receiver is right here.
        let _ = tx
            .send(WatchRequest {
                kind: Some(Kind::Subscribe(subscribe)),
            })
            .await;
        let timeout = self.config.connect_timeout;
        let mut responses = tokio::time::timeout(timeout, async {
            let address = &self.config.operator_address;
            let endpoint = Endpoint::from_shared(format!("http://{address}"))
                .map_err(|_| DiscoveryError::Address(address.clone()))?
                .connect_timeout(timeout)
                // A stream lives for hours; notice a dead operator (or path)
                // within a minute instead of waiting for TCP.
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            let connector = Connector::new(
                address.as_str().into(),
                self.server_name.clone(),
                self.tls.clone(),
            );
            let channel = endpoint
                .connect_with_connector(connector)
                .await
                .map_err(DiscoveryError::Connect)?;
            let stream = DiscoveryClient::new(channel)
                .max_decoding_message_size(MAX_POLICY_BYTES)
                .watch(ReceiverStream::new(rx))
                .await?
                .into_inner();
            Ok::<_, DiscoveryError>(stream)
        })
        .await
        .map_err(|_| DiscoveryError::Timeout(timeout))??;
        self.status.set_connected(true);
        tracing::info!(
            operator = %self.config.operator_address,
            spiffe_id = %cert.spiffe_id(),
            "subscribed to policy updates"
        );
        while let Some(response) = responses.message().await? {
            backoff.reset();
            let Some(reply) = self.apply(response) else {
                continue;
            };
            if tx.send(reply).await.is_err() {
                // The request stream is gone: so is the call.
                break;
            }
        }
        Ok(())
    }

    /// Applies one response: destinations first (never answered), then the
    /// policy (ACK or NACK). `None`: nothing to send back.
    fn apply(&self, response: WatchResponse) -> Option<WatchRequest> {
        let had_destinations = response.destinations.is_some();
        if let Some(destinations) = response.destinations {
            self.apply_destinations(&destinations);
        }
        match response.policy {
            Some(policy) => Some(self.apply_policy(policy)),
            None if had_destinations => None,
            None => Some(self.nack(
                String::new(),
                "response carries no policy and no destinations".into(),
            )),
        }
    }

    /// Swaps in the pushed destination table, unless that version is
    /// already in force (typically after a reconnect).
    fn apply_destinations(&self, wire: &MeshDestinations) {
        if !wire.version.is_empty()
            && self.destinations.version().as_deref() == Some(wire.version.as_str())
        {
            tracing::debug!(version = %wire.version, "mesh destinations already in force");
            return;
        }
        let table = table_from_wire(wire, &self.trust_domain);
        let (entries, skipped) = (table.table.len(), table.skipped);
        self.destinations.replace(table);
        tracing::info!(version = %wire.version, entries, skipped, "mesh destinations applied");
    }

    /// Loads one pushed policy version; the answer to send back.
    fn apply_policy(&self, policy: WorkloadPolicy) -> WatchRequest {
        let version = policy.version.clone();
        if version.is_empty() {
            return self.nack(version, "policy has no version".into());
        }
        if self.status.discovery_version().as_deref() == Some(version.as_str()) {
            // Same content as in force (typically after a reconnect):
            // rebuilding would only refetch JWKS.
            self.status.reacked();
            tracing::debug!(%version, "policy version already in force");
            return ack(version);
        }
        match self.load(policy) {
            Ok(loaded) => {
                let routes = loaded.engine.policy().routes.len();
                self.policy.replace(loaded);
                self.status.applied(&version);
                tracing::info!(%version, routes, "policy applied");
                ack(version)
            }
            Err(e) => self.nack(version, format!("{e:#}")),
        }
    }

    fn load(&self, policy: WorkloadPolicy) -> anyhow::Result<LoadedPolicy> {
        LoadedPolicy::load(
            policy,
            self.config.jwt_options.clone(),
            self.policy.current().as_deref(),
        )
    }

    fn nack(&self, version: String, reason: String) -> WatchRequest {
        let reason = truncate_reason(&reason).to_owned();
        let in_force = self.status.snapshot().version;
        tracing::warn!(%version, %reason, ?in_force,
            "policy version refused (NACK); the previous policy stays in force");
        self.status.refused(&version, &reason);
        WatchRequest {
            kind: Some(Kind::Nack(Nack { version, reason })),
        }
    }
}

fn ack(version: String) -> WatchRequest {
    WatchRequest {
        kind: Some(Kind::Ack(Ack { version })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{SharedTrustBundle, TrustBundle};

    fn trust() -> MeshTrust {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let bundle = TrustBundle::from_der(vec![root.der().clone()]).unwrap();
        MeshTrust::new(SharedTrustBundle::new(bundle), "cluster.local").unwrap()
    }

    fn watcher(address: &str, info: WorkloadInfo) -> Result<PolicyWatcher, DiscoveryError> {
        PolicyWatcher::new(
            PolicyWatcherConfig::new(address, info),
            &trust(),
            Arc::new(CertStore::new()),
            SharedPolicy::default(),
        )
    }

    #[test]
    fn workload_ref_defaults_from_the_spiffe_id() {
        let mut info = WorkloadInfo {
            pod_name: "orders-1".into(),
            ports: vec![8080],
            agent_instance_id: "i-1".into(),
            ..Default::default()
        };
        info.labels.insert("app".into(), "orders".into());
        let w = watcher("127.0.0.1:15012", info).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let r = w.workload_ref(&id);
        assert_eq!(r.spiffe_id, id.as_str());
        assert_eq!(r.namespace, "shop");
        assert_eq!(r.service_account, "orders");
        assert_eq!(r.pod_name, "orders-1");
        assert_eq!(r.ports, vec![8080]);
        assert_eq!(r.labels.get("app").map(String::as_str), Some("orders"));
        assert_eq!(r.agent_instance_id, "i-1");
        assert!(r.endpoints.is_empty());
    }

    #[test]
    fn workload_ref_carries_the_endpoints() {
        let info = WorkloadInfo {
            endpoints: vec![
                AdvertisedEndpoint {
                    ip: "10.0.0.5".parse().unwrap(),
                    port: Some(8443),
                },
                AdvertisedEndpoint {
                    ip: "fd00::5".parse().unwrap(),
                    port: None,
                },
            ],
            ..Default::default()
        };
        let w = watcher("127.0.0.1:15012", info).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let r = w.workload_ref(&id);
        let got: Vec<_> = r
            .endpoints
            .iter()
            .map(|e| (e.ip.as_str(), e.port))
            .collect();
        assert_eq!(got, vec![("10.0.0.5", 8443), ("fd00::5", 0)]);
    }

    fn destinations(version: &str, entries: &[(&str, u32, &str)]) -> MeshDestinations {
        MeshDestinations {
            version: version.into(),
            destinations: entries
                .iter()
                .map(|(n, p, i)| palisade_proto::discovery::v1::MeshDestination {
                    network: (*n).into(),
                    port: *p,
                    spiffe_id: (*i).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn destinations_only_are_applied_without_an_answer() {
        let w = watcher("127.0.0.1:15012", WorkloadInfo::default()).unwrap();
        const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
        let reply = w.apply(WatchResponse {
            policy: None,
            destinations: Some(destinations(
                "d1",
                &[
                    ("10.0.0.5/32", 8443, ORDERS),
                    ("10.0.0.6/32", 0, "spiffe://other.example/ns/a/sa/b"),
                ],
            )),
        });
        assert!(reply.is_none(), "destinations are never ACKed: {reply:?}");
        let current = w.destinations().current();
        assert_eq!(current.version.as_deref(), Some("d1"));
        assert_eq!((current.table.len(), current.skipped), (1, 1));
        assert_eq!(w.status.snapshot().nacks, 0);

        // Same version again: the table in force is kept as is.
        let before = w.destinations().current();
        assert!(
            w.apply(WatchResponse {
                policy: None,
                destinations: Some(destinations("d1", &[])),
            })
            .is_none()
        );
        assert!(Arc::ptr_eq(&before, &w.destinations().current()));

        // A new version replaces the whole table, even with an empty one.
        w.apply(WatchResponse {
            policy: None,
            destinations: Some(destinations("d2", &[])),
        });
        assert!(w.destinations().current().table.is_empty());
    }

    #[test]
    fn a_response_with_neither_is_nacked() {
        let w = watcher("127.0.0.1:15012", WorkloadInfo::default()).unwrap();
        let reply = w.apply(WatchResponse::default());
        assert!(
            matches!(
                reply,
                Some(WatchRequest {
                    kind: Some(Kind::Nack(_))
                })
            ),
            "{reply:?}"
        );
        assert_eq!(w.status.snapshot().nacks, 1);
    }

    #[test]
    fn bad_addresses_are_refused() {
        for a in ["nope", ":15012", "host:port", "host:99999"] {
            assert!(
                matches!(
                    watcher(a, WorkloadInfo::default()),
                    Err(DiscoveryError::Address(_))
                ),
                "{a}"
            );
        }
        assert!(watcher("[::1]:15012", WorkloadInfo::default()).is_ok());
    }
}
