//! Where the other Palisade binaries are: next to palisadectl (as cargo
//! builds them, `target/<profile>/`), or in `--bin-dir`.
//!
//! Run through `cargo run -p palisadectl`, only palisadectl is built; the
//! others are then built once with the same cargo and profile, so the
//! README's first command works on a fresh checkout.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

pub const AGENT: &str = "palisade-agent";
pub const OPERATOR: &str = "palisade-operator";
pub const COLLECTOR: &str = "palisade-collector";
const NEEDED: [&str; 3] = [AGENT, OPERATOR, COLLECTOR];

#[derive(Clone, Debug)]
pub struct BinDir {
    dir: PathBuf,
}

impl BinDir {
    /// `explicit`, or the directory of the running palisadectl.
    pub fn locate(explicit: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match explicit {
            Some(dir) => dir.to_owned(),
            None => std::env::current_exe()
                .context("cannot find the palisadectl executable's path; pass --bin-dir")?
                .parent()
                .context("the palisadectl executable has no directory; pass --bin-dir")?
                .to_owned(),
        };
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    fn missing(&self) -> Vec<&'static str> {
        NEEDED
            .into_iter()
            .filter(|n| !self.path(n).is_file())
            .collect()
    }

    /// Checks that the agent, operator and collector are there. Under
    /// `cargo run` (cargo sets `CARGO`) missing ones are built first with
    /// the same profile; otherwise the error says what to build.
    pub fn ensure(&self, explicit: bool, say: impl Fn(&str)) -> anyhow::Result<()> {
        let missing = self.missing();
        if missing.is_empty() {
            return Ok(());
        }
        let cargo = std::env::var_os("CARGO");
        let profile = self.dir.file_name().and_then(|n| n.to_str());
        if let (false, Some(cargo), Some(profile)) = (explicit, cargo, profile) {
            say(&format!(
                "building {} ({profile} profile; once, it takes a few minutes)…",
                missing.join(", ")
            ));
            let mut cmd = std::process::Command::new(cargo);
            cmd.arg("build");
            // cargo run sets it to ctl/; the workspace is found from there.
            if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
                cmd.arg("--manifest-path")
                    .arg(Path::new(&dir).join("Cargo.toml"));
            }
            match profile {
                "debug" => {}
                "release" => {
                    cmd.arg("--release");
                }
                other => {
                    cmd.args(["--profile", other]);
                }
            }
            for name in &missing {
                cmd.args(["-p", name]);
            }
            let status = cmd.status().context("cannot run cargo build")?;
            if !status.success() {
                bail!("cargo build of {} failed ({status})", missing.join(", "));
            }
            if self.missing().is_empty() {
                return Ok(());
            }
        }
        bail!(
            "{} not found in {}. Build them next to palisadectl with \
             `cargo build --release --workspace` (then run target/release/palisadectl), \
             or pass --bin-dir DIR where they are",
            missing.join(", "),
            self.dir.display()
        )
    }
}
