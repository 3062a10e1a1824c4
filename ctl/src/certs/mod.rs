//! `palisadectl certs …`: look at workload certificates.

mod inspect;

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Show a certificate chain from a PEM file or a live TLS endpoint: SPIFFE ID, issuer,
    /// validity, chain, and whether it verifies against a trust bundle.
    Inspect(inspect::InspectArgs),
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Inspect(args) => inspect::run(&args),
    }
}
