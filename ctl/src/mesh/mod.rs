//! A local mesh on loopback (DESIGN §9), shared by `up` and `demo`: the
//! operator with a directory policy source, the collector on SQLite, and
//! one agent per workload in explicit mode, each with an identity the
//! operator issues for a token written here.
//!
//! Start order: operator (CA, identity, discovery) → collector (its own
//! certificate from the operator) → agents (all at once; each waits for a
//! certificate and its first policy, `/readyz`). Stop order is the
//! reverse. Every process is a [`process::Child`]: killed if palisadectl
//! dies or fails half-way.

pub mod admin;
pub mod bins;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rand::Rng as _;

use crate::progress::Progress;
use bins::BinDir;
use process::{Child, log_field};

const STARTUP: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How the agent treats the app's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2, as the client speaks.
    Http,
    /// An app that speaks HTTP/1.1 only (`--app-protocol PORT=http1`).
    Http1,
    /// gRPC: HTTP/2 to the app.
    Grpc,
    /// Opaque TCP: mTLS and identity-level rules only (`--opaque-ports`).
    Tcp,
}

/// Where a workload's agent takes mTLS and where its app listens.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub app: SocketAddr,
    pub protocol: Protocol,
}

/// One meshed workload: its identity, labels, and its agent's listeners.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub inbound: Option<Inbound>,
    /// Workloads (by name) this one calls: each gets an outbound listener.
    pub calls: Vec<String>,
}

pub struct MeshConfig {
    pub bins: BinDir,
    pub state_dir: PathBuf,
    pub policies: PathBuf,
    pub trust_domain: String,
    /// The collector's alert rules (JSON), if any.
    pub alert_rules: Option<String>,
    pub workloads: Vec<Workload>,
}

pub struct Operator {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

pub struct Collector {
    child: Child,
    pub ingest: SocketAddr,
    pub query: SocketAddr,
    pub admin: SocketAddr,
    pub id: String,
}

pub struct Agent {
    child: Child,
    pub workload: Workload,
    pub spiffe_id: String,
    pub admin: SocketAddr,
    /// Where it takes mTLS for its workload.
    pub inbound: Option<SocketAddr>,
    /// (callee name, the plaintext listener the app calls it through).
    pub outbound: Vec<(String, SocketAddr)>,
}

pub struct Mesh {
    pub operator: Operator,
    pub collector: Collector,
    pub agents: Vec<Agent>,
    pub bundle: PathBuf,
    pub query_token: PathBuf,
    pub trust_domain: String,
    pub logs: PathBuf,
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, sa: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
}

impl Mesh {
    /// Starts everything and waits until every agent is ready. On failure
    /// whatever was started is stopped again before the error returns.
    pub async fn start(config: MeshConfig, progress: Progress) -> anyhow::Result<Self> {
        check_workloads(&config.workloads)?;
        let state = &config.state_dir;
        let logs = state.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let secrets = state.join("tokens");
        std::fs::create_dir_all(&secrets)?;
        let td = &config.trust_domain;

        // One token per identity: the collector's and each workload's.
        let mut token_lines = String::from("# token namespace serviceaccount (palisadectl)\n");
        let collector_token = random_token();
        token_lines.push_str(&format!(
            "{collector_token} palisade-system palisade-collector\n"
        ));
        write_secret(&secrets.join("palisade-collector"), &collector_token)?;
        for w in &config.workloads {
            let token = random_token();
            token_lines.push_str(&format!("{token} {} {}\n", w.namespace, w.service_account));
            write_secret(&secrets.join(&w.name), &token)?;
        }
        let token_file = state.join("tokens.txt");
        write_secret(&token_file, &token_lines)?;
        let query_token = state.join("query-token");
        write_secret(&query_token, &random_token())?;

        // --- operator
        let step = progress.step("starting the operator");
        let operator = start_operator(&config, &token_file, &logs).await;
        let (operator, bundle) = match operator {
            Ok(o) => o,
            Err(e) => {
                step.failed("operator");
                return Err(e);
            }
        };
        step.done(format!(
            "operator: identity and policies on {} (CA and state in {})",
            operator.addr,
            state.display()
        ));
        let operator_id = spiffe_id(td, "palisade-system", "palisade-operator");

        // --- collector
        let step = progress.step("starting the collector");
        let collector = match start_collector(
            &config,
            &operator,
            &operator_id,
            &bundle,
            &secrets.join("palisade-collector"),
            &query_token,
            &logs,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                step.failed("collector");
                let mut op = operator;
                op.child.stop(STOP_GRACE).await;
                return Err(e);
            }
        };
        step.done(format!(
            "collector: audit ingest on {}, query API on {} (SQLite {})",
            collector.ingest,
            collector.query,
            state.join("audit.db").display()
        ));

