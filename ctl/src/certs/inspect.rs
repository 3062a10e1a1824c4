//! `palisadectl certs inspect`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use palisade_policy::spiffe_cert::{CertificateSummary, spiffe_id_of_certificate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{Value, json};

use crate::output::outln;

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args)]
pub struct InspectArgs {
    /// PEM file holding a certificate chain, leaf first.
    #[arg(
        long,
        required_unless_present = "endpoint",
        conflicts_with = "endpoint"
    )]
    file: Option<PathBuf>,
    /// A live TLS endpoint, HOST:PORT; its presented chain is shown.
    #[arg(long)]
    endpoint: Option<String>,
    /// TLS server name sent to the endpoint.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Trust bundle (PEM roots) to verify the chain against.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Trust domain the SPIFFE ID must belong to.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let chain = match (&args.file, &args.endpoint) {
        (Some(file), _) => read_chain(file)?,
        (None, Some(endpoint)) => fetch_chain(endpoint, &args.server_name)?,
        (None, None) => bail!("give --file or --endpoint"),
    };
    let Some(leaf) = chain.first() else {
        bail!("no certificate found");
    };
    let mut certificates = Vec::new();
    for (i, der) in chain.iter().enumerate() {
        let summary = CertificateSummary::parse(der)
            .with_context(|| format!("certificate {i} is not X.509"))?;
        certificates.push(summary_json(&summary));
    }
    let spiffe = spiffe_id_of_certificate(leaf, &args.trust_domain);
    let mut report = json!({
        "spiffeId": spiffe.as_ref().ok().map(|id| id.to_string()),
        "spiffeIdError": spiffe.as_ref().err().map(|e| e.to_string()),
        "chain": certificates,
    });
    let mut ok = spiffe.is_ok();
    if let Some(bundle) = &args.bundle {
        let verdict = verify_against(bundle, &chain);
        ok &= verdict.is_ok();
        report["verifiesAgainstBundle"] = json!(verdict.is_ok());
        if let Err(e) = verdict {
            report["verifyError"] = json!(e.to_string());
        }
    }
    match args.output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&report)?)?,
        Output::Text => print_text(&report)?,
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_chain(file: &PathBuf) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", file.display()))
}

/// Checks the chain with webpki against the bundle's roots, for either
/// usage (workload leaves carry both client and server auth).
fn verify_against(bundle: &PathBuf, chain: &[CertificateDer<'static>]) -> anyhow::Result<()> {
    let roots = read_chain(bundle)?;
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .context("bundle holds a certificate that is not a usable root")?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        bail!("empty chain");
    };
    let leaf = webpki::EndEntityCert::try_from(leaf)
        .context("leaf is not a valid end-entity certificate")?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Connects and records the chain the server presents. Nothing is sent
/// after the handshake; the chain is judged afterwards, not trusted here.
fn fetch_chain(endpoint: &str, server_name: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let recorder = Arc::new(ChainRecorder::default());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).context("invalid --server-name")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handshake = runtime.block_on(async {
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(endpoint),
        )
        .await
        .context("connect timed out")?
        .with_context(|| format!("cannot connect to {endpoint}"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connector.connect(name, tcp),
        )
        .await
        .context("TLS handshake timed out")?
        .map(|_| ())
        .map_err(anyhow::Error::from)
    });
    let chain = recorder.chain.lock().map(|c| c.clone()).unwrap_or_default();
    if chain.is_empty() {
        handshake?;
        bail!("{endpoint} presented no certificate");
    }
    // A server that requires a client certificate ends the handshake after
    // presenting its own chain: the chain is still worth showing.
    Ok(chain)
}

#[derive(Debug, Default)]
struct ChainRecorder {
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.chain.lock() {
            chain.push(end_entity.clone().into_owned());
            chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &signature_algs())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algs())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algs().supported_schemes()
    }
}

/// The handshake signature algorithms of the ring provider the connection uses.
fn signature_algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn unix_to_rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map_or_else(|_| unix.to_string(), |t| t.to_string())
}

fn summary_json(s: &CertificateSummary) -> Value {
    json!({
        "subject": s.subject,
        "issuer": s.issuer,
        "serial": s.serial_hex,
        "notBefore": unix_to_rfc3339(s.not_before),
        "notAfter": unix_to_rfc3339(s.not_after),
        "uriSans": s.uri_sans,
        "dnsSans": s.dns_sans,
        "isCa": s.is_ca,
    })
}

fn print_text(report: &Value) -> std::io::Result<()> {
    match report["spiffeId"].as_str() {
        Some(id) => outln!("spiffe id: {id}")?,
        None => outln!(
            "spiffe id: none ({})",
            report["spiffeIdError"].as_str().unwrap_or("unknown")
        )?,
    }
    for (i, c) in report["chain"].as_array().into_iter().flatten().enumerate() {
        let role = if i == 0 { "leaf" } else { "chain" };
        outln!("[{i}] {role}")?;
        for key in ["subject", "issuer", "serial", "notBefore", "notAfter"] {
            outln!("    {key}: {}", c[key].as_str().unwrap_or("-"))?;
        }
        outln!("    uriSans: {}", c["uriSans"])?;
        outln!("    dnsSans: {}", c["dnsSans"])?;
        outln!("    isCa: {}", c["isCa"])?;
    }
    if let Some(v) = report.get("verifiesAgainstBundle") {
        outln!("verifies against bundle: {v}")?;
        if let Some(e) = report["verifyError"].as_str() {
            outln!("    {e}")?;
        }
    }
    Ok(())
}
