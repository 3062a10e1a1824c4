//! Everything palisadectl prints goes through here, so a reader that goes
//! away (`palisadectl policy check *.yaml | head -1`) ends the process
//! quietly instead of panicking in `println!` ("failed printing to stdout").
//!
//! [`outln!`] writes one line to stdout and returns the `io::Error`; callers
//! pass it up with `?`. `main` recognizes a broken pipe anywhere in the
//! error chain ([`is_broken_pipe`]) and exits with [`BROKEN_PIPE_EXIT`]
//! without a message. Rust ignores SIGPIPE, so the process is not killed by
//! the signal as a C program would be; 141 is the status a shell reports
//! for such a program (128 + SIGPIPE), so `set -o pipefail` scripts still
//! see that the output was cut short. Never 0: a `policy check` that was
//! stopped half-way has not shown every file to be valid.

use std::io::{self, Write};

/// `128 + SIGPIPE (13)`: what a shell reports for a writer killed by SIGPIPE.
pub const BROKEN_PIPE_EXIT: u8 = 141;

/// `println!` that returns the write error instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(::std::format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes `args` and a newline to stdout (line-buffered, so the line is out
/// when this returns).
pub fn write_line(args: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        // The kind stays, so a broken pipe is still recognized.
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write to stdout: {e}")))
}

/// Writes an error message to stderr; a closed stderr is ignored (there is
/// nowhere left to say anything).
pub fn error(message: std::fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(message);
    let _ = err.write_all(b"\n");
}

/// Whether `e` (or anything it wraps) is a write to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_broken_pipe_under_context() {
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let e = anyhow::Error::from(pipe).context("writing the report");
        assert!(is_broken_pipe(&e));
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!is_broken_pipe(&other));
        assert!(!is_broken_pipe(&anyhow::anyhow!("broken pipe")));
    }
}