        // --- agents
        let step = progress.step(format!(
            "starting {} agents (certificates, first policies)",
            config.workloads.len()
        ));
        let mut agents = Vec::new();
        let mut failure = None;
        for w in &config.workloads {
            match spawn_agent(
                &config,
                w,
                &operator,
                &operator_id,
                &bundle,
                &secrets.join(&w.name),
                &collector,
                &logs,
            )
            .await
            {
                Ok(a) => agents.push(a),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for a in &mut agents {
                if let Err(e) = finish_agent_start(&config, a).await {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut mesh = Self {
            operator,
            collector,
            agents,
            bundle,
            query_token,
            trust_domain: td.clone(),
            logs,
        };
        if let Some(e) = failure {
            step.failed("agents");
            mesh.stop().await;
            return Err(e);
        }
        step.done(format!("{} agents ready", mesh.agents.len()));
        Ok(mesh)
    }

    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.workload.name == name)
    }

    /// Every process id (operator, collector, agents).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.operator.child.pid(), self.collector.child.pid()];
        pids.extend(self.agents.iter().map(|a| a.child.pid()));
        pids
    }

    /// A process that exited on its own, if any: (name, status, last output).
    pub fn exited(&mut self) -> Option<(String, String, String)> {
        let children = std::iter::once(&mut self.operator.child)
            .chain(std::iter::once(&mut self.collector.child))
            .chain(self.agents.iter_mut().map(|a| &mut a.child));
        for c in children {
            if let Some(status) = c.exited() {
                return Some((c.name().to_owned(), status.to_string(), c.tail(10)));
            }
        }
        None
    }

    /// Agents first (they flush their audit events to the collector), then
    /// the collector, then the operator; each gets SIGTERM and, after a
    /// grace period, SIGKILL.
    pub async fn stop(&mut self) {
        for a in &mut self.agents {
            a.child.stop(STOP_GRACE).await;
        }
        self.collector.child.stop(STOP_GRACE).await;
        self.operator.child.stop(STOP_GRACE).await;
    }

