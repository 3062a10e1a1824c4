//! `palisade-agent`: the Palisade sidecar. This file only parses flags and
//! wires the library together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use palisade_agent::admin::{self, IdentityStatus};
use palisade_agent::capture::{self, CaptureConfig, Iptables, Ipv4Cidr};
use palisade_agent::identity::{
    CertStore, IdentityClient, IdentityClientConfig, RenewalConfig, Renewer, TokenSource,
};
use palisade_agent::ratelimit::GlobalRateLimiterConfig;
use palisade_agent::ratelimit::probe::{ProbeConfig, run_probe};
use palisade_agent::tls::{MeshTrust, SharedTrustBundle, TrustBundle};
use palisade_policy::PolicyEngine;
use palisade_policy::identity::SpiffeId;
use palisade_policy::ratelimit::Algorithm;
use palisade_policy::wire::WorkloadPolicy;
use palisade_policy::wire::rate_limit::FailureMode;
use prost::Message;

#[derive(Parser)]
#[command(
    name = "palisade-agent",
    version,
    about = "Palisade sidecar: a transparent mTLS proxy that enforces WorkloadPolicy on every request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a compiled policy (from `palisadectl policy compile`) and report whether it can be enforced.
    CheckPolicy {
        /// Binary WorkloadPolicy file.
        policy_file: PathBuf,
    },
    /// Obtain a workload certificate from the operator and keep renewing it (at 70 % of its
    /// lifetime, with jittered backoff on failure), logging each renewal. Runs until interrupted.
    Identity(IdentityArgs),
    /// Run N checks of one `scope: global` rate limit against a shared Redis and print
    /// `admitted=X denied=Y errors=Z` (proves limits are shared across agent processes).
    RatelimitProbe(ProbeArgs),
    /// Install the transparent-capture iptables rules (nat table) in this network namespace:
    /// inbound TCP to the inbound port, outbound TCP to the outbound port, except the agent's
    /// own traffic (by UID), the admin port and excluded ports/CIDRs. Idempotent. Run as root
    /// (an init container with NET_ADMIN).
    Init(InitArgs),
    /// Run the inbound proxy in explicit mode: accept mTLS on --inbound's listen address,
    /// enforce --policy-file and forward allowed requests to the app over plaintext HTTP/1.1.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// LISTEN=APP, e.g. 127.0.0.1:8443=127.0.0.1:8080.
    #[arg(long, value_parser = parse_inbound)]
    inbound: (std::net::SocketAddr, std::net::SocketAddr),
    /// Binary WorkloadPolicy (from `palisadectl policy compile`); without it every request is denied.
    #[arg(long)]
    policy_file: Option<PathBuf>,
    /// PEM trust anchors peers (and the operator) must chain to.
    #[arg(long, env = "PALISADE_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Operator identity service, HOST:PORT (instead of --cert/--key).
    #[arg(long, env = "PALISADE_OPERATOR", required_unless_present = "cert")]
    operator: Option<String>,
    /// Proof of identity for the operator.
    #[arg(long, env = "PALISADE_TOKEN_FILE", requires = "operator")]
    token_file: Option<PathBuf>,
    /// SPIFFE ID the operator's certificate must carry.
    #[arg(long)]
    operator_id: Option<String>,
    /// Local use and tests: PEM certificate chain (leaf first, SPIFFE ID SAN) instead of the operator.
    #[arg(long, requires = "key", conflicts_with = "operator")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Admin endpoint (/healthz, /readyz, /metrics), ADDR:PORT; '' disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    admin: String,
}

fn parse_inbound(text: &str) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let (listen, app) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not LISTEN=APP"))?;
    let parse = |a: &str| {
        a.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{a:?}: {e}"))
    };
    Ok((parse(listen)?, parse(app)?))
}

