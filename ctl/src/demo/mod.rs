//! `palisadectl demo`: a whole mesh on loopback, then scripted traffic that
//! shows each capability, one line per scenario with ✓ or ✗. Exits 0 only
//! when every expectation held.
//!
//! The services are built in (crate::apps, served in this process); the
//! operator, collector and agents are the real binaries. The policies are
//! `examples/demo/policies/`, compiled into palisadectl; `--policies DIR`
//! (hidden, for tests) takes them from elsewhere.

mod client;
mod jwt;
mod scenarios;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::apps;
use crate::mesh::bins::BinDir;
use crate::mesh::{Inbound, Mesh, MeshConfig, Protocol, Workload};
use crate::output::{OutputFormat, outln};
use crate::progress::Progress;

const POLICIES: [(&str, &str); 4] = [
    (
        "orders.yaml",
        include_str!("../../../examples/demo/policies/orders.yaml"),
    ),
    (
        "payments.yaml",
        include_str!("../../../examples/demo/policies/payments.yaml"),
    ),
    (
        "partner-api.yaml",
        include_str!("../../../examples/demo/policies/partner-api.yaml"),
    ),
    (
        "inventory.yaml",
        include_str!("../../../examples/demo/policies/inventory.yaml"),
    ),
];

/// Denials from one source in one minute that raise the demo's alert.
pub const ALERT_THRESHOLD: u32 = 10;

#[derive(Args)]
pub struct DemoArgs {
    /// table: a line per scenario as it completes; json: one document (every scenario, its
    /// verdict and detail) at the end.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: OutputFormat,
    /// Where palisade-agent, palisade-operator and palisade-collector are; default: next to
    /// palisadectl.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Keep the demo's state (CA, logs, audit database) in DIR instead of a temporary
    /// directory removed at the end.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Testing: take the policy files from DIR instead of the built-in ones
    /// (`@JWKS@` is replaced there too).
    #[arg(long, hide = true, env = "PALISADE_DEMO_POLICIES", value_name = "DIR")]
    policies: Option<PathBuf>,
}

/// The in-process apps and what the mesh needs to know about them.
pub struct Apps {
    pub orders: apps::http::HttpApp,
    pub payments: apps::http::HttpApp,
    pub partner: apps::http::HttpApp,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    addrs: BTreeMap<&'static str, SocketAddr>,
}

impl Drop for Apps {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start_apps() -> anyhow::Result<Apps> {
    let mut tasks = Vec::new();
    let mut addrs = BTreeMap::new();
    let mut http_apps = Vec::new();
    for name in ["orders", "payments", "partner-api"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.insert(name, listener.local_addr()?);
        let app = apps::http::HttpApp {
            name: name.to_owned(),
            ..Default::default()
        };
        http_apps.push(app.clone());
        tasks.push(tokio::spawn(apps::http::serve(listener, app)));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    addrs.insert("inventory", listener.local_addr()?);
    tasks.push(tokio::spawn(apps::grpc::serve(listener)));
    let mut it = http_apps.into_iter();
    let (Some(orders), Some(payments), Some(partner)) = (it.next(), it.next(), it.next()) else {
        anyhow::bail!("internal: three HTTP apps expected");
    };
    Ok(Apps {
        orders,
        payments,
        partner,
        tasks,
        addrs,
    })
}

fn workloads(apps: &Apps) -> anyhow::Result<Vec<Workload>> {
    let free = || -> anyhow::Result<SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?)
    };
    let served = |name: &str, ns: &str, protocol| -> anyhow::Result<Workload> {
        Ok(Workload {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            service_account: name.to_owned(),
            labels: vec![("app".to_owned(), name.to_owned())],
            inbound: Some(Inbound {
                listen: free()?,
                app: *apps
                    .addrs
                    .get(name)
                    .with_context(|| format!("no app {name}"))?,
                protocol,
            }),
            calls: Vec::new(),
        })
    };
    Ok(vec![
        served("orders", "shop", Protocol::Http)?,
        served("payments", "shop", Protocol::Http)?,
        served("partner-api", "partners", Protocol::Http)?,
        served("inventory", "shop", Protocol::Grpc)?,
        Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            labels: vec![("app".into(), "web".into())],
            inbound: None,
            calls: vec![
                "orders".into(),
                "payments".into(),
                "partner-api".into(),
                "inventory".into(),
            ],
        },
    ])
}

/// Writes the policies into `dir`, the JWKS filled in.
fn write_policies(source: Option<&Path>, jwks: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let files: Vec<(String, String)> = match source {
        None => POLICIES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect(),
        Some(src) => {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(src)
                .with_context(|| format!("cannot read --policies {}", src.display()))?
            {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    files.push((name, text));
                }
            }
            files
        }
    };
    for (name, text) in files {
        std::fs::write(dir.join(&name), text.replace("@JWKS@", jwks))
            .with_context(|| format!("cannot write {name}"))?;
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let json = args.output == OutputFormat::Json;
    let progress = Progress::new(json);
    let bins = BinDir::locate(args.bin_dir.as_deref())?;
    bins.ensure(args.bin_dir.is_some(), |m| progress.say(m))?;
    let temp;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("palisade-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_owned()
        }
    };
    let issuer = jwt::Issuer::new()?;
    let policies = state_dir.join("policies");
    write_policies(args.policies.as_deref(), &issuer.jwks, &policies)?;
    let apps = start_apps().await?;
    let config = MeshConfig {
        bins,
        state_dir: state_dir.clone(),
        policies,
        trust_domain: "cluster.local".into(),
        alert_rules: Some(
            serde_json::json!({"rules": [{
                "name": "deny-burst", "kind": "deny_rate", "key": "source",
                "threshold": ALERT_THRESHOLD, "window_secs": 60
            }]})
            .to_string(),
        ),
        workloads: workloads(&apps)?,
    };
    let mut mesh = Mesh::start(config, progress).await?;
    let ctx = scenarios::Context {
        mesh: &mesh,
        apps: &apps,
        issuer: Arc::new(issuer),
    };
    let outcome = tokio::select! {
        results = scenarios::run_all(&ctx, progress) => Ok(results),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(ctx);
    let stop = progress.step("stopping the mesh");
    mesh.stop().await;
    stop.done("mesh stopped, no process left");
    let results = outcome?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.name.as_str())
        .collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "passed": failed.is_empty(),
                "scenarios": results,
            }))?
        )?;
    } else if failed.is_empty() {
        outln!(
            "demo passed: {} of {} scenarios as expected",
            results.len(),
            results.len()
        )?;
    } else {
        outln!(
            "demo FAILED: {} of {} scenarios not as expected: {}",
            failed.len(),
            results.len(),
            failed.join("; ")
        )?;
        if args.state_dir.is_none() {
            outln!("(rerun with --state-dir DIR to keep the logs of every process)")?;
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
