//! `palisadectl`: the Palisade command line.

mod apps;
mod audit;
mod certs;
mod completions;
mod demo;
mod mesh;
mod output;
mod policy;
mod progress;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "palisadectl",
    version,
    about = "Palisade command line: check and simulate ApiSecurityPolicy files, inspect certificates and audit events, run a local mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with ApiSecurityPolicy files.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Inspect workload certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Read the audit trail from the collector: query, stats, tail, verify.
    Audit(audit::AuditArgs),
    /// Run a local mesh from a directory: operator, collector and one agent per service of its
    /// mesh.yaml, the apps behind them; a status table, then until Ctrl-C.
    Up(up::UpArgs),
    /// A self-contained tour: a local mesh with built-in services and scripted traffic, one line
    /// per capability; exits 0 only if every expectation held.
    Demo(demo::DemoArgs),
    /// Print a shell completion script, e.g. `palisadectl completions bash > /etc/bash_completion.d/palisadectl`.
    Completions(completions::CompletionsArgs),
    /// A built-in demo service (what examples/quickstart runs behind its agents).
    #[command(hide = true)]
    DemoApp(apps::DemoAppArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Audit(args) => audit::run(args),
        Command::Up(args) => up::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Completions(args) => completions::run::<Cli>(args),
        Command::DemoApp(args) => apps::run(args),
    };
    match result {
        Ok(code) => code,
        // The reader went away (`| head`): nothing more to say, to anyone.
        Err(e) if output::is_broken_pipe(&e) => {
            std::process::ExitCode::from(output::BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            output::error(format_args!("error: {e:#}"));
            std::process::ExitCode::from(2)
        }
    }
}
