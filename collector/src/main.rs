//! `palisade-collector`: the audit collector. `main` only wires flags to
//! [`palisade_collector::serve`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use palisade_agent::sidecar::IdentityOrigin;
use palisade_collector::alerts::{AlertEngine, AlertRules, WebhookConfig, WebhookNotifier};
use palisade_collector::api::QueryAccess;
use palisade_collector::observers::Observers;
use palisade_collector::otlp::OtlpLogExporter;
use palisade_collector::serve::{Collector, ServeConfig};
use palisade_collector::store::Retention;

#[derive(Parser)]
#[command(
    name = "palisade-collector",
    version,
    about = "Palisade audit collector: receives audit events from agents over mTLS, stores and serves them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive Audit.Report streams (mTLS), store them, serve the query API.
    Serve(Box<ServeArgs>),
    /// Print the gRPC services this collector implements.
    Services,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Audit.Report listener (mTLS; agents need a mesh certificate).
    #[arg(long, default_value = "0.0.0.0:15030")]
    listen: SocketAddr,
    /// Query API listener (HTTPS, JSON); '' disables it.
    #[arg(long, default_value = "0.0.0.0:15031")]
    query_listen: String,
    /// Admin endpoint (plain HTTP): /healthz, /readyz, /metrics; '' disables it.
    #[arg(long, default_value = "0.0.0.0:15032")]
    admin: String,
    /// Where events are stored: a SQLite file path (or sqlite:PATH), or
    /// postgres://USER@HOST/DB for several collector replicas.
    #[arg(
        long,
        env = "PALISADE_COLLECTOR_STORE",
        default_value = "palisade-audit.db"
    )]
    store: String,
    /// PEM trust anchors agents' certificates must chain to.
    #[arg(long, env = "PALISADE_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The collector's own mesh certificate (PEM chain, SPIFFE ID SAN), instead of --operator.
    #[arg(long, requires = "key", conflicts_with = "operator")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Operator identity service, HOST:PORT: the collector's certificate is issued and renewed there.
    #[arg(long, env = "PALISADE_OPERATOR", required_unless_present = "cert")]
    operator: Option<String>,
    /// Proof of identity for the operator.
    #[arg(long, env = "PALISADE_TOKEN_FILE", requires = "operator")]
    token_file: Option<PathBuf>,
    /// SPIFFE ID the operator's certificate must carry.
    #[arg(long)]
    operator_id: Option<String>,
    /// Query API: a SPIFFE ID pattern allowed to read (repeatable), e.g.
    /// spiffe://cluster.local/ns/ops/sa/*.
    #[arg(long = "query-allow", value_name = "PATTERN")]
    query_allow: Vec<String>,
    /// Query API: a file holding a bearer token that may read (re-read on every request).
    #[arg(long, env = "PALISADE_QUERY_TOKEN_FILE")]
    query_token_file: Option<PathBuf>,
    /// Remove records older than this many hours (0: keep).
    #[arg(long, default_value_t = 0, value_name = "HOURS")]
    retention_hours: u64,
    /// Remove the oldest records while the store is larger than this many MiB (0: no limit).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    retention_max_mib: u64,
    /// Alert rules, a JSON file (docs/audit.md#alerts).
    #[arg(long, value_name = "FILE")]
    alert_rules: Option<PathBuf>,
    /// POST each alert as JSON to this http:// URL (3 attempts with backoff).
    #[arg(long, value_name = "URL", requires = "alert_rules")]
    alert_webhook: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Services => {
            println!(
                "{}/Report (port 15030, mTLS)",
                palisade_proto::audit::v1::audit_server::SERVICE_NAME
            );
            Ok(())
        }
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            tokio::runtime::Runtime::new()?.block_on(async {
                // The webhook and OTLP tasks need the runtime.
                let config = serve_config(*args)?;
                let collector = Collector::start(config).await?;
                tokio::select! {
                    result = collector.run() => result.map_err(anyhow::Error::from),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                    () = sigterm() => Ok(()),
                }
            })
        }
    }
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn serve_config(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let identity = IdentityOrigin::from_flags(
        args.cert,
        args.key,
        args.operator,
        args.token_file,
        args.operator_id.as_deref(),
    )?;
    for pattern in &args.query_allow {
        palisade_policy::identity::check_principal_pattern(pattern)
            .with_context(|| format!("--query-allow {pattern:?}"))?;
    }
    let mut observers = Observers::default();
    if let Some(path) = &args.alert_rules {
        let rules = AlertRules::from_file(path)
            .with_context(|| format!("--alert-rules {}", path.display()))?;
        observers = observers.with_alerts(AlertEngine::new(rules));
    }
    if let Some(url) = &args.alert_webhook {
        let webhook = WebhookNotifier::new(url, WebhookConfig::default())
            .with_context(|| format!("--alert-webhook {url:?}"))?;
        observers = observers.with_webhook(webhook);
    }
    if let Some(otlp) = OtlpLogExporter::from_env().context("OTEL_EXPORTER_OTLP_ENDPOINT")? {
        observers = observers.with_otlp(otlp);
    }
    let hours = Duration::from_secs(args.retention_hours.saturating_mul(3600));
    Ok(ServeConfig {
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        identity,
        store: args.store,
        listen: args.listen,
        query_listen: optional_addr("--query-listen", &args.query_listen)?,
        admin: optional_addr("--admin", &args.admin)?,
        access: QueryAccess {
            allowed: args.query_allow,
            token_file: args.query_token_file,
        },
        retention: Retention {
            max_age_us: (args.retention_hours > 0)
                .then(|| i64::try_from(hours.as_micros()).unwrap_or(i64::MAX)),
            max_bytes: (args.retention_max_mib > 0)
                .then(|| args.retention_max_mib.saturating_mul(1024 * 1024)),
        },
        observers,
    })
}

fn optional_addr(flag: &str, text: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text.trim() {
        "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .with_context(|| format!("{flag} {a:?} is not ADDR:PORT")),
    }
}
