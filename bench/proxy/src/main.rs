//! `palisade-bench`: the side-by-side proxy benchmark of DESIGN §10.
//!
//! One run measures, against one backend (a tiny hyper HTTP/1.1 server in
//! this process answering a fixed 200 body):
//!
//! - **direct**: load generator → backend, plaintext;
//! - **palisade**: load generator (mTLS, SPIFFE certificate) → `palisade-agent
//!   run --inbound` → backend, enforcing `bench/proxy/policy.yaml` (authz on
//!   the client's SPIFFE ID, a local rate limit that never triggers);
//! - **palisade-pair**: plaintext load generator → outbound agent → inbound
//!   agent → backend, when the agent has `run --outbound`;
//! - **envoy**: Envoy with the equivalent configuration (`src/envoy.rs`).
//!
//! and prints a markdown report to stdout (progress goes to stderr).
//! `bench/README.md` has the figures and the caveats.

mod certs;
mod envoy;
mod load;
mod procs;
mod stats;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use certs::{BACKEND_ID, Pki};
use load::Target;
use procs::{Proxy, RssSampler, free_port, rss_kib};
use stats::{Summary, ms, ratio};

#[derive(Parser)]
#[command(
    name = "palisade-bench",
    about = "Latency, throughput and memory: direct vs Palisade agent (vs an agent pair) vs Envoy"
)]
struct Args {
    /// Concurrent keep-alive HTTP/1.1 connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured time per setup, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// The agent binary; build it with `cargo build --release -p palisade-agent -p palisadectl`.
    #[arg(long, default_value_os_t = workspace().join("target/release/palisade-agent"))]
    agent_bin: PathBuf,
    /// `palisadectl`, to compile bench/proxy/policy.yaml.
    #[arg(long, default_value_os_t = workspace().join("target/release/palisadectl"))]
    ctl_bin: PathBuf,
    /// The Envoy binary; default: installed by bench/proxy/envoy.sh into target/bench-venv.
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// Setups to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,palisade,palisade-pair,envoy"
    )]
    setups: Vec<Setup>,
    /// Worker threads for each proxy (Envoy `--concurrency`; the agent uses one per core).
    #[arg(long, default_value_t = 2)]
    proxy_threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Setup {
    Direct,
    Palisade,
    PalisadePair,
    Envoy,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Palisade => "palisade",
            Setup::PalisadePair => "palisade-pair",
            Setup::Envoy => "envoy",
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    palisade_policy::duration::parse_duration(text).map_err(|e| e.to_string())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What one setup produced.
struct Outcome {
    setup: Setup,
    summary: Summary,
    /// Per proxy process: (name, idle RSS KiB, peak RSS under load KiB).
    rss: Vec<(String, u64, u64)>,
    /// The status an allowed-CA but not-allowed SPIFFE ID gets (authz check).
    intruder: Option<u16>,
    /// CPU time (user + system) of all proxy processes per request, µs.
    cpu_us_per_request: Option<f64>,
}

struct Env {
    args: Args,
    dir: tempfile::TempDir,
    pki: Pki,
    policy: PathBuf,
    backend: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // 32 connections per setup are far below any limit, but --connections
    // may not be; the agent raises its own limit the same way.
    let _ = palisade_agent::limits::raise_nofile_limit();
    for bin in [&args.agent_bin, &args.ctl_bin] {
        anyhow::ensure!(
            bin.is_file(),
            "{} does not exist; build it: cargo build --release -p palisade-agent -p palisadectl",
            bin.display()
        );
    }
    if args
        .agent_bin
        .components()
        .any(|c| c.as_os_str() == "debug")
    {
        eprintln!(
            "warning: {} looks like a debug build",
            args.agent_bin.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("palisade-bench")
        .tempdir()?;
    let pki = Pki::create(dir.path())?;
    let policy = compile_policy(&args.ctl_bin, dir.path())?;
    let backend = load::start_backend().await?;
    let env = Env {
        args,
        dir,
        pki,
        policy,
        backend,
    };

    let mut outcomes = Vec::new();
    let mut notes = Vec::new();
    let mut envoy_version = None;
    for setup in env.args.setups.clone() {
        eprintln!("== {}", setup.name());
        let result = match setup {
            Setup::Direct => measure(&env, setup, Target::Plain(env.backend), vec![], None).await,
            Setup::Palisade => palisade(&env).await,
            Setup::PalisadePair => match pair_flags(&env.args.agent_bin) {
                Ok(flags) => pair(&env, &flags).await,
                Err(why) => Err(why),
            },
            Setup::Envoy => match envoy::locate(env.args.envoy_bin.as_deref(), &workspace()) {
                Ok(bin) => {
                    envoy_version = version_of(&bin);
                    envoy(&env, &bin).await
                }
                Err(e) => Err(e.context("Envoy is not available")),
            },
        };
        match result {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("{} skipped: {e:#}", setup.name());
                notes.push(format!("- **{}** not measured: {e:#}", setup.name()));
            }
        }
    }
    print!(
        "{}",
        report(&env, &outcomes, &notes, envoy_version.as_deref())
    );
    Ok(())
}

fn compile_policy(ctl: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let source = workspace().join("bench/proxy/policy.yaml");
    let out = dir.join("policy.pb");
    let result = Command::new(ctl)
        .args(["policy", "compile"])
        .arg(&source)
        .args(["--namespace", "bench", "--service-account", "backend", "-o"])
        .arg(&out)
        .output()
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    anyhow::ensure!(
        result.status.success(),
        "palisadectl policy compile {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    Ok(out)
}

fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, after) = text.split_once("version:")?;
    after
        .split_whitespace()
        .next()?
        .split('/')
        .nth(1)
        .map(str::to_owned)
}

/// `palisade-agent run` with our certificate, the bench policy and no admin port.
fn agent_command(env: &Env, leaf: &certs::LeafFiles) -> Command {
    let mut cmd = Command::new(&env.args.agent_bin);
    cmd.arg("run")
        .arg("--trust-bundle")
        .arg(&env.pki.bundle)
        .arg("--cert")
        .arg(&leaf.cert)
        .arg("--key")
        .arg(&leaf.key)
        .args(["--admin", ""])
        // Per-request logs would measure the log writer, not the proxy.
        .env("RUST_LOG", "warn");
    cmd
}

async fn palisade(env: &Env) -> anyhow::Result<Outcome> {
    let listen = free_port()?;
    let mut cmd = agent_command(env, &env.pki.backend);
    cmd.arg("--inbound")
        .arg(format!("{listen}={}", env.backend))
        .arg("--policy-file")
        .arg(&env.policy);
    let mut agent = Proxy::spawn("palisade-inbound", cmd, env.dir.path())?;
    agent.wait_listening(listen).await?;
    let target = Target::Tls(listen, env.pki.loadgen_client()?);
    let intruder = Target::Tls(listen, env.pki.intruder_client()?);
    measure(env, Setup::Palisade, target, vec![agent], Some(intruder)).await
}

/// How this agent build is told to run an outbound listener, from its
/// `run --help` (an error when it has no outbound proxy).
struct PairFlags {
    /// `--inbound` is required even for an outbound-only agent.
    inbound_required: bool,
}

fn pair_flags(agent: &Path) -> anyhow::Result<PairFlags> {
    let out = Command::new(agent).args(["run", "--help"]).output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        help.contains("--outbound") && help.contains("--mesh-destination"),
        "this palisade-agent has no `run --outbound` / `--mesh-destination` yet"
    );
    let usage = help.lines().find(|l| l.contains("Usage:")).unwrap_or("");
    Ok(PairFlags {
        inbound_required: usage.contains("--inbound <"),
    })
}

