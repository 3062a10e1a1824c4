//! `palisadectl policy compile`: the binary WorkloadPolicy for `palisade-agent --policy-file`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use palisade_policy::compile::{MeshConfig, NoSecrets, compile_workload};
use prost::Message;

use super::simulate::WorkloadArgs;

use crate::output::outln;

#[derive(Args)]
pub struct CompileArgs {
    /// Policy files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Where to write the compiled policy (protobuf).
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: &CompileArgs) -> anyhow::Result<ExitCode> {
    let policies = super::load_valid(&args.files)?;
    let (policies, workload) = args.workload.resolve(policies);
    let compiled = compile_workload(&policies, &workload, &MeshConfig::default(), &NoSecrets)?;
    std::fs::write(&args.output, compiled.encode_to_vec())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    outln!(
        "compiled {} policies ({} routes) for {} as version {} into {}",
        compiled.sources.len(),
        compiled.routes.len(),
        compiled.workload,
        compiled.version,
        args.output.display()
    )?;
    Ok(ExitCode::SUCCESS)
}
