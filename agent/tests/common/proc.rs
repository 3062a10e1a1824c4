//! A child process (the real binaries) whose log the test waits on.

use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::AGENT;

/// Bound on any wait for a log line, so a failure does not hang.
const WAIT: Duration = Duration::from_secs(10);

/// `palisade-agent run ARGS` with `ca.pem` as the trust bundle and
/// `NAME.pem`/`NAME.key` as its certificate, all from `dir`; no admin port.
pub fn agent_run(dir: &Path, name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(AGENT);
    cmd.arg("run")
        .args(args)
        .arg("--trust-bundle")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join(format!("{name}.pem")))
        .arg("--key")
        .arg(dir.join(format!("{name}.key")))
        .args(["--admin", ""]);
    cmd
}

/// A child process whose output is collected line by line (so its pipes
/// never fill up), killed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd` logging at `rust_log`, without colours.
    pub fn spawn(name: &str, rust_log: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().push(line);
                }
            });
        }
        Self {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// Waits for a line containing every one of `parts`.
    pub async fn wait_for(&mut self, parts: &[&str]) -> String {
        self.wait_for_line(&parts, |l| {
            parts.iter().all(|p| l.contains(p)).then(|| l.to_owned())
        })
        .await
    }

    /// The value of `key=` on the first line containing `message`.
    pub async fn wait_for_field(&mut self, message: &str, key: &str) -> String {
        self.wait_for_line(&message, |l| {
            l.contains(message).then(|| field(l, key)).flatten()
        })
        .await
    }

    /// Waits for the first line `find` makes something of (`what` names it
    /// in the failure); panics if the process exits or `WAIT` passes first.
    async fn wait_for_line<T>(
        &mut self,
        what: &dyn Debug,
        mut find: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = self.lines.lock().iter().find_map(|l| find(l)) {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("{} exited ({status}):\n{}", self.name, self.transcript());
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {what:?}:\n{}",
                self.name,
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn transcript(&self) -> String {
        self.lines.lock().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of ` key=` in a log line, without quotes.
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    Some(
        line[at..]
            .split_whitespace()
            .next()?
            .trim_matches('"')
            .to_owned(),
    )
}
