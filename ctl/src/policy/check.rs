//! `palisadectl policy check`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::output::outln;

pub fn run(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut count = 0;
    for file in files {
        let loaded = match super::read_file(file) {
            Ok(l) => l,
            Err(e) => {
                outln!("{}: {e:#}", file.display())?;
                failed = true;
                continue;
            }
        };
        for result in loaded {
            count += 1;
            match result {
                Ok(p) => outln!(
                    "{}: {}/{}: ok",
                    file.display(),
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or("")
                )?,
                Err((label, errors)) => {
                    failed = true;
                    for e in errors.0 {
                        outln!("{}: {label}: {e}", file.display())?;
                    }
                }
            }
        }
    }
    if count == 0 && !failed {
        outln!("no policies found")?;
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