async fn pair(env: &Env, flags: &PairFlags) -> anyhow::Result<Outcome> {
    let inbound_listen = free_port()?;
    let mut cmd = agent_command(env, &env.pki.backend);
    cmd.arg("--inbound")
        .arg(format!("{inbound_listen}={}", env.backend))
        .arg("--policy-file")
        .arg(&env.policy);
    let mut inbound = Proxy::spawn("palisade-inbound", cmd, env.dir.path())?;
    inbound.wait_listening(inbound_listen).await?;

    // The client workload's sidecar: the load generator's identity, so the
    // inbound agent's policy sees the same principal as in `palisade`.
    let outbound_listen = free_port()?;
    let mut cmd = agent_command(env, &env.pki.loadgen);
    cmd.arg("--outbound")
        .arg(format!("{outbound_listen}={inbound_listen}"))
        .arg("--mesh-destination")
        .arg(format!("{inbound_listen}={BACKEND_ID}"));
    if flags.inbound_required {
        // An inbound listener nobody calls, only because the flag is required.
        cmd.arg("--inbound")
            .arg(format!("{}=127.0.0.1:9", free_port()?));
    }
    let mut outbound = Proxy::spawn("palisade-outbound", cmd, env.dir.path())?;
    outbound.wait_listening(outbound_listen).await?;
    let target = Target::Plain(outbound_listen);
    measure(
        env,
        Setup::PalisadePair,
        target,
        vec![outbound, inbound],
        None,
    )
    .await
}

