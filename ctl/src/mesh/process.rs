//! One child process of a local mesh: its output goes to a log file (and a
//! short in-memory tail, for start-up lines and error messages), it runs in
//! its own process group (a Ctrl-C in the terminal reaches palisadectl
//! alone, which then stops the children in order), it dies with
//! palisadectl even if palisadectl is killed (`PR_SET_PDEATHSIG`), and it is
//! killed when its handle is dropped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::Notify;

/// Lines of output kept in memory per process.
const TAIL_LINES: usize = 2000;

pub struct Child {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    output: Arc<Output>,
    log: PathBuf,
}

#[derive(Default)]
struct Output {
    lines: Mutex<VecDeque<String>>,
    changed: Notify,
}

impl Output {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.lines.lock() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
        self.changed.notify_waiters();
    }

    fn find(&self, pred: &dyn Fn(&str) -> bool) -> Option<String> {
        let lines = self.lines.lock().ok()?;
        lines.iter().find(|l| pred(l)).cloned()
    }

    fn tail(&self, n: usize) -> String {
        let Ok(lines) = self.lines.lock() else {
            return String::new();
        };
        let skip = lines.len().saturating_sub(n);
        lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Child {
    /// Starts `program args` with `env`, its output appended to `log`.
    pub async fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; it runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .await
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        let file = Arc::new(tokio::sync::Mutex::new(file));
        let output = Arc::new(Output::default());
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, output.clone(), file.clone(), ""));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, output.clone(), file, "[stderr] "));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            output,
            log: log.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines it printed.
    pub fn tail(&self, n: usize) -> String {
        self.output.tail(n)
    }

    /// The kept lines satisfying `pred`, oldest first.
    pub fn lines_matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        match self.output.lines.lock() {
            Ok(lines) => lines.iter().filter(|l| pred(l)).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits up to `timeout` for a line satisfying `pred`; fails, with the
    /// end of the output, when the process exits first or time runs out.
    pub async fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.output.changed.notified();
            if let Some(line) = self.output.find(&pred) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                // The pipes may still hold its last words.
                tokio::time::sleep(Duration::from_millis(50)).await;
                bail!(
                    "{} exited ({status}) while starting; its last output:\n{}\n(full log: {})",
                    self.name,
                    self.tail(20),
                    self.log.display()
                );
            }
            let step = tokio::time::Instant::now() + Duration::from_millis(100);
            if tokio::time::timeout_at(step.min(deadline), changed)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                bail!(
                    "{} did not start within {} s; its last output:\n{}\n(full log: {})",
                    self.name,
                    timeout.as_secs(),
                    self.tail(20),
                    self.log.display()
                );
            }
        }
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is reaped.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) on our own child's pid; it is not reaped yet
            // (try_wait above), so the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

async fn pump(
    stream: impl AsyncRead + Unpin,
    output: Arc<Output>,
    file: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    prefix: &'static str,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut f = file.lock().await;
            let _ = f.write_all(prefix.as_bytes()).await;
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
        output.push(line);
    }
}

/// The value of `name` in a `tracing` text line (`name=value` or
/// `name="value"`), `Some(…)` unwrapped.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let key = format!("{name}=");
    let start = line
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?
        .0
        + key.len();
    let rest = &line[start..];
    let value = if let Some(quoted) = rest.strip_prefix('"') {
        quoted[..quoted.find('"')?].to_owned()
    } else {
        rest.split(' ').next().unwrap_or_default().to_owned()
    };
    Some(
        value
            .strip_prefix("Some(")
            .and_then(|v| v.strip_suffix(')'))
            .map_or(value.clone(), str::to_owned),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_of_log_lines() {
        let line =
            "2026-01-01T00:00:00Z INFO x: query API listening listen=Some(127.0.0.1:5) a=\"b c\"";
        assert_eq!(log_field(line, "listen").as_deref(), Some("127.0.0.1:5"));
        assert_eq!(log_field(line, "a").as_deref(), Some("b c"));
        assert_eq!(log_field(line, "b"), None);
        assert_eq!(
            log_field("inbound proxy listening listen=127.0.0.1:9 app=x", "listen").as_deref(),
            Some("127.0.0.1:9")
        );
    }
}