#[derive(clap::Args)]
struct InitArgs {
    /// The agent's inbound listener port (inbound TCP is redirected there).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The agent's outbound listener port (the app's outbound TCP is redirected there).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// UID the agent runs as; its traffic is never redirected.
    #[arg(long, default_value_t = 2137)]
    proxy_uid: u32,
    /// The agent's admin port; never redirected inbound.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Inbound ports to capture, comma-separated; default: all (minus exclusions).
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    include_inbound_ports: Option<Vec<u16>>,
    /// Inbound ports left alone, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination IPv4 CIDRs left alone, comma-separated (a bare address is /32).
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// The pod's IPv4 address: the app's connections to itself through it (over `lo`) are
    /// captured. Without it, all traffic over `lo` is left alone.
    #[arg(long)]
    pod_ip: Option<std::net::Ipv4Addr>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// Remove every chain and jump `init` installs (instead of installing).
    #[arg(long)]
    cleanup: bool,
    /// The iptables binary.
    #[arg(long, default_value = "iptables")]
    iptables: PathBuf,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379.
    #[arg(long)]
    redis: String,
    /// Requests admitted per period (token bucket: tokens refilled per period).
    #[arg(long)]
    amount: u64,
    /// Period, e.g. 500ms, 10s, 1m.
    #[arg(long, value_parser = parse_period)]
    period: Duration,
    #[arg(long, value_enum, default_value = "fixedWindow")]
    algorithm: ProbeAlgorithm,
    /// Token bucket capacity; 0 means --amount.
    #[arg(long, default_value_t = 0)]
    burst: u64,
    /// The rate-limit key every request carries.
    #[arg(long)]
    key: String,
    /// Number of checks.
    #[arg(long)]
    requests: u64,
    #[arg(long, value_enum, default_value = "closed")]
    failure_mode: ProbeFailureMode,
    /// Id of the limit (names its Redis keys).
    #[arg(long, default_value = "ratelimit-probe")]
    limit_id: String,
    /// Checks in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Bound on each check, in milliseconds.
    #[arg(long, default_value_t = 50)]
    timeout_ms: u64,
    /// Connect first, then start checking at this Unix time in milliseconds.
    #[arg(long)]
    not_before_unix_ms: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeAlgorithm {
    #[value(name = "tokenBucket")]
    TokenBucket,
    #[value(name = "fixedWindow")]
    FixedWindow,
    #[value(name = "slidingWindow")]
    SlidingWindow,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProbeFailureMode {
    Open,
    Closed,
}

fn parse_period(text: &str) -> Result<Duration, String> {
    palisade_policy::duration::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
struct IdentityArgs {
    /// Operator identity service, HOST:PORT (the operator listens on 15012).
    #[arg(long, env = "PALISADE_OPERATOR")]
    operator: String,
    /// File holding the proof of identity (projected ServiceAccount token or local token);
    /// re-read on every request.
    #[arg(long, env = "PALISADE_TOKEN_FILE")]
    token_file: PathBuf,
    /// PEM file with the trust anchors (one or more roots) the operator's certificate must chain to.
    #[arg(long, env = "PALISADE_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    /// SPIFFE ID the operator's certificate must carry; without it any identity of the trust
    /// domain signed by the bundle is accepted.
    #[arg(long, value_name = "spiffe://…")]
    operator_id: Option<String>,
    /// Trust domain of this mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Requested certificate lifetime in seconds (the operator may shorten it); default: the operator's.
    #[arg(long, value_name = "SECONDS")]
    ttl: Option<u64>,
    /// Admin endpoint (plain HTTP: /healthz, /readyz, /metrics), ADDR:PORT; '' disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    admin: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::CheckPolicy { policy_file } => check_policy(policy_file),
        Command::Identity(args) => {
            init_tracing();
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(identity(args))
        }
        Command::Init(args) => init(args),
        Command::Run(args) => {
            init_tracing();
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(run(args))
        }
        Command::RatelimitProbe(args) => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")?
            .block_on(ratelimit_probe(args)),
    }
}

async fn ratelimit_probe(args: ProbeArgs) -> anyhow::Result<()> {
    let mut store = GlobalRateLimiterConfig::new(args.redis);
    store.timeout = Duration::from_millis(args.timeout_ms);
    let config = ProbeConfig {
        store,
        limit_id: args.limit_id,
        algorithm: match args.algorithm {
            ProbeAlgorithm::TokenBucket => Algorithm::TokenBucket,
            ProbeAlgorithm::FixedWindow => Algorithm::FixedWindow,
            ProbeAlgorithm::SlidingWindow => Algorithm::SlidingWindow,
        },
        amount: args.amount,
        period: args.period,
        burst: args.burst,
        failure_mode: match args.failure_mode {
            ProbeFailureMode::Open => FailureMode::Open,
            ProbeFailureMode::Closed => FailureMode::Closed,
        },
        key: args.key,
        requests: args.requests,
        concurrency: args.concurrency,
        not_before_unix_ms: args.not_before_unix_ms,
    };
    println!("{}", run_probe(&config).await?);
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = CaptureConfig {
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        proxy_uid: args.proxy_uid,
        admin_port: args.admin_port,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        include_inbound_ports: args.include_inbound_ports,
        pod_ip: args.pod_ip,
    };
    let steps = if args.cleanup {
        capture::cleanup_plan()
    } else {
        capture::install_plan(&config)
    };
    if args.dry_run {
        for step in &steps {
            println!("{step}");
        }
        return Ok(());
    }
    let iptables = Iptables::new(&args.iptables);
    iptables.check_available()?;
    iptables.execute(&steps)?;
    if args.cleanup {
        println!("transparent capture removed");
    } else {
        println!(
            "transparent capture installed: inbound -> {}, outbound -> {} (uid {} excluded)",
            config.inbound_port, config.outbound_port, config.proxy_uid
        );
    }
    Ok(())
}

fn check_policy(policy_file: PathBuf) -> anyhow::Result<()> {
    let bytes = std::fs::read(&policy_file)
        .with_context(|| format!("cannot read {}", policy_file.display()))?;
    let policy = WorkloadPolicy::decode(bytes.as_slice()).context("not a WorkloadPolicy")?;
    let engine = PolicyEngine::load(policy).context("policy cannot be enforced")?;
    println!(
        "policy {} for {}: {} routes, ready",
        engine.version(),
        engine.policy().workload,
        engine.policy().routes.len()
    );
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal, so logs shipped from a pod stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
}

async fn identity(args: IdentityArgs) -> anyhow::Result<()> {
    let admin_addr: Option<std::net::SocketAddr> = match args.admin.trim() {
        "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--admin {a:?} is not ADDR:PORT"))?,
        ),
    };
    let bundle = TrustBundle::from_pem_file(&args.trust_bundle)?;
    let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &args.trust_domain)?;
    let operator_id = args
        .operator_id
        .as_deref()
        .map(SpiffeId::parse)
        .transpose()
        .context("--operator-id is not a workload SPIFFE ID")?;
    if operator_id.is_none() {
        tracing::warn!(
            "no --operator-id: any workload of the trust domain could act as the operator"
        );
    }
    let mut config = IdentityClientConfig::new(args.operator, TokenSource::File(args.token_file));
    config.operator_id = operator_id;
    config.requested_ttl = args.ttl.map(Duration::from_secs);
    let client = IdentityClient::new(config, trust)?;
    let renewer = Renewer::new(client, Arc::new(CertStore::new()), RenewalConfig::default());
    let status = Arc::new(IdentityStatus::new(renewer.store().clone()));
    // Subscribed before the loop starts, so the first outcome is counted.
    tokio::spawn(status.clone().track(renewer.subscribe()));
    if let Some(addr) = admin_addr {
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
        let bound = listener.local_addr().context("admin listener address")?;
        tracing::info!(addr = %bound, "admin endpoint listening (/healthz, /readyz, /metrics)");
        tokio::spawn(admin::serve(listener, status));
    }
    tokio::select! {
        () = renewer.run() => Ok(()),
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for Ctrl-C")?;
            tracing::info!("interrupted; exiting");
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use palisade_agent::identity::IssuedCert;
    use palisade_agent::inbound::{InboundConfig, InboundProxy, LoadedPolicy, SharedPolicy};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let (listen, app) = args.inbound;
    let admin_addr: Option<std::net::SocketAddr> = match args.admin.trim() {
        "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--admin {a:?} is not ADDR:PORT"))?,
        ),
    };
    let bundle = TrustBundle::from_pem_file(&args.trust_bundle)?;
    let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &args.trust_domain)?;
    let policy = SharedPolicy::default();
    match &args.policy_file {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let wire = WorkloadPolicy::decode(bytes.as_slice()).context("not a WorkloadPolicy")?;
            let loaded = LoadedPolicy::load(wire, Default::default())
                .context("policy cannot be enforced")?;
            tracing::info!(version = loaded.engine.version(), "policy loaded");
            policy.replace(loaded);
        }
        None => tracing::warn!("no --policy-file: every request is denied"),
    }
    let store = Arc::new(CertStore::new());
    let renewer = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{} is not PEM certificates", cert.display()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("cannot read a PEM key from {}", key.display()))?;
            let signing = trust
                .provider()
                .key_provider
                .load_private_key(key_der)
                .context("unusable private key")?;
            store.install(IssuedCert::new(chain, signing, &args.trust_domain)?);
            None
        }
        _ => {
            let (Some(operator), Some(token_file)) =
                (args.operator.clone(), args.token_file.clone())
            else {
                anyhow::bail!("--operator and --token-file (or --cert and --key) are required");
            };
            let mut config = IdentityClientConfig::new(operator, TokenSource::File(token_file));
            config.operator_id = args
                .operator_id
                .as_deref()
                .map(SpiffeId::parse)
                .transpose()
                .context("--operator-id is not a workload SPIFFE ID")?;
            let client = IdentityClient::new(config, trust.clone())?;
            Some(Renewer::new(
                client,
                store.clone(),
                RenewalConfig::default(),
            ))
        }
    };
    let status = Arc::new(IdentityStatus::new(store.clone()));
    if let Some(renewer) = &renewer {
        tokio::spawn(status.clone().track(renewer.subscribe()));
    }
    if let Some(addr) = admin_addr {
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
        tokio::spawn(admin::serve(listener, status));
    }
    let proxy = InboundProxy::bind(listen, InboundConfig::new(app, trust, store, policy))
        .await
        .with_context(|| format!("cannot listen on {listen} (--inbound)"))?;
    tracing::info!(listen = %proxy.local_addr()?, %app, "inbound proxy listening");
    let renew = async {
        match renewer {
            Some(r) => r.run().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = proxy.run() => Ok(()),
        () = renew => Ok(()),
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for Ctrl-C")?;
            tracing::info!("interrupted; exiting");
            Ok(())
        }
    }
}
