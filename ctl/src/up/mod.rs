//! `palisadectl up DIR`: the mesh `DIR/mesh.yaml` describes, on this
//! machine, until Ctrl-C. Operator (policies from `DIR/policies`, re-read
//! on every edit), collector, one agent per service, then the apps behind
//! them; a status table; then a line for every policy version an agent
//! takes on. Ctrl-C (or SIGTERM) stops apps, agents, collector and
//! operator in that order, and waits for each.

mod meshfile;
mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::mesh::bins::BinDir;
use crate::mesh::process::Child;
use crate::mesh::{Inbound, Mesh, MeshConfig, Workload};
use crate::output::{OutputFormat, outln};
use crate::progress::Progress;
use meshfile::{MeshFile, expand};

#[derive(Args)]
pub struct UpArgs {
    /// A directory holding mesh.yaml and the policies it names (e.g. examples/quickstart).
    dir: PathBuf,
    /// Table for a person; json prints one line of JSON (addresses, identities, pids) once
    /// everything is ready.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: OutputFormat,
    /// Where palisade-agent, palisade-operator and palisade-collector are; default: next to
    /// palisadectl.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// CA, tokens, logs and the audit database; default: DIR/.palisade.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Ignore the port numbers of mesh.yaml and take free ones (for tests and CI, where fixed
    /// ports may be taken).
    #[arg(long)]
    free_ports: bool,
}

struct App {
    name: String,
    child: Child,
}

pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(up(args))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn loopback(port: u16, free: bool) -> anyhow::Result<SocketAddr> {
    let port = if port == 0 || free {
        free_port()?
    } else {
        port
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn workloads(file: &MeshFile, free: bool) -> anyhow::Result<Vec<Workload>> {
    file.services
        .iter()
        .map(|s| {
            let inbound = match s.ports.first() {
                Some(p) => Some(Inbound {
                    listen: loopback(p.port, free)?,
                    app: loopback(p.app, free)?,
                    protocol: p.protocol,
                }),
                None => None,
            };
            Ok(Workload {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone().unwrap_or_else(|| s.name.clone()),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                inbound,
                calls: s.calls.clone(),
            })
        })
        .collect()
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let json = args.output == OutputFormat::Json;
    let progress = Progress::new(json);
    let file = MeshFile::load(&args.dir)?;
    let policies = args.dir.join(&file.policies);
    if !policies.is_dir() {
        bail!(
            "{} is not a directory: mesh.yaml's `policies` names the directory of ApiSecurityPolicy files",
            policies.display()
        );
    }
    let bins = BinDir::locate(args.bin_dir.as_deref())?;
    bins.ensure(args.bin_dir.is_some(), |m| progress.say(m))?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| args.dir.join(".palisade"));
    let config = MeshConfig {
        bins: bins.clone(),
        state_dir: absolute(&state_dir)?,
        policies: absolute(&policies)?,
        trust_domain: file.trust_domain.clone(),
        alert_rules: None,
        workloads: workloads(&file, args.free_ports)?,
    };
    let mut mesh = Mesh::start(config, progress).await?;
    let mut apps = Vec::new();
    let started = start_apps(&file, &mesh, &bins, &mut apps, progress).await;
    if let Err(e) = started {
        stop(&mut mesh, &mut apps, progress).await;
        return Err(e);
    }
    let rows = status::collect(&mesh).await;
    if json {
        outln!("{}", status::json(&mesh, &rows, &apps_json(&apps)))?;
    } else {
        status::print_table(&mesh, &rows)?;
        progress.say(&format!(
            "logs in {}; audit: palisadectl audit query {}",
            mesh.logs.display(),
            mesh.audit_flags()
        ));
        progress.say(
            "edit a policy in the policies directory and watch it apply; Ctrl-C stops everything",
        );
    }
    let outcome = watch(&mut mesh, &mut apps, rows, json).await;
    stop(&mut mesh, &mut apps, progress).await;
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path).ok();
    std::path::absolute(path).with_context(|| format!("{}", path.display()))
}

