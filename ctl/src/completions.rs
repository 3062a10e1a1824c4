//! `palisadectl completions SHELL`: a completion script for the shell,
//! generated from the command definitions (clap_complete).

use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: Shell,
}

pub fn run<C: CommandFactory>(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = C::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "palisadectl", &mut script);
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write to stdout: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
