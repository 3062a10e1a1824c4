//! A client of the collector's query API: HTTPS verified by the mesh's
//! SPIFFE rule (the collector's certificate carries a SPIFFE ID, not a host
//! name), with a mesh client certificate or a bearer token.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use palisade_agent::identity::CertStore;
use palisade_agent::sidecar::IdentityOrigin;
use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
use palisade_policy::identity::SpiffeId;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How to reach and authenticate to the collector's query API.
#[derive(clap::Args, Clone)]
pub struct CollectorArgs {
    /// The collector's query API, HOST:PORT.
    #[arg(
        long,
        env = "PALISADE_COLLECTOR",
        default_value = "127.0.0.1:15031",
        global = true
    )]
    pub collector: String,
    /// PEM trust anchors the collector's certificate must chain to.
    #[arg(long, env = "PALISADE_TRUST_BUNDLE", global = true)]
    pub trust_bundle: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local", global = true)]
    pub trust_domain: String,
    /// The SPIFFE ID the collector must prove; default: any workload of the trust domain.
    #[arg(long, global = true)]
    pub collector_id: Option<String>,
    /// A file holding the bearer token the collector accepts (--query-token-file there).
    #[arg(long, env = "PALISADE_QUERY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// A mesh client certificate (PEM chain) whose identity the collector allows (--query-allow).
    #[arg(long, requires = "key", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert", global = true)]
    pub key: Option<PathBuf>,
}

/// A response: status and body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Incoming,
}

pub struct QueryClient {
    address: String,
    tls: TlsConnector,
    token: Option<String>,
}

impl QueryClient {
    pub fn new(args: &CollectorArgs) -> anyhow::Result<Self> {
        let Some(bundle_path) = &args.trust_bundle else {
            bail!(
                "--trust-bundle (or PALISADE_TRUST_BUNDLE) is required: the PEM roots the collector's certificate chains to"
            );
        };
        let bundle = TrustBundle::from_pem_file(bundle_path)
            .with_context(|| format!("--trust-bundle {}", bundle_path.display()))?;
        let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &args.trust_domain)?;
        let expected = args
            .collector_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .context("--collector-id is not a workload SPIFFE ID")?;
        let certs: Option<Arc<dyn ResolvesClientCert>> = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                let store = Arc::new(CertStore::new());
                IdentityOrigin::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }
                .provision(&trust, &args.trust_domain, &store)
                .context("--cert/--key")?;
                Some(store)
            }
            _ => None,
        };
        let mut config = trust.client_config(certs, expected)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = match &args.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --token-file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Self {
            address: args.collector.clone(),
            tls: TlsConnector::from(Arc::new(config)),
            token,
        })
    }

    /// `GET path_and_query`.
    pub async fn get(&self, path_and_query: &str) -> anyhow::Result<Answer> {
        let tcp = TcpStream::connect(&self.address).await.with_context(|| {
            format!(
                "cannot reach the collector at {} (is `palisade-collector serve` running? --collector sets the address)",
                self.address
            )
        })?;
        // The SPIFFE verifier ignores the name; rustls needs one.
        let name = ServerName::try_from("collector.palisade").context("server name")?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the collector at {} failed", self.address))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP with the collector")?;
        tokio::spawn(conn);
        let mut request = Request::get(path_and_query).header(header::HOST, &self.address);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await
            .context("the collector did not answer")?;
        Ok(Answer {
            status: response.status(),
            body: response.into_body(),
        })
    }

    /// `GET` and parse a JSON answer; an error answer becomes an error
    /// saying what the collector said.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path_and_query: &str,
    ) -> anyhow::Result<T> {
        let answer = self.get(path_and_query).await?;
        let status = answer.status;
        let bytes = answer.body.collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{}", explain(status, &bytes));
        }
        serde_json::from_slice(&bytes).context("the collector's answer is not the expected JSON")
    }
}

/// What the collector's error body says, and what to do about it.
pub fn explain(status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " (pass --token-file, or --cert/--key of an identity the collector allows)"
        }
        StatusCode::FORBIDDEN => " (check the token or the identity the collector allows)",
        _ => "",
    };
    format!("collector answered {status}: {message}{hint}")
}