fn apps_json(apps: &[App]) -> Vec<(String, u32)> {
    apps.iter()
        .map(|a| (a.name.clone(), a.child.pid()))
        .collect()
}

/// Starts each service's app once its agent is ready, and waits until it
/// accepts connections.
async fn start_apps(
    file: &MeshFile,
    mesh: &Mesh,
    bins: &BinDir,
    apps: &mut Vec<App>,
    progress: Progress,
) -> anyhow::Result<()> {
    let with_apps = file.services.iter().filter(|s| !s.run.is_empty()).count();
    if with_apps == 0 {
        return Ok(());
    }
    let step = progress.step(format!("starting {with_apps} apps"));
    for s in file.services.iter().filter(|s| !s.run.is_empty()) {
        let agent = mesh
            .agent(&s.name)
            .with_context(|| format!("no agent for {}", s.name))?;
        let app = agent.workload.inbound.as_ref().map(|i| i.app);
        let argv: Vec<String> = s
            .run
            .iter()
            .map(|a| expand(a, app, &agent.outbound))
            .collect();
        let Some((program, rest)) = argv.split_first() else {
            continue;
        };
        let sibling = bins.path(program);
        let program = if !program.contains('/') && sibling.is_file() {
            sibling
        } else {
            PathBuf::from(program)
        };
        let child = Child::spawn(
            &format!("app {}", s.name),
            &program,
            rest,
            &[],
            &mesh.logs.join(format!("app-{}.log", s.name)),
        )
        .await
        .with_context(|| format!("service {}: run {:?}", s.name, s.run))?;
        apps.push(App {
            name: s.name.clone(),
            child,
        });
        if let Some(app) = app {
            let Some(last) = apps.last_mut() else {
                continue;
            };
            if let Err(e) = wait_listening(&mut last.child, app).await {
                step.failed(format!("app {}", s.name));
                return Err(e);
            }
        }
    }
    step.done(format!("{with_apps} apps listening"));
    Ok(())
}

async fn wait_listening(child: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) before listening on {addr}:\n{}\n(log: {})",
                child.name(),
                child.tail(10),
                child.log().display()
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} does not listen on {addr} after 30 s (its command must listen on {{app}}; log: {})",
                child.name(),
                child.log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until Ctrl-C or SIGTERM: reports policy versions as agents take them on,
/// and fails if any process exits by itself.
async fn watch(
    mesh: &mut Mesh,
    apps: &mut [App],
    mut rows: Vec<status::Row>,
    json: bool,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Some((name, status, tail)) = mesh.exited() {
            bail!("{name} exited ({status}); its last output:\n{tail}");
        }
        for a in apps.iter_mut() {
            if let Some(status) = a.child.exited() {
                bail!(
                    "the app of {} exited ({status}); its last output:\n{}",
                    a.name,
                    a.child.tail(10)
                );
            }
        }
        let now = status::collect(mesh).await;
        for (old, new) in rows.iter().zip(&now) {
            if old.status.policy_version != new.status.policy_version
                && !new.status.policy_version.is_empty()
            {
                let line = format!(
                    "{}: policy {} → {}",
                    new.service,
                    short(&old.status.policy_version),
                    short(&new.status.policy_version)
                );
                if json {
                    outln!(
                        "{}",
                        serde_json::json!({"event": "policy", "service": new.service,
                            "from": old.status.policy_version, "to": new.status.policy_version})
                    )?;
                } else {
                    outln!("{line}")?;
                }
            }
        }
        rows = now;
    }
}

pub fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

async fn stop(mesh: &mut Mesh, apps: &mut [App], progress: Progress) {
    let step = progress.step("stopping");
    let n = apps.len() + mesh.pids().len();
    for a in apps.iter_mut() {
        a.child.stop(Duration::from_secs(5)).await;
    }
    mesh.stop().await;
    step.done(format!("stopped {n} processes"));
}
