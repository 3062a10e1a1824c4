//! Progress on stderr for the steps of `up` and `demo`: a spinner while a
//! step runs (on a terminal only), then one line saying how it ended.
//! Nothing at all in quiet mode (`--output json`), so stdout stays data.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy)]
pub struct Progress {
    quiet: bool,
    spinners: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            spinners: !quiet && std::io::stderr().is_terminal(),
        }
    }

    /// A step that is starting; finish it with [`Step::done`] or
    /// [`Step::failed`].
    pub fn step(&self, message: impl Into<String>) -> Step {
        let message = message.into();
        let bar = if self.spinners {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
                bar.set_style(style);
            }
            bar.set_message(message.clone());
            // Waits under a second finish before the spinner shows.
            bar.enable_steady_tick(Duration::from_millis(100));
            Some(bar)
        } else {
            None
        };
        Step {
            quiet: self.quiet,
            bar,
            started: Instant::now(),
        }
    }

    /// Whether anything is printed at all.
    pub fn visible(&self) -> bool {
        !self.quiet
    }

    /// A line of its own.
    pub fn say(&self, line: &str) {
        if !self.quiet {
            crate::output::error(format_args!("{line}"));
        }
    }
}

pub struct Step {
    quiet: bool,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Step {
    pub fn done(self, line: impl AsRef<str>) {
        self.finish("✓", line.as_ref());
    }

    pub fn failed(self, line: impl AsRef<str>) {
        self.finish("✗", line.as_ref());
    }

    fn finish(mut self, mark: &str, line: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            let secs = self.started.elapsed().as_secs_f64();
            crate::output::error(format_args!("{mark} {line} ({secs:.1} s)"));
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