async fn envoy(env: &Env, bin: &Path) -> anyhow::Result<Outcome> {
    let listen = free_port()?;
    let config = env.dir.path().join("envoy.json");
    std::fs::write(
        &config,
        envoy::config(listen, env.backend, &env.pki.backend, &env.pki.bundle),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&config)
        .args(["--concurrency", &env.args.proxy_threads.to_string()])
        .args(["--log-level", "warn", "--disable-hot-restart"]);
    let mut proxy = Proxy::spawn("envoy", cmd, env.dir.path())?;
    proxy.wait_listening(listen).await?;
    let target = Target::Tls(listen, env.pki.loadgen_client()?);
    let intruder = Target::Tls(listen, env.pki.intruder_client()?);
    measure(env, Setup::Envoy, target, vec![proxy], Some(intruder)).await
}

async fn measure(
    env: &Env,
    setup: Setup,
    target: Target,
    proxies: Vec<Proxy>,
    intruder: Option<Target>,
) -> anyhow::Result<Outcome> {
    // Listening is not ready: the first request proves the whole path works,
    // with retries while a proxy finishes starting.
    let mut last = None;
    for _ in 0..50 {
        match load::probe(&target).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(e) = last {
        let logs: String = proxies
            .iter()
            .map(|p| format!("\n--- {} ---\n{}", p.name, p.log_tail()))
            .collect();
        return Err(e.context(format!("no 200 through {}{logs}", setup.name())));
    }
    let intruder = match intruder {
        Some(t) => Some(load::status_of(&t).await?.as_u16()),
        None => None,
    };
    // "Idle": started, one request served, settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<u64> = proxies
        .iter()
        .map(|p| rss_kib(p.pid()).unwrap_or(0))
        .collect();
    let sampler = RssSampler::start(proxies.iter().map(Proxy::pid).collect());
    let cpu_before: Option<u64> = proxies.iter().map(|p| cpu_ticks(p.pid())).sum();
    let samples = load::run(
        &target,
        env.args.connections,
        env.args.warmup,
        env.args.duration,
    )
    .await;
    let peaks = sampler.stop();
    let cpu_after: Option<u64> = proxies.iter().map(|p| cpu_ticks(p.pid())).sum();
    let summary = samples.summary(env.args.duration);
    // The CPU was counted over warm-up and measurement; the requests of
    // both are estimated from the measured rate.
    let window = (env.args.warmup + env.args.duration).as_secs_f64();
    let cpu_us_per_request = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) if !proxies.is_empty() && summary.rps > 0.0 => {
            Some(a.saturating_sub(b) as f64 * 1e6 / ticks_per_second() / (summary.rps * window))
        }
        _ => None,
    };
    eprintln!(
        "{}: {:.0} req/s, p50 {} ms, p99 {} ms, {} errors",
        setup.name(),
        summary.rps,
        ms(summary.p50),
        ms(summary.p99),
        summary.errors
    );
    let rss = proxies
        .iter()
        .zip(idle.iter().zip(&peaks))
        .map(|(p, (i, k))| (p.name.clone(), *i, *k))
        .collect();
    Ok(Outcome {
        setup,
        summary,
        rss,
        intruder,
        cpu_us_per_request,
    })
}

