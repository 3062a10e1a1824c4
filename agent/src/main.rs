//! `palisade-agent`: the Palisade sidecar.
//!
//! This build loads and checks a compiled policy; the proxy listeners,
//! identity client and iptables setup follow (see the open issues).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use palisade_policy::PolicyEngine;
use palisade_policy::wire::WorkloadPolicy;
use prost::Message;

#[derive(Parser)]
#[command(
    name = "palisade-agent",
    version,
    about = "Palisade sidecar: a transparent mTLS proxy that enforces WorkloadPolicy on every request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a compiled policy (from `palisadectl policy compile`) and report whether it can be enforced.
    CheckPolicy {
        /// Binary WorkloadPolicy file.
        policy_file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::CheckPolicy { policy_file } => {
            let bytes = std::fs::read(&policy_file)
                .with_context(|| format!("cannot read {}", policy_file.display()))?;
            let policy =
                WorkloadPolicy::decode(bytes.as_slice()).context("not a WorkloadPolicy")?;
            let engine = PolicyEngine::load(policy).context("policy cannot be enforced")?;
            println!(
                "policy {} for {}: {} routes, ready",
                engine.version(),
                engine.policy().workload,
                engine.policy().routes.len()
            );
        }
    }
    Ok(())
}
