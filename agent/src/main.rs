//! `palisade-agent`: the Palisade sidecar. This file only parses flags and
//! wires the library together.

use std::net::SocketAddr;
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
use palisade_agent::outbound::UnmatchedPolicy;
use palisade_agent::ratelimit::GlobalRateLimiterConfig;
use palisade_agent::ratelimit::probe::{ProbeConfig, run_probe};
use palisade_agent::sidecar::{
    AuditOptions, DiscoveryOptions, ExplicitListener, IdentityOrigin, PolicyOrigin, Sidecar,
    SidecarOptions, TransparentPorts,
};
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
    inbound: Option<ExplicitListener>,
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
    outbound: Vec<ExplicitListener>,
    /// A meshed destination (repeatable): ADDR[/PREFIX][:PORT]=ID, ID a SPIFFE ID or `*` (any
    /// workload of the trust domain), e.g. 10.0.0.0/24:8443=spiffe://cluster.local/ns/shop/sa/orders.
    /// The most specific entry wins (longest prefix, then an entry with the port).
    /// With --operator, discovery also says whom each meshed destination must be; these flags
    /// override it for the destinations they cover.
    #[arg(long, value_parser = parse_mesh_destination, value_name = "ADDR=ID")]
    mesh_destination: Vec<palisade_agent::outbound::DestinationEntry>,
    /// This pod's IP (repeatable, e.g. IPv4 and IPv6), advertised to the operator as where this
    /// agent accepts mTLS, so other agents pin our identity for it: with --transparent every port
    /// of it; with --inbound on 0.0.0.0 or [::] the --inbound port (an --inbound on one address
    /// advertises that address). Default: $POD_IP (ignored when empty). Without one nothing is
    /// advertised.
    #[arg(long, env = "POD_IP", value_parser = parse_advertise_address, value_name = "IP")]
    advertise_address: Vec<Option<std::net::IpAddr>>,
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
    /// Stable id of this agent instance (the pod UID), named to the operator on the policy
    /// stream; default: random per start. With --collector it also names the audit stream's
    /// instance: kept as is in a new --audit-spool-dir (whose own id wins afterwards), and
    /// given a random suffix per start without one (a restart then starts a new sequence).
    #[arg(long, env = "PALISADE_AGENT_INSTANCE_ID", value_name = "ID")]
    agent_instance_id: Option<String>,
    /// Local use and tests: PEM certificate chain (leaf first, SPIFFE ID SAN) instead of the operator.
    #[arg(long, requires = "key", conflicts_with = "operator")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Admin endpoint, ADDR:PORT; '' disables it. /healthz, /readyz, /app-health/NAME and
    /// /metrics answer every client (kubelet, Prometheus); /config_dump (policy, identity, mesh
    /// destinations) and any other path only clients on loopback (127.0.0.0/8, ::1): others
    /// get 403.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    admin: String,
    /// Redis shared by all agents for `scope: global` rate limits, e.g. redis://redis:6379.
    /// Without it every global limit acts as its `failureMode` says (closed: 429, open: admit).
    #[arg(long, env = "PALISADE_RATELIMIT_REDIS", value_name = "URL")]
    ratelimit_redis: Option<String>,
    /// Longest one global rate-limit check may wait for Redis, in milliseconds.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    ratelimit_timeout_ms: u64,
    /// App ports proxied as opaque TCP (mTLS and identity-level authorization only) when the
    /// policy declares nothing about them, e.g. 5432,6379. A port the policy declares `tcp` is
    /// opaque without this; one it gives HTTP rules is always HTTP. Every other port is HTTP: a
    /// connection there that does not speak HTTP is closed and audited.
    #[arg(long, value_delimiter = ',', value_name = "PORTS")]
    opaque_ports: Vec<u16>,
    /// On HTTP ports, how long a connection without ALPN may stay silent before its first
    /// bytes; after it the connection is closed and audited (never tunnelled).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    detect_timeout_ms: u64,
    /// `Upgrade` protocols passed on to the app, comma-separated (e.g. websocket). Any other
    /// upgrade, and h2c always, is refused with 400.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "websocket",
        value_name = "PROTOCOLS"
    )]
    upgrade_protocols: Vec<String>,
    /// Inbound requests in flight (arrived, response head not yet sent) across all
    /// connections; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_requests_in_flight: usize,
    /// App ports that only speak HTTP/1.1 even to HTTP/2 clients: PORT=http1 (repeatable).
    /// By default the app gets the client's protocol (HTTP/2 as h2c).
    #[arg(long, value_parser = parse_app_protocol, value_name = "PORT=http1")]
    app_protocol: Vec<(u16, palisade_agent::inbound::AppProtocol)>,
    /// On SIGTERM, how long in-flight requests may take to finish, in seconds.
    #[arg(long, default_value_t = 20, value_name = "SECONDS")]
    drain_timeout: u64,
    /// The collector's Audit service, HOST:PORT (it listens on 15030): every recorded decision
    /// (denials, audit-mode findings, sampled allowed requests) is also streamed there over
    /// mTLS, in batches, at least once. Requests never wait for it: when it is away events wait
    /// in memory and in --audit-spool-dir, and beyond those bounds they are dropped, counted and
    /// reported as a gap. Without it audit events are log lines (target palisade::audit) only.
    #[arg(long, env = "PALISADE_COLLECTOR", value_name = "HOST:PORT")]
    collector: Option<String>,
    /// SPIFFE ID the collector's certificate must carry, e.g.
    /// spiffe://cluster.local/ns/palisade-system/sa/palisade-collector; without it any workload
    /// of the trust domain signed by the bundle is accepted (with a warning).
    #[arg(long, requires = "collector", value_name = "spiffe://…")]
    collector_id: Option<String>,
    /// Directory for audit batches the collector has not acknowledged yet, kept while it is away
    /// and across agent restarts (sent first on the next start, under their original instance id
    /// and sequence). Created if missing (mode 0700); one agent per directory. Without it those
    /// batches are held in memory only (up to 8 MiB; more are dropped and counted) and lost when
    /// the agent exits.
    #[arg(long, requires = "collector", value_name = "DIR")]
    audit_spool_dir: Option<PathBuf>,
    /// Most bytes of batches the audit spool holds; beyond it (and the memory bound) new batches
    /// are dropped and counted.
    #[arg(long, default_value_t = palisade_agent::audit::spool::DEFAULT_MAX_BYTES, value_name = "BYTES")]
    audit_spool_max_bytes: u64,
    /// Audit events the in-memory queue between the request path and the reporter holds; when it
    /// is full, new events are dropped and counted (palisade_audit_events_dropped_total).
    #[arg(
        long,
        default_value_t = palisade_agent::audit::sink::DEFAULT_QUEUE_EVENTS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
        value_name = "N"
    )]
    audit_queue_events: usize,
    /// An audit batch is sent once it holds this many events (or 1 MiB)...
    #[arg(
        long,
        default_value_t = palisade_agent::audit::ReporterConfig::DEFAULT_BATCH_EVENTS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
        value_name = "N"
    )]
    audit_batch_events: usize,
    /// ... or this many milliseconds after its first event, whichever comes first.
    #[arg(
        long,
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..),
        value_name = "MS"
    )]
    audit_batch_ms: u64,
    /// An app health endpoint the kubelet probes through the admin port as
    /// /app-health/NAME: NAME=HOST:PORT/PATH, e.g. ready=127.0.0.1:8080/healthz (repeatable).
    #[arg(long, value_name = "NAME=HOST:PORT/PATH")]
    app_probe: Vec<palisade_agent::admin::app_probe::AppProbe>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UnmatchedArg {
    Passthrough,
    Deny,
}

