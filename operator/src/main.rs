//! `palisade-operator`: the Palisade control plane.
//!
//! This build provides `crdgen`; the controller, CA and discovery service
//! follow (see the open issues).

mod crdgen;

use clap::{Parser, Subcommand};

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
    /// Print the ApiSecurityPolicy CustomResourceDefinition as YAML.
    Crdgen,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crdgen => print!("{}", crdgen::crd_yaml()?),
    }
    Ok(())
}
