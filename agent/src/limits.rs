//! Process resource limits the sidecar adjusts for itself at start-up.
//!
//! Every proxied connection costs the agent at least one file descriptor (two
//! while a request is forwarded to the app), and the usual soft limit of 1024
//! would cap a busy sidecar at a few hundred clients: `accept` then fails with
//! `EMFILE` and the inbound loop backs off. The hard limit is what the
//! administrator (or the container runtime) actually granted, so the agent
//! raises its soft limit to it, as Envoy does.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft
/// limit now in force. Unchanged (and not an error) when it already is the
/// hard limit.
///
/// An unlimited hard limit is refused by the kernel for `RLIMIT_NOFILE`
/// (it is capped by `fs.nr_open`); in that case the soft limit is raised to
/// `fs.nr_open` when it can be read, and left alone otherwise.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        match nr_open() {
            Some(n) => n,
            None => return Ok(limit.rlim_cur),
        }
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur >= target {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: `raised` is a valid `rlimit`; the kernel only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// The kernel's ceiling on a process's descriptor count (`fs.nr_open`).
fn nr_open() -> Option<libc::rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        limit
    }

    #[test]
    fn raises_the_soft_limit_to_the_hard_limit_and_is_idempotent() {
        let raised = raise_nofile_limit().expect("raise");
        let now = current();
        assert_eq!(now.rlim_cur, raised);
        if now.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(now.rlim_cur, now.rlim_max);
        }
        assert_eq!(raise_nofile_limit().expect("raise again"), raised);
    }
}
