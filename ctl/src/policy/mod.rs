//! `palisadectl policy …`: check, simulate and compile policy files.

mod check;
mod compile;
mod simulate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use palisade_policy::crd::ApiSecurityPolicy;
use palisade_policy::documents::{LoadedPolicy, load_policies};

pub use simulate::SimulateArgs;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files; prints every problem with its field path and exits 1 if any.
    Check {
        /// YAML or JSON files, several documents each allowed.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show what the agent would decide for one request.
    Simulate(SimulateArgs),
    /// Compile the policies selecting one workload into the agent's binary WorkloadPolicy.
    Compile(compile::CompileArgs),
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { files } => check::run(&files),
        PolicyCommand::Simulate(args) => simulate::run(&args),
        PolicyCommand::Compile(args) => compile::run(&args),
    }
}

/// Loads every policy of every file, or explains every problem and fails.
pub(crate) fn load_valid(files: &[PathBuf]) -> anyhow::Result<Vec<ApiSecurityPolicy>> {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        for result in read_file(file)? {
            match result {
                Ok(p) => policies.push(p),
                Err((label, errors)) => {
                    for e in errors.0 {
                        problems.push(format!("{}: {label}: {e}", file.display()));
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid policies:\n{}", problems.join("\n"));
    }
    Ok(policies)
}

pub(crate) fn read_file(file: &Path) -> anyhow::Result<Vec<LoadedPolicy>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    load_policies(&text).with_context(|| file.display().to_string())
}
