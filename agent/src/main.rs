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
    /// Run the sidecar: the inbound proxy (accept mTLS, enforce --policy-file, forward allowed
    /// requests to the app) and the outbound proxy (plaintext from the app, an mTLS tunnel to
    /// meshed destinations). Explicit mode: --inbound / --outbound LISTEN=DEST; transparent mode
    /// (after `init`): --transparent. At least one of the three is required.
    // Boxed: its many flags dwarf the other variants (clippy::large_enum_variant).
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("mode")
        .required(true)
        .multiple(true)
        .args(["inbound", "transparent", "outbound"])
))]
struct RunArgs {
    /// Explicit inbound: LISTEN=APP, e.g. 127.0.0.1:8443=127.0.0.1:8080 (mTLS on LISTEN, the app
    /// on APP).
    #[arg(
        long,
        value_parser = parse_inbound,
        value_name = "LISTEN=APP"
    )]
    inbound: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Transparent mode, after `palisade-agent init` captured the pod's traffic: inbound on
    /// 0.0.0.0:--inbound-port, forwarding to each connection's original destination; outbound on
    /// 127.0.0.1:--outbound-port, tunnelling to each connection's original destination. Run the
    /// agent as the proxy UID `init` exempts (2137), or its own traffic is captured again.
    #[arg(long, conflicts_with = "inbound")]
    transparent: bool,
    /// Transparent mode: the inbound listener's port (`init --inbound-port`).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Transparent mode: the outbound listener's port (`init --outbound-port`).
    #[arg(long, default_value_t = palisade_agent::outbound::DEFAULT_OUTBOUND_PORT)]
    outbound_port: u16,
    /// Explicit outbound (repeatable): LISTEN=DEST, e.g. 127.0.0.1:9001=10.0.0.5:8443. Plaintext
    /// accepted on LISTEN is tunnelled over mTLS to DEST, always; the server must be the identity
    /// --mesh-destination gives for DEST, else any identity of the trust domain (with a warning).
    #[arg(long, value_parser = parse_outbound, value_name = "LISTEN=DEST")]
    outbound: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// A meshed destination (repeatable): ADDR[/PREFIX][:PORT]=ID, ID a SPIFFE ID or `*` (any
    /// workload of the trust domain), e.g. 10.0.0.0/24:8443=spiffe://cluster.local/ns/shop/sa/orders.
    /// The most specific entry wins (longest prefix, then an entry with the port).
    #[arg(long, value_parser = parse_mesh_destination, value_name = "ADDR=ID")]
    mesh_destination: Vec<palisade_agent::outbound::DestinationEntry>,
    /// Transparent mode: what happens to app connections to destinations no --mesh-destination
    /// covers: `passthrough` (plain TCP to the original destination) or `deny` (closed, logged).
    #[arg(long, value_enum, default_value = "passthrough")]
    outbound_unmatched: UnmatchedArg,
    /// How long the outbound proxy waits for the app's first bytes to pick ALPN (h2, http/1.1 or
    /// none); server-first protocols wait this long once per connection.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    outbound_detect_timeout_ms: u64,
    /// Longest the outbound proxy's TCP connect to a destination may take.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    outbound_connect_timeout_ms: u64,
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
    /// Policy stream (with --operator, without --policy-file): the namespace named to the
    /// operator; default: the certificate's. Must agree with the certificate.
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    namespace: Option<String>,
    /// Policy stream: the service account named to the operator; default: the certificate's.
    #[arg(long, value_name = "SA")]
    service_account: Option<String>,
    /// Policy stream: this pod's name, for the operator's status.
    #[arg(long, env = "POD_NAME", default_value = "", value_name = "NAME")]
    pod_name: String,
    /// Policy stream: a workload label policies select on (repeatable), e.g. --label app=orders.
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    labels: Vec<(String, String)>,
    /// Policy stream: stable id of this agent instance (the pod UID); default: random per start.
    #[arg(long, env = "PALISADE_AGENT_INSTANCE_ID", value_name = "ID")]
    agent_instance_id: Option<String>,
    /// Local use and tests: PEM certificate chain (leaf first, SPIFFE ID SAN) instead of the operator.
    #[arg(long, requires = "key", conflicts_with = "operator")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Admin endpoint (/healthz, /readyz, /metrics), ADDR:PORT; '' disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    admin: String,
    /// Redis shared by all agents for `scope: global` rate limits, e.g. redis://redis:6379.
    /// Without it every global limit acts as its `failureMode` says (closed: 429, open: admit).
    #[arg(long, env = "PALISADE_RATELIMIT_REDIS", value_name = "URL")]
    ratelimit_redis: Option<String>,
    /// Longest one global rate-limit check may wait for Redis, in milliseconds.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    ratelimit_timeout_ms: u64,
    /// App ports proxied as opaque TCP (mTLS and identity-level authorization only), e.g.
    /// 5432,6379. Other ports detect HTTP per connection.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    opaque_ports: Vec<u16>,
    /// App ports that only speak HTTP/1.1 even to HTTP/2 clients: PORT=http1 (repeatable).
    /// By default the app gets the client's protocol (HTTP/2 as h2c).
    #[arg(long, value_parser = parse_app_protocol, value_name = "PORT=http1")]
    app_protocol: Vec<(u16, palisade_agent::inbound::AppProtocol)>,
    /// On SIGTERM, how long in-flight requests may take to finish, in seconds.
    #[arg(long, default_value_t = 20, value_name = "SECONDS")]
    drain_timeout: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UnmatchedArg {
    Passthrough,
    Deny,
}

