//! `palisadectl`: the Palisade command line.

mod certs;
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Certs(cmd) => certs::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
