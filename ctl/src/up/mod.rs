//! `palisadectl up DIR`.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct UpArgs {}

pub fn run(_args: UpArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
