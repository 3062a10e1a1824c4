//! Where the sidecar's policy comes from: a compiled file loaded once, or
//! the operator's discovery stream (DESIGN §5), or nowhere (deny all).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use palisade_policy::wire::WorkloadPolicy;
use prost::Message;

use super::OperatorEndpoint;
use crate::discovery::{
    AdvertisedEndpoint, DiscoveryError, PolicySource, PolicyWatcher, PolicyWatcherConfig,
    WorkloadInfo,
};
use crate::identity::CertStore;
use crate::inbound::{LoadedPolicy, SharedPolicy};
use crate::tls::MeshTrust;

/// Where the policy comes from. Until one is in force every request is
/// denied.
#[derive(Clone, Debug)]
pub enum PolicyOrigin {
    /// A binary `WorkloadPolicy` (from `palisadectl policy compile`), loaded
    /// at start; the sidecar does not start if it cannot be enforced.
    File(PathBuf),
    /// The operator's discovery stream: the policy (enforced when there is
    /// an inbound proxy) and the outbound proxy's discovered destinations.
    Discovery(DiscoveryOptions),
    /// No policy: every inbound request is denied.
    None,
}

impl PolicyOrigin {
    /// The name `/config_dump` reports.
    pub fn kind(&self) -> PolicySource {
        match self {
            Self::File(_) => PolicySource::File,
            Self::Discovery(_) => PolicySource::Discovery,
            Self::None => PolicySource::None,
        }
    }
}

/// Who this workload is, beyond its certificate, as the discovery stream
/// tells the operator.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    pub operator: OperatorEndpoint,
    /// `None`: the certificate's; must agree with it.
    pub namespace: Option<String>,
    /// `None`: the certificate's.
    pub service_account: Option<String>,
    /// This pod's name, for the operator's status.
    pub pod_name: String,
    /// The labels policies select on.
    pub labels: BTreeMap<String, String>,
    /// Stable id of this agent instance (the pod UID); `None`: random per
    /// start, so the operator tells restarts apart.
    pub agent_instance_id: Option<String>,
}

impl DiscoveryOptions {
    /// The discovery client keeping `policy` in step with the operator;
    /// `ports` are the application ports this agent fronts (empty: all),
    /// `endpoints` where it terminates mTLS for them.
    pub(super) fn watcher(
        &self,
        ports: Vec<u16>,
        endpoints: Vec<AdvertisedEndpoint>,
        trust: &MeshTrust,
        store: &Arc<CertStore>,
        policy: &SharedPolicy,
    ) -> Result<PolicyWatcher, DiscoveryError> {
        let agent_instance_id = self.agent_instance_id.clone().unwrap_or_else(|| {
            let bytes: [u8; 8] = rand::random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        });
        let workload = WorkloadInfo {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            pod_name: self.pod_name.clone(),
            labels: self.labels.clone(),
            ports,
            agent_instance_id,
            endpoints,
        };
        let mut config = PolicyWatcherConfig::new(self.operator.address.clone(), workload);
        config.operator_id = self.operator.id.clone();
        PolicyWatcher::new(config, trust, store.clone(), policy.clone())
    }
}

/// Why a policy file cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a WorkloadPolicy")]
    Decode(#[source] prost::DecodeError),
    #[error("policy cannot be enforced")]
    Load(#[source] anyhow::Error),
}

/// Reads, decodes and loads a compiled policy file.
pub(super) fn load_policy_file(path: &Path) -> Result<LoadedPolicy, PolicyFileError> {
    let bytes = std::fs::read(path).map_err(|source| PolicyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let wire = WorkloadPolicy::decode(bytes.as_slice()).map_err(PolicyFileError::Decode)?;
    LoadedPolicy::load(wire, Default::default(), None).map_err(PolicyFileError::Load)
}