    /// `palisadectl audit` flags reaching this mesh's collector.
    pub fn audit_flags(&self) -> String {
        format!(
            "--collector {} --trust-bundle {} --collector-id {} --token-file {}",
            self.collector.query,
            self.bundle.display(),
            self.collector.id,
            self.query_token.display()
        )
    }
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn check_workloads(workloads: &[Workload]) -> anyhow::Result<()> {
    for (i, w) in workloads.iter().enumerate() {
        if workloads[..i].iter().any(|o| o.name == w.name) {
            bail!("two services are named {:?}", w.name);
        }
        if w.inbound.is_none() && w.calls.is_empty() {
            bail!(
                "service {:?} has neither a port nor calls: its agent would have nothing to do",
                w.name
            );
        }
        for callee in &w.calls {
            let Some(target) = workloads.iter().find(|o| &o.name == callee) else {
                bail!(
                    "service {:?} calls {callee:?}, which is not a service of the mesh",
                    w.name
                );
            };
            if target.inbound.is_none() {
                bail!(
                    "service {:?} calls {callee:?}, which has no port to be called on",
                    w.name
                );
            }
        }
    }
    Ok(())
}

async fn start_operator(
    config: &MeshConfig,
    tokens: &Path,
    logs: &Path,
) -> anyhow::Result<(Operator, PathBuf)> {
    let args: Vec<String> = vec![
        "serve".into(),
        "--state-dir".into(),
        config.state_dir.join("operator").display().to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--trust-domain".into(),
        config.trust_domain.clone(),
        "--source".into(),
        format!("dir:{}", config.policies.display()),
        "--source-poll-interval".into(),
        "200ms".into(),
    ];
    let mut child = Child::spawn(
        "palisade-operator",
        &config.bins.path(bins::OPERATOR),
        &args,
        &[("RUST_LOG", "info"), ("POD_NAMESPACE", "palisade-system")],
        &logs.join("operator.log"),
    )
    .await?;
    const LISTENING: &str = "palisade-operator listening on ";
    const BUNDLE: &str = "palisade-operator trust bundle ";
    const ADMIN: &str = "palisade-operator admin listening on ";
    let line = child
        .wait_for_line(STARTUP, |l| l.starts_with(LISTENING))
        .await?;
    let addr: SocketAddr = line[LISTENING.len()..]
        .trim()
        .parse()
        .with_context(|| format!("the operator printed {line:?}"))?;
    let bundle_line = child
        .wait_for_line(Duration::from_secs(1), |l| l.starts_with(BUNDLE))
        .await?;
    let bundle = PathBuf::from(bundle_line[BUNDLE.len()..].trim());
    let admin = child
        .wait_for_line(Duration::from_secs(1), |l| l.starts_with(ADMIN))
        .await
        .ok()
        .and_then(|l| l[ADMIN.len()..].trim().parse().ok());
    Ok((Operator { child, addr, admin }, bundle))
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// `<command>` and the flags by which a collector or an agent gets its
/// identity from the local operator.
fn identity_args(
    command: &str,
    config: &MeshConfig,
    bundle: &Path,
    operator: &Operator,
    operator_id: &str,
    token: &Path,
) -> Vec<String> {
    vec![
        command.into(),
        "--trust-bundle".into(),
        bundle.display().to_string(),
        "--trust-domain".into(),
        config.trust_domain.clone(),
        "--operator".into(),
        operator.addr.to_string(),
        "--operator-id".into(),
        operator_id.into(),
        "--token-file".into(),
        token.display().to_string(),
    ]
}

#[allow(clippy::too_many_arguments)]
async fn start_collector(
    config: &MeshConfig,
    operator: &Operator,
    operator_id: &str,
    bundle: &Path,
    token: &Path,
    query_token: &Path,
    logs: &Path,
) -> anyhow::Result<Collector> {
    let admin = free_port()?;
    let mut args = identity_args("serve", config, bundle, operator, operator_id, token);
    args.extend([
        "--store".into(),
        config.state_dir.join("audit.db").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--query-listen".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        admin.to_string(),
        "--query-token-file".into(),
        query_token.display().to_string(),
    ]);
    if let Some(rules) = &config.alert_rules {
        let path = config.state_dir.join("alert-rules.json");
        std::fs::write(&path, rules).with_context(|| format!("cannot write {}", path.display()))?;
        args.push("--alert-rules".into());
        args.push(path.display().to_string());
    }
    let mut child = Child::spawn(
        "palisade-collector",
        &config.bins.path(bins::COLLECTOR),
        &args,
        &[("RUST_LOG", "info")],
        &logs.join("collector.log"),
    )
    .await?;
    let parse = |line: &str| -> anyhow::Result<SocketAddr> {
        log_field(line, "listen")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no listen= address in the collector's line {line:?}"))
    };
    let ingest = parse(
        &child
            .wait_for_line(STARTUP, |l| l.contains("audit ingest listening"))
            .await?,
    )?;
    let query = parse(
        &child
            .wait_for_line(STARTUP, |l| l.contains("query API listening"))
            .await?,
    )?;
    Ok(Collector {
        child,
        ingest,
        query,
        admin,
        id: spiffe_id(
            &config.trust_domain,
            "palisade-system",
            "palisade-collector",
        ),
    })
}

#[allow(clippy::too_many_arguments)]
async fn spawn_agent(
    config: &MeshConfig,
    w: &Workload,
    operator: &Operator,
    operator_id: &str,
    bundle: &Path,
    token: &Path,
    collector: &Collector,
    logs: &Path,
) -> anyhow::Result<Agent> {
    let mut args = identity_args("run", config, bundle, operator, operator_id, token);
    args.extend([
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--pod-name".into(),
        w.name.clone(),
        "--agent-instance-id".into(),
        format!("{}-local", w.name),
        "--collector".into(),
        collector.ingest.to_string(),
        "--collector-id".into(),
        collector.id.clone(),
        "--audit-batch-ms".into(),
        "100".into(),
        "--drain-timeout".into(),
        "2".into(),
    ]);
    for (k, v) in &w.labels {
        args.push("--label".into());
        args.push(format!("{k}={v}"));
    }
    if let Some(inbound) = &w.inbound {
        args.push("--inbound".into());
        args.push(format!("{}={}", inbound.listen, inbound.app));
        match inbound.protocol {
            Protocol::Http | Protocol::Grpc => {}
            Protocol::Http1 => {
                args.push("--app-protocol".into());
                args.push(format!("{}=http1", inbound.app.port()));
            }
            Protocol::Tcp => {
                args.push("--opaque-ports".into());
                args.push(inbound.app.port().to_string());
            }
        }
    }
    for callee in &w.calls {
        let target = config
            .workloads
            .iter()
            .find(|o| &o.name == callee)
            .and_then(|o| o.inbound.as_ref())
            .with_context(|| format!("{callee} has no port"))?;
        args.push("--outbound".into());
        args.push(format!("127.0.0.1:0={}", target.listen));
    }
    let child = Child::spawn(
        &format!("agent {}", w.name),
        &config.bins.path(bins::AGENT),
        &args,
        &[("RUST_LOG", "info")],
        &logs.join(format!("agent-{}.log", w.name)),
    )
    .await?;
    Ok(Agent {
        child,
        spiffe_id: spiffe_id(&config.trust_domain, &w.namespace, &w.service_account),
        workload: w.clone(),
        admin: "127.0.0.1:0".parse()?,
        inbound: None,
        outbound: Vec::new(),
    })
}

/// Reads the agent's bound addresses from its start-up lines, then waits
/// for `/readyz` (a certificate and the first policy).
async fn finish_agent_start(config: &MeshConfig, a: &mut Agent) -> anyhow::Result<()> {
    let line = a
        .child
        .wait_for_line(STARTUP, |l| l.contains("admin endpoint listening"))
        .await?;
    a.admin = log_field(&line, "addr")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no admin address in {line:?}"))?;
    if a.workload.inbound.is_some() {
        let line = a
            .child
            .wait_for_line(Duration::from_secs(1), |l| {
                l.contains("inbound proxy listening")
            })
            .await?;
        a.inbound = log_field(&line, "listen").and_then(|v| v.parse().ok());
    }
    resolve_outbound(config, a)?;
    admin::wait_ready(a.admin, STARTUP).await.with_context(|| {
        format!(
            "agent {} ({}) did not become ready; its last output:\n{}\n(full log: {})",
            a.workload.name,
            a.spiffe_id,
            a.child.tail(15),
            a.child.log().display()
        )
    })
}

/// The outbound listeners' addresses, from their start-up lines, each
/// matched to its callee by the destination it names.
fn resolve_outbound(config: &MeshConfig, a: &mut Agent) -> anyhow::Result<()> {
    let lines = a
        .child
        .lines_matching(|l| l.contains("outbound proxy listening"));
    for callee in &a.workload.calls {
        let dest = config
            .workloads
            .iter()
            .find(|o| &o.name == callee)
            .and_then(|o| o.inbound.as_ref())
            .map(|i| i.listen.to_string())
            .unwrap_or_default();
        let line = lines
            .iter()
            .find(|l| log_field(l, "dest").as_deref() == Some(dest.as_str()))
            .with_context(|| {
                format!(
                    "agent {} printed no outbound listener for {callee} ({dest})",
                    a.workload.name
                )
            })?;
        let addr = log_field(line, "listen")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no listen= address in {line:?}"))?;
        a.outbound.push((callee.clone(), addr));
    }
    Ok(())
}
