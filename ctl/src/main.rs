//! `palisadectl`: the Palisade command line.

mod audit;
mod certs;
mod output;
mod policy;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Audit(args) => audit::run(args),
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
