//! `palisade-operator`: the Palisade control plane. This file only parses
//! flags and wires the library together.

mod crdgen;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use palisade_operator::admin::{AdminServer, AdminState};
use palisade_operator::ca::reload::{CurrentCa, ReloadingCa};
use palisade_operator::ca::{self, Ca, CaMaterial, Origin};
use palisade_operator::discovery::{
    DirSource, DiscoveryService, DiscoveryStatus, MeshRegistry, SourceSpec,
};
use palisade_operator::identity::IssuanceCounters;
use palisade_operator::server::{ServeConfig, Server};
use palisade_operator::tokens::TokenValidator;
use palisade_operator::tokens::reload::ReloadingTokenFile;
use palisade_operator::tokens::review::TokenReviewer;
use palisade_policy::identity::SpiffeId;

#[derive(Parser)]
#[command(
    name = "palisade-operator",
    version,
    about = "Palisade control plane: compiles ApiSecurityPolicy resources, issues workload certificates and serves policy to agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the identity service (workload certificates over TLS).
    ///
    /// Local mode: the CA lives in --state-dir (generated on first start)
    /// and tokens come from --tokens. Kubernetes mode (--kubernetes): the CA
    /// lives in a Secret in --namespace and tokens are checked with
    /// TokenReview.
    // Boxed: its flags dwarf the other variants (clippy::large_enum_variant).
    Serve(Box<ServeArgs>),
    /// Manage the certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the ApiSecurityPolicy CustomResourceDefinition as YAML.
    Crdgen,
}

#[derive(Args)]
struct ServeArgs {
    /// Directory holding the CA (`<dir>/ca/`); created with a new CA if absent.
    /// Its CA files are re-read every --ca-poll-interval, so a root rotation
    /// needs no restart; a broken edit is logged and the previous CA stays.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    state_dir: Option<PathBuf>,
    /// Token file: one `TOKEN NAMESPACE SERVICEACCOUNT` per line, `#` comments.
    /// Re-read every --tokens-poll-interval: added tokens are accepted and
    /// removed ones refused without a restart; a broken edit is logged and
    /// the previous tokens stay in force.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    tokens: Option<PathBuf>,
    /// How often the --tokens file is re-read, e.g. 1s, 500ms.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        value_parser = parse_poll_interval,
        conflicts_with = "kubernetes"
    )]
    tokens_poll_interval: Duration,
    /// How often the CA files in --state-dir are re-read, e.g. 5s, 500ms.
    /// Changed files are used once two reads in a row agree.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_poll_interval,
        conflicts_with = "kubernetes"
    )]
    ca_poll_interval: Duration,
    /// Kubernetes mode: CA in a Secret, tokens checked with TokenReview
    /// (audience palisade.dev), using the in-cluster or kubeconfig credentials.
    #[arg(long)]
    kubernetes: bool,
    /// Name of the CA Secret in Kubernetes mode.
    #[arg(long, value_name = "NAME", default_value = ca::secret::DEFAULT_SECRET_NAME)]
    ca_secret: String,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The operator's namespace (its own identity, and the CA Secret's home).
    #[arg(
        long,
        value_name = "NS",
        env = "POD_NAMESPACE",
        default_value = "palisade-system"
    )]
    namespace: String,
    /// Address of the TLS gRPC endpoint.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Admin endpoint (plain HTTP: /healthz, /readyz, /metrics), ADDR:PORT; '' disables it.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15014")]
    admin: String,
    /// Lifetime of issued certificates (and the most an agent may ask for),
    /// e.g. 30s, 15m, 24h.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
    cert_ttl: Duration,
    /// Where ApiSecurityPolicy documents come from: `dir:<path>` reads every
    /// *.yaml / *.yml file there (re-read on change) and serves them to
    /// agents over Discovery.Watch. Without it, Watch is refused.
    #[arg(long, value_name = "dir:PATH")]
    source: Option<SourceSpec>,
    /// How often the --source directory is re-read, e.g. 1s, 500ms.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_poll_interval)]
    source_poll_interval: Duration,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Generate a CA in <dir>/ca/ unless one exists; print each trust-bundle
    /// root's SHA-256 fingerprint, one per line.
    Init {
        /// State directory; the CA goes to <DIR>/ca/.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = palisade_policy::duration::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(ttl)
}

fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    let d = palisade_policy::duration::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(50) {
        return Err("must be at least 50ms".into());
    }
    Ok(d)
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