fn parse_outbound(text: &str) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let (listen, dest) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not LISTEN=DEST"))?;
    let parse = |a: &str| {
        a.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{a:?}: {e}"))
    };
    Ok((parse(listen)?, parse(dest)?))
}

fn parse_mesh_destination(
    text: &str,
) -> Result<palisade_agent::outbound::DestinationEntry, String> {
    text.parse()
        .map_err(|e: palisade_agent::outbound::DestinationParseError| e.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn parse_app_protocol(text: &str) -> Result<(u16, palisade_agent::inbound::AppProtocol), String> {
    let (port, protocol) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not PORT=PROTOCOL"))?;
    let port = port
        .parse::<u16>()
        .map_err(|e| format!("{port:?} is not a port: {e}"))?;
    Ok((port, protocol.parse()?))
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
                .block_on(run(*args))
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

/// The discovery client for `run`: who we are (beyond the certificate) and
/// where the policy goes.
fn policy_watcher(
    args: &RunArgs,
    operator: &str,
    ports: Vec<u16>,
    trust: &MeshTrust,
    store: &Arc<CertStore>,
    policy: &palisade_agent::inbound::SharedPolicy,
) -> anyhow::Result<palisade_agent::discovery::PolicyWatcher> {
    use palisade_agent::discovery::{PolicyWatcher, PolicyWatcherConfig, WorkloadInfo};
    let agent_instance_id = args.agent_instance_id.clone().unwrap_or_else(|| {
        // Random per process: the operator tells restarts apart.
        let bytes: [u8; 8] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    });
    let workload = WorkloadInfo {
        namespace: args.namespace.clone().filter(|n| !n.is_empty()),
        service_account: args.service_account.clone(),
        pod_name: args.pod_name.clone(),
        labels: args.labels.iter().cloned().collect(),
        ports,
        agent_instance_id,
    };
    let mut config = PolicyWatcherConfig::new(operator, workload);
    config.operator_id = args
        .operator_id
        .as_deref()
        .map(SpiffeId::parse)
        .transpose()
        .context("--operator-id is not a workload SPIFFE ID")?;
    PolicyWatcher::new(config, trust, store.clone(), policy.clone())
        .context("policy stream configuration")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Thousands of connections need thousands of descriptors (see limits.rs).
    match palisade_agent::limits::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    use palisade_agent::identity::IssuedCert;
    use palisade_agent::inbound::{InboundConfig, InboundProxy, LoadedPolicy, SharedPolicy};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    use palisade_agent::inbound::AppTarget;
    use palisade_agent::outbound::{
        DestinationTable, OutboundConfig, OutboundProxy, OutboundTarget, UnmatchedPolicy,
    };
    use std::net::{Ipv4Addr, SocketAddr};

    let inbound_listener = match (args.inbound, args.transparent) {
        (Some((listen, app)), _) => Some((listen, AppTarget::Fixed(app))),
        (None, true) => Some((
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.inbound_port)),
            AppTarget::OriginalDst,
        )),
        (None, false) => None,
    };
    if args.transparent {
        use std::os::unix::fs::MetadataExt;
        // `/proc/self` belongs to our effective UID. `init` exempts one UID
        // (2137 unless --proxy-uid said otherwise) from capture; under any
        // other, every connection the agent makes is redirected back to it.
        if let Ok(meta) = std::fs::metadata("/proc/self")
            && meta.uid() != 2137
        {
            tracing::warn!(
                uid = meta.uid(),
                "--transparent: running as a UID other than 2137; unless `init --proxy-uid` \
                 names this UID, the agent's own connections are captured and loop"
            );
        }
    }
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
    let policy_status = Arc::new(palisade_agent::discovery::PolicyStatus::new());
    match &args.policy_file {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let wire = WorkloadPolicy::decode(bytes.as_slice()).context("not a WorkloadPolicy")?;
            let loaded = LoadedPolicy::load(wire, Default::default())
                .context("policy cannot be enforced")?;
            tracing::info!(version = loaded.engine.version(), "policy loaded");
            policy_status.set_file(loaded.engine.version());
            policy.replace(loaded);
        }
        None if inbound_listener.is_some() && args.operator.is_none() => {
            tracing::warn!("no --policy-file and no --operator: every request is denied")
        }
        None => {}
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
    // Policy from the operator (DESIGN §5), unless --policy-file pins one.
    // Until the first version arrives every request is denied.
    if let (Some(operator), None, Some((_, app))) =
        (&args.operator, &args.policy_file, &inbound_listener)
    {
        let ports = match app {
            AppTarget::Fixed(a) => vec![a.port()],
            // Transparent: any port may be the app's; every policy port applies.
            _ => Vec::new(),
        };
        let watcher = policy_watcher(&args, operator, ports, &trust, &store, &policy)?
            .with_status(policy_status.clone());
        tracing::info!(%operator, "policy from the operator's discovery stream");
        tokio::spawn(watcher.run());
    }
    let status = Arc::new(IdentityStatus::new(store.clone()));
    if let Some(renewer) = &renewer {
        tokio::spawn(status.clone().track(renewer.subscribe()));
    }
    let policy_required = args.policy_file.is_some() || args.operator.is_some();
    let mut admin_state = admin::AdminState::new(status)
        .with_policy(
            policy.clone(),
            inbound_listener.is_some() && policy_required,
        )
        .with_metrics(policy_status.clone());
    let mut inbound_proxies = Vec::new();
    if let Some((listen, app)) = inbound_listener {
        let mut inbound = InboundConfig::new(app, trust.clone(), store.clone(), policy);
        if let Some(url) = &args.ratelimit_redis {
            let mut config = GlobalRateLimiterConfig::new(url.clone());
            config.timeout = Duration::from_millis(args.ratelimit_timeout_ms);
            let limiter = palisade_agent::ratelimit::GlobalRateLimiter::new(&config)
                .with_context(|| format!("--ratelimit-redis {url:?}"))?;
            admin_state = admin_state.with_metrics(limiter.metrics().clone());
            inbound.global_limits = Some(Arc::new(limiter));
        }
        for port in &args.opaque_ports {
            inbound
                .port_protocols
                .insert(*port, palisade_agent::inbound::PortProtocol::Opaque);
        }
        inbound
            .app_protocols
            .extend(args.app_protocol.iter().copied());
        inbound.drain_timeout = Duration::from_secs(args.drain_timeout);
        let proxy = InboundProxy::bind(listen, inbound)
            .await
            .with_context(|| format!("cannot listen on {listen} (--inbound)"))?;
        tracing::info!(listen = %proxy.local_addr()?, app = ?app, "inbound proxy listening");
        admin_state = admin_state.with_metrics(Arc::new(proxy.stats()));
        inbound_proxies.push(proxy);
    }

    // Outbound: one listener per --outbound, plus the transparent one; all
    // share the destination table and the metrics.
    let mut table = DestinationTable::new();
    for entry in args.mesh_destination {
        table.insert(entry).context("--mesh-destination")?;
    }
    let mut outbound = OutboundConfig::new(trust, store, table);
    admin_state = admin_state.with_metrics(outbound.metrics.clone());
    outbound.unmatched = match args.outbound_unmatched {
        UnmatchedArg::Passthrough => UnmatchedPolicy::Passthrough,
        UnmatchedArg::Deny => UnmatchedPolicy::Deny,
    };
    outbound.detect_timeout = Duration::from_millis(args.outbound_detect_timeout_ms);
    outbound.connect_timeout = Duration::from_millis(args.outbound_connect_timeout_ms);
    let mut outbound_listeners: Vec<(SocketAddr, OutboundTarget)> = args
        .outbound
        .iter()
        .map(|(listen, dest)| (*listen, OutboundTarget::Fixed(*dest)))
        .collect();
    if args.transparent {
        outbound_listeners.push((
            SocketAddr::from((Ipv4Addr::LOCALHOST, args.outbound_port)),
            OutboundTarget::OriginalDst,
        ));
    }
    let mut outbound_proxies = Vec::new();
    for (listen, target) in outbound_listeners {
        let proxy = OutboundProxy::bind(listen, target, outbound.clone())
            .await
            .with_context(|| format!("outbound listener {listen}"))?;
        let bound = proxy.local_addr()?;
        match proxy.fixed_destination() {
            Some((dest, expected)) => {
                tracing::info!(listen = %bound, %dest, %expected, "outbound proxy listening")
            }
            None => tracing::info!(
                listen = %bound,
                destinations = outbound.destinations.entries().len(),
                unmatched = ?outbound.unmatched,
                "outbound proxy listening (transparent)"
            ),
        }
        outbound_proxies.push(proxy);
    }

    // Everything is bound: serve the admin endpoint, then the proxies.
    let admin_state = Arc::new(admin_state.with_runtime(serde_json::json!({
        "inbound": args.inbound.map(|(l, a)| format!("{l}={a}")),
        "transparent": args.transparent,
        "outbound": args.outbound.iter().map(|(l, d)| format!("{l}={d}")).collect::<Vec<_>>(),
        "policy_source": if args.policy_file.is_some() { "file" } else if args.operator.is_some() { "discovery" } else { "none" },
        "global_rate_limits": args.ratelimit_redis.is_some(),
        "opaque_ports": args.opaque_ports,
    })));
    if let Some(addr) = admin_addr {
        let listener = admin::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
        tokio::spawn(admin::serve_state(listener, admin_state.clone()));
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut proxies = tokio::task::JoinSet::new();
    for proxy in inbound_proxies {
        let mut rx = shutdown_rx.clone();
        proxies.spawn(proxy.run_until(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }));
    }
    for proxy in outbound_proxies {
        let mut rx = shutdown_rx.clone();
        // Outbound tunnels carry no request boundary: stop accepting, and let
        // the process exit end them once the inbound side has drained.
        proxies.spawn(async move {
            tokio::select! {
                () = proxy.run() => {}
                _ = rx.wait_for(|stop| *stop) => {}
            }
        });
    }
    let renew = async {
        match renewer {
            Some(r) => r.run().await,
            None => std::future::pending().await,
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        Some(done) = proxies.join_next() => {
            done.context("a proxy stopped")?;
            return Ok(());
        }
        () = renew => return Ok(()),
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for Ctrl-C")?;
            tracing::info!("interrupted; draining");
        }
        _ = sigterm.recv() => tracing::info!("SIGTERM; draining"),
    }
    // Graceful shutdown: not ready any more, no new connections, in-flight
    // requests finish within --drain-timeout (each inbound proxy enforces it).
    admin_state.start_draining();
    let _ = shutdown_tx.send(true);
    while proxies.join_next().await.is_some() {}
    tracing::info!("drained; exiting");
    Ok(())
}
