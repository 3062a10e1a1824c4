//! One mesh CA and the SPIFFE leaves the benchmark needs, as the operator
//! would issue them (ECDSA P-256, URI SAN only), written as PEM files for the
//! agents and Envoy, plus the load generator's rustls client configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use palisade_agent::identity::{CertStore, IssuedCert};
use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The backend workload: the inbound agent and Envoy present this identity.
pub const BACKEND_ID: &str = "spiffe://cluster.local/ns/bench/sa/backend";
/// The load generator: the only principal the policy allows (policy.yaml).
pub const LOADGEN_ID: &str = "spiffe://cluster.local/ns/bench/sa/loadgen";
/// Same CA, not allowed: proves both proxies enforce authorization.
pub const INTRUDER_ID: &str = "spiffe://cluster.local/ns/bench/sa/intruder";

/// PEM files of one leaf.
pub struct LeafFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    pub bundle: PathBuf,
    pub backend: LeafFiles,
    pub loadgen: LeafFiles,
    trust: MeshTrust,
    loadgen_store: Arc<CertStore>,
    intruder_store: Arc<CertStore>,
}

impl Pki {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "palisade-bench mesh root");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, ca_cert.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let write = |name: &str, id: &str| -> anyhow::Result<(LeafFiles, Arc<CertStore>)> {
            let (cert, key) = leaf(&issuer, id)?;
            let files = LeafFiles {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            };
            std::fs::write(&files.cert, cert.pem())?;
            std::fs::write(&files.key, key.serialize_pem())?;
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let signing = rustls::crypto::ring::default_provider()
                .key_provider
                .load_private_key(der)?;
            let store = CertStore::new();
            store.install(IssuedCert::new(
                vec![cert.der().clone()],
                signing,
                TRUST_DOMAIN,
            )?);
            Ok((files, Arc::new(store)))
        };
        let (backend, _) = write("backend", BACKEND_ID)?;
        let (loadgen, loadgen_store) = write("loadgen", LOADGEN_ID)?;
        let (_, intruder_store) = write("intruder", INTRUDER_ID)?;

        let roots: Vec<CertificateDer<'static>> = vec![ca_cert.der().clone()];
        let trust = MeshTrust::new(
            SharedTrustBundle::new(TrustBundle::from_der(roots)?),
            TRUST_DOMAIN,
        )?;
        Ok(Self {
            bundle,
            backend,
            loadgen,
            trust,
            loadgen_store,
            intruder_store,
        })
    }

    /// The load generator's mTLS config: its certificate, the server must be
    /// the backend workload, HTTP/1.1 only (keep-alive HTTP/1.1 load).
    pub fn loadgen_client(&self) -> anyhow::Result<Arc<ClientConfig>> {
        self.client(self.loadgen_store.clone())
    }

    pub fn intruder_client(&self) -> anyhow::Result<Arc<ClientConfig>> {
        self.client(self.intruder_store.clone())
    }

    fn client(&self, store: Arc<CertStore>) -> anyhow::Result<Arc<ClientConfig>> {
        let server =
            palisade_policy::identity::SpiffeId::parse(BACKEND_ID).context("backend SPIFFE ID")?;
        let mut config = self.trust.client_config(Some(store), Some(server))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn leaf(issuer: &Issuer<'_, KeyPair>, id: &str) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .subject_alt_names
        .push(SanType::URI(id.try_into().context("URI SAN")?));
    let now = SystemTime::now();
    // Long enough for any run; the agent's certificate is never renewed here.
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + Duration::from_secs(24 * 3600)).into();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert, key))
}