/// User + system CPU of a process so far, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields count from after its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn report(env: &Env, outcomes: &[Outcome], notes: &[String], envoy: Option<&str>) -> String {
    let a = &env.args;
    let mut out = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "### palisade-bench, {} connections × {:?} (after {:?} warm-up), {cpus} CPUs{}\n",
        a.connections,
        a.duration,
        a.warmup,
        envoy.map_or(String::new(), |v| format!(", Envoy {v}"))
    );
    let _ = writeln!(
        out,
        "| setup | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | added p50 ms | added p99 ms | proxy CPU µs/req | proxy RSS idle MiB | proxy RSS peak MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let direct = outcomes
        .iter()
        .find(|o| o.setup == Setup::Direct)
        .map(|o| o.summary);
    for o in outcomes {
        let s = &o.summary;
        let added = |v: u32, d: fn(&Summary) -> u32| match direct {
            Some(ds) if o.setup != Setup::Direct => {
                format!("{:+.3}", (f64::from(v) - f64::from(d(&ds))) / 1000.0)
            }
            _ => "—".into(),
        };
        let rss = |f: fn(&(String, u64, u64)) -> u64| {
            if o.rss.is_empty() {
                "—".to_owned()
            } else {
                o.rss
                    .iter()
                    .map(|r| mib(f(r)))
                    .collect::<Vec<_>>()
                    .join(" + ")
            }
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            o.setup.name(),
            s.rps,
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            s.errors,
            added(s.p50, |d| d.p50),
            added(s.p99, |d| d.p99),
            o.cpu_us_per_request
                .map_or_else(|| "—".to_owned(), |c| format!("{c:.1}")),
            rss(|r| r.1),
            rss(|r| r.2),
        );
    }
    let find = |s: Setup| outcomes.iter().find(|o| o.setup == s);
    if let (Some(p), Some(e)) = (find(Setup::Palisade), find(Setup::Envoy)) {
        let (ps, es) = (&p.summary, &e.summary);
        let added = |x: u32, d: u32| f64::from(x) - f64::from(d);
        let _ = writeln!(out, "\n| palisade / envoy | ratio |\n|---|---:|");
        let _ = writeln!(out, "| req/s | {} |", ratio(ps.rps, es.rps));
        if let (Some(pc), Some(ec)) = (p.cpu_us_per_request, e.cpu_us_per_request) {
            let _ = writeln!(out, "| proxy CPU per request | {} |", ratio(pc, ec));
        }
        let _ = writeln!(
            out,
            "| p50 latency | {} |",
            ratio(f64::from(ps.p50), f64::from(es.p50))
        );
        let _ = writeln!(
            out,
            "| p99 latency | {} |",
            ratio(f64::from(ps.p99), f64::from(es.p99))
        );
        if let Some(d) = direct {
            let _ = writeln!(
                out,
                "| added p50 latency vs direct | {} |",
                ratio(added(ps.p50, d.p50), added(es.p50, d.p50))
            );
            let _ = writeln!(
                out,
                "| added p99 latency vs direct | {} |",
                ratio(added(ps.p99, d.p99), added(es.p99, d.p99))
            );
        }
        let sum = |o: &Outcome, f: fn(&(String, u64, u64)) -> u64| -> f64 {
            o.rss.iter().map(f).sum::<u64>() as f64
        };
        let _ = writeln!(
            out,
            "| RSS idle | {} |",
            ratio(sum(p, |r| r.1), sum(e, |r| r.1))
        );
        let _ = writeln!(
            out,
            "| RSS peak under load | {} |",
            ratio(sum(p, |r| r.2), sum(e, |r| r.2))
        );
    }
    let authz: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.intruder.map(|s| format!("{} → {s}", o.setup.name())))
        .collect();
    if !authz.is_empty() {
        let _ = writeln!(
            out,
            "\nAuthorization check (a client certificate from the same CA, SPIFFE ID \
             `{}`, not allowed): {}.",
            certs::INTRUDER_ID,
            authz.join(", ")
        );
    }
    if outcomes.iter().any(|o| o.setup == Setup::PalisadePair) {
        let _ = writeln!(
            out,
            "\npalisade-pair RSS is outbound agent + inbound agent."
        );
    }
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    out
}