fn parse_inbound(text: &str) -> Result<ExplicitListener, String> {
    parse_explicit_listener(text, "LISTEN=APP")
}

fn parse_outbound(text: &str) -> Result<ExplicitListener, String> {
    parse_explicit_listener(text, "LISTEN=DEST")
}

/// `LISTEN=TARGET`, two socket addresses; `form` is the flag's form, as errors name it.
fn parse_explicit_listener(text: &str, form: &str) -> Result<ExplicitListener, String> {
    let (listen, target) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not {form}"))?;
    let parse = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("{a:?}: {e}"));
    Ok(ExplicitListener {
        listen: parse(listen)?,
        target: parse(target)?,
    })
}

fn parse_mesh_destination(
    text: &str,
) -> Result<palisade_agent::outbound::DestinationEntry, String> {
    text.parse()
        .map_err(|e: palisade_agent::outbound::DestinationParseError| e.to_string())
}

/// `--label KEY=VALUE`: a non-empty key, `=`, and a value (which may be
/// empty, as in Kubernetes).
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        Some(_) => Err(format!(
            "{text:?} has an empty key; expected KEY=VALUE, e.g. app=orders"
        )),
        None => Err(format!(
            "{text:?} has no '='; expected KEY=VALUE, e.g. app=orders"
        )),
    }
}