fn main() -> anyhow::Result<()> {
    // ring is the only provider linked; make it the process default anyway
    // so nothing can pick a different one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => print!("{}", crdgen::crd_yaml()?),
        Command::Ca(CaCommand::Init { state_dir }) => {
            init_tracing();
            ca_init(&state_dir)?;
        }
        Command::Serve(args) => {
            init_tracing();
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(serve(*args))?;
        }
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn generate() -> Result<CaMaterial, ca::CaError> {
    ca::generate::generate_root(SystemTime::now())
}

fn ca_init(state_dir: &Path) -> anyhow::Result<()> {
    let (material, origin) = ca::dir::load_or_create(state_dir, generate)?;
    let ca = Ca::load(&material).context("the CA in the state directory is not usable")?;
    let where_ = ca::dir::ca_dir(state_dir);
    match origin {
        Origin::Created => tracing::info!(dir = %where_.display(), "created a new CA"),
        Origin::Existing => tracing::info!(dir = %where_.display(), "a CA already exists; kept it"),
    }
    for fp in ca.root_fingerprints() {
        println!("{fp}");
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Err(e) = SpiffeId::for_service_account(&args.trust_domain, "ns", "sa") {
        bail!("--trust-domain {:?}: {e}", args.trust_domain);
    }
    // Before anything is created, so a typo leaves nothing behind.
    let admin_addr = parse_admin(&args.admin)?;
    // `ca_files`: the state directory whose CA files are followed (local mode).
    let (material, origin, tokens, bundle_location, ca_files): (
        _,
        _,
        Arc<dyn TokenValidator>,
        String,
        Option<PathBuf>,
    ) = match (&args.state_dir, &args.tokens, args.kubernetes) {
        (Some(state_dir), Some(tokens), false) => {
            // Tokens first: a mistyped path should not leave a new CA behind.
            let tokens = Arc::new(ReloadingTokenFile::load(tokens)?);
            let (material, origin) = ca::dir::load_or_create(state_dir, generate)?;
            tracing::info!(
                tokens = tokens.current().len(),
                poll_interval = ?args.tokens_poll_interval,
                "loaded the token file"
            );
            // Rotation and revocation without a restart.
            tokio::spawn(tokens.clone().run(args.tokens_poll_interval));
            // Absolute, so scripts can use it from anywhere.
            let state_dir = std::fs::canonicalize(state_dir).unwrap_or(state_dir.clone());
            let bundle = ca::dir::trust_bundle_path(&state_dir).display().to_string();
            (material, origin, tokens, bundle, Some(state_dir))
        }
        (None, None, true) => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let (material, origin) = ca::secret::load_or_create(
                client.clone(),
                &args.namespace,
                &args.ca_secret,
                generate,
            )
            .await?;
            let reviewer = TokenReviewer::new(client, palisade_operator::TOKEN_AUDIENCE);
            let bundle = format!(
                "secret/{}/{} key {}",
                args.namespace,
                args.ca_secret,
                ca::material::TRUST_BUNDLE_FILE
            );
            (material, origin, Arc::new(reviewer), bundle, None)
        }
        _ => bail!("use either --state-dir and --tokens, or --kubernetes"),
    };
    let ca = Arc::new(Ca::load(&material).context("loading the CA")?);
    tracing::info!(
        created = origin == Origin::Created,
        roots = ?ca.root_fingerprints(),
        intermediates = ca.intermediates().len(),
        "CA ready"
    );
    let ca = CurrentCa::new(ca);
    if let Some(state_dir) = &ca_files {
        // Root rotation without a restart (docs/operations.md).
        let reloading = Arc::new(ReloadingCa::new(state_dir, &material, ca.clone()));
        tracing::info!(
            dir = %ca::dir::ca_dir(state_dir).display(),
            poll_interval = ?args.ca_poll_interval,
            "following the CA files"
        );
        tokio::spawn(reloading.run(args.ca_poll_interval));
    }
    let config = ServeConfig {
        listen: args.listen,
        trust_domain: args.trust_domain,
        namespace: args.namespace,
        cert_ttl: args.cert_ttl,
    };
    let counters = Arc::new(IssuanceCounters::default());
    let mut server = Server::bind(&config, ca, tokens, counters.clone()).await?;
    let mut admin_state = AdminState::new(counters.clone());
    if let Some(SourceSpec::Dir(dir)) = &args.source {
        let (source, policies) = DirSource::open(dir)?;
        tracing::info!(
            dir = %dir.display(),
            policies = source.current().policies.len(),
            poll_interval = ?args.source_poll_interval,
            "policy source ready"
        );
        tokio::spawn(source.run(args.source_poll_interval));
        let mesh = palisade_policy::compile::MeshConfig {
            trust_domain: config.trust_domain.clone(),
            ..Default::default()
        };
        // Created here so the admin port reports on the very instances
        // the Watch sessions update.
        let status = Arc::new(DiscoveryStatus::new());
        let registry = Arc::new(MeshRegistry::new());
        admin_state = admin_state.with_discovery(status.clone(), registry.clone());
        server = server.with_discovery(
            DiscoveryService::new(mesh, Some(policies), status).with_registry(registry),
        );
    } else {
        tracing::info!(
            "no --source: Discovery.Watch is refused until a policy source is configured"
        );
    }
    let admin_state = Arc::new(admin_state);
    // Bound after the gRPC listener, so /readyz can be 200 from the start.
    let admin = match admin_addr {
        Some(addr) => {
            let admin = AdminServer::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
            let bound = admin.local_addr();
            tracing::info!(addr = %bound, "admin endpoint listening (/healthz, /readyz, /metrics)");
            tokio::spawn(admin.serve(admin_state.clone()));
            Some(bound)
        }
        None => None,
    };
    {
        // Scripts and tests wait for these lines; "listening on" comes
        // last, when everything else is announced.
        let mut out = std::io::stdout().lock();
        writeln!(out, "palisade-operator trust bundle {bundle_location}")?;
        if let Some(addr) = admin {
            writeln!(out, "palisade-operator admin listening on {addr}")?;
        }
        writeln!(
            out,
            "palisade-operator listening on {}",
            server.local_addr()
        )?;
        out.flush()?;
    }
    let draining = admin_state.clone();
    server
        .run(async move {
            shutdown_signal().await;
            // Streams may take a while to close; stop advertising readiness now.
            draining.start_draining();
        })
        .await?;
    let totals = counters.snapshot();
    tracing::info!(
        issued = totals.issued,
        refused = totals.refused(),
        "stopped"
    );
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
