//! Runs a plan with `std::process::Command` (no shell), one `iptables`
//! invocation per step.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::process::{Command, Output};

use super::plan::{Step, TABLE};

/// Why installing or removing the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The `iptables` binary is not there.
    #[error(
        "`{0}` not found: transparent capture needs iptables (Debian/Ubuntu: apt-get install iptables; \
         or pass --iptables PATH)"
    )]
    IptablesMissing(String),
    /// The binary could not be started for another reason.
    #[error("cannot run `{binary}`: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An `iptables` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A `-D` loop never ended (the rule kept being reported present).
    #[error("`{0}` still present after 64 deletions")]
    Stuck(String),
}

/// Runs steps against one `iptables` binary.
#[derive(Debug, Clone)]
pub struct Iptables {
    binary: OsString,
}

impl Iptables {
    /// Use this binary (a name looked up on `PATH`, or a path).
    pub fn new(binary: impl Into<OsString>) -> Self {
        Self {
            binary: binary.into(),
        }
    }

    fn name(&self) -> String {
        self.binary.to_string_lossy().into_owned()
    }

    /// Checks the binary runs at all (`iptables --version`), so a missing
    /// iptables is reported before anything is changed.
    pub fn check_available(&self) -> Result<String, CaptureError> {
        let out = self.spawn(&["--version".to_string()], false)?;
        if !out.status.success() {
            return Err(self.failed(&["--version".to_string()], &out, false));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn spawn(&self, args: &[String], with_table: bool) -> Result<Output, CaptureError> {
        let mut cmd = Command::new(&self.binary);
        if with_table {
            cmd.args(["-t", TABLE]);
        }
        cmd.args(args).output().map_err(|e| match e.kind() {
            ErrorKind::NotFound => CaptureError::IptablesMissing(self.name()),
            _ => CaptureError::Spawn {
                binary: self.name(),
                source: e,
            },
        })
    }

    fn failed(&self, args: &[String], out: &Output, with_table: bool) -> CaptureError {
        let table = if with_table {
            format!(" -t {TABLE}")
        } else {
            String::new()
        };
        CaptureError::Failed {
            command: format!("{}{table} {}", self.name(), args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
    }

    /// `iptables -t nat ARGS`, which must succeed.
    fn run(&self, args: &[String]) -> Result<(), CaptureError> {
        let out = self.spawn(args, true)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(self.failed(args, &out, true))
        }
    }

    /// `iptables -t nat ARGS`, where a failure whose stderr mentions one of
    /// `benign` is fine.
    fn run_tolerating(&self, args: &[String], benign: &[&str]) -> Result<(), CaptureError> {
        let out = self.spawn(args, true)?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        if benign.iter().any(|b| stderr.contains(b)) {
            Ok(())
        } else {
            Err(self.failed(args, &out, true))
        }
    }

    /// `iptables -t nat -C RULE`: is the rule there? A missing chain counts
    /// as absent; exit status 1 is "absent", anything else an error.
    fn check(&self, rule: &[String]) -> Result<bool, CaptureError> {
        let mut args = vec!["-C".to_string()];
        args.extend(rule.iter().cloned());
        let out = self.spawn(&args, true)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => {
                let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
                if stderr.contains("no chain") || stderr.contains("does not exist") {
                    Ok(false)
                } else {
                    Err(self.failed(&args, &out, true))
                }
            }
        }
    }

    /// Runs the steps in order, stopping at the first error.
    pub fn execute(&self, steps: &[Step]) -> Result<(), CaptureError> {
        const MISSING: &[&str] = &["no chain", "does not exist", "not found"];
        for step in steps {
            match step {
                Step::Run(args) => self.run(args)?,
                Step::CreateChain(_) => self.run_tolerating(&step.args(), &["exists"])?,
                Step::DeleteChain(_) | Step::FlushIfExists(_) => {
                    self.run_tolerating(&step.args(), MISSING)?
                }
                Step::AppendIfAbsent(rule) => {
                    if !self.check(rule)? {
                        self.run(&step.args())?;
                    }
                }
                Step::DeleteWhilePresent(rule) => {
                    let mut n = 0;
                    while self.check(rule)? {
                        if n == 64 {
                            return Err(CaptureError::Stuck(rule.join(" ")));
                        }
                        self.run(&step.args())?;
                        n += 1;
                    }
                }
            }
        }
        Ok(())
    }
}