/// An IP; empty is none (an unset `POD_IP` that is still defined must not
/// stop the agent).
fn parse_advertise_address(text: &str) -> Result<Option<std::net::IpAddr>, String> {
    match text.trim() {
        "" => Ok(None),
        text => {
            let ip: std::net::IpAddr = text
                .parse()
                .map_err(|_| format!("{text:?} is not an IP address"))?;
            // The operator refuses these, and would refuse the whole stream.
            let broadcast = ip == std::net::IpAddr::from(std::net::Ipv4Addr::BROADCAST);
            if ip.is_unspecified() || ip.is_multicast() || broadcast {
                return Err(format!("{ip} is not an address this pod can be reached at"));
            }
            Ok(Some(ip))
        }
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
    /// Admin endpoint (plain HTTP: /healthz, /readyz, /metrics for every client; other paths
    /// 403 except on loopback), ADDR:PORT; '' disables it.
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
    let admin_addr = parse_admin(&args.admin)?;
    let bundle = TrustBundle::from_pem_file(&args.trust_bundle)?;
    let trust = MeshTrust::new(SharedTrustBundle::new(bundle), &args.trust_domain)?;
    let operator_id = parse_operator_id(args.operator_id.as_deref())?;
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
    Sidecar::start(sidecar_options(args)?)
        .await?
        .run_until_signal()
        .await
}

fn sidecar_options(args: RunArgs) -> anyhow::Result<SidecarOptions> {
    let admin = parse_admin(&args.admin)?;
    let identity = IdentityOrigin::from_flags(
        args.cert,
        args.key,
        args.operator,
        args.token_file,
        args.operator_id.as_deref(),
    )?;
    let audit = match args.collector {
        Some(collector) => {
            let collector_id = args
                .collector_id
                .as_deref()
                .map(SpiffeId::parse)
                .transpose()
                .context("--collector-id is not a workload SPIFFE ID")?;
            if collector_id.is_none() {
                tracing::warn!(
                    "no --collector-id: any workload of the trust domain could receive audit events"
                );
            }
            Some(AuditOptions {
                collector,
                collector_id,
                spool_dir: args.audit_spool_dir,
                spool_max_bytes: args.audit_spool_max_bytes,
                queue_events: args.audit_queue_events,
                batch_events: args.audit_batch_events,
                batch_wait: Duration::from_millis(args.audit_batch_ms),
                instance_id: args.agent_instance_id.clone(),
            })
        }
        None => None,
    };
    // Policy from the operator (DESIGN §5), unless --policy-file pins one.
    // --cert conflicts with --operator: with an operator, it is the identity's.
    let policy = match (args.policy_file, &identity) {
        (Some(path), _) => PolicyOrigin::File(path),
        (None, IdentityOrigin::Operator { operator, .. }) => {
            PolicyOrigin::Discovery(DiscoveryOptions {
                operator: operator.clone(),
                namespace: args.namespace.filter(|n| !n.is_empty()),
                service_account: args.service_account,
                pod_name: args.pod_name,
                labels: args.labels.into_iter().collect(),
                agent_instance_id: args.agent_instance_id,
            })
        }
        (None, IdentityOrigin::Files { .. }) => PolicyOrigin::None,
    };
    Ok(SidecarOptions {
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        identity,
        policy,
        inbound: args.inbound,
        transparent: args.transparent.then_some(TransparentPorts {
            inbound: args.inbound_port,
            outbound: args.outbound_port,
        }),
        outbound: args.outbound,
        mesh_destinations: args.mesh_destination,
        advertise_addresses: args.advertise_address.into_iter().flatten().collect(),
        outbound_unmatched: match args.outbound_unmatched {
            UnmatchedArg::Passthrough => UnmatchedPolicy::Passthrough,
            UnmatchedArg::Deny => UnmatchedPolicy::Deny,
        },
        outbound_detect_timeout: Duration::from_millis(args.outbound_detect_timeout_ms),
        outbound_connect_timeout: Duration::from_millis(args.outbound_connect_timeout_ms),
        admin,
        global_rate_limits: args.ratelimit_redis.map(|url| {
            let mut config = GlobalRateLimiterConfig::new(url);
            config.timeout = Duration::from_millis(args.ratelimit_timeout_ms);
            config
        }),
        opaque_ports: args.opaque_ports,
        detect_timeout: Duration::from_millis(args.detect_timeout_ms),
        upgrade_protocols: args
            .upgrade_protocols
            .iter()
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect(),
        max_requests_in_flight: args.max_requests_in_flight,
        app_protocols: args.app_protocol,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        app_probes: args.app_probe,
        audit,
    })
}

/// `--admin`: ADDR:PORT, or '' for no admin endpoint.
fn parse_admin(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text.trim() {
        "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .with_context(|| format!("--admin {a:?} is not ADDR:PORT")),
    }
}

fn parse_operator_id(text: Option<&str>) -> anyhow::Result<Option<SpiffeId>> {
    text.map(SpiffeId::parse)
        .transpose()
        .context("--operator-id is not a workload SPIFFE ID")
}
