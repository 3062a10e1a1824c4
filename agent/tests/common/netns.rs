//! Network namespaces for tests that need real iptables and routing: created
//! with `ip netns add`, deleted on drop (also when the test panics).

use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use tokio::net::{TcpListener, TcpSocket};

use super::AGENT;

/// Runs `cmd` to completion and asserts it succeeded; its output.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Two namespaces joined by a veth pair, addressed `a_ip/24` and `b_ip/24`
/// and up (the pair goes with the namespaces).
pub fn veth_pair(tag: &str, a_ip: &str, b_ip: &str) -> (Netns, Netns) {
    let a = Netns::new(&format!("{tag}-a"));
    let b = Netns::new(&format!("{tag}-b"));
    let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (a_if, b_if) = (format!("va{suffix}"), format!("vb{suffix}"));
    run(a.ip().args([
        "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.name,
    ]));
    for (ns, ifname, ip) in [(&a, &a_if, a_ip), (&b, &b_if, b_ip)] {
        run(ns
            .ip()
            .args(["addr", "add", &format!("{ip}/24"), "dev", ifname]));
        run(ns.ip().args(["link", "set", ifname, "up"]));
    }
    (a, b)
}

/// A network namespace, deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `palisade-{tag}-RANDOM`, with `lo` up.
    pub fn new(tag: &str) -> Self {
        let name = format!("palisade-{tag}-{:08x}", rand::random::<u32>());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(ns.ip().args(["link", "set", "lo", "up"]));
        ns
    }

    /// `ip -n NS ...`
    pub fn ip(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]);
        c
    }

    /// `ip netns exec NS PROGRAM`
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `palisade-agent init` in this namespace, as the init container runs it.
    pub fn agent_init(&self, args: &[&str]) -> Output {
        run(self.exec(AGENT).arg("init").args(args))
    }

    /// Runs `f` on a fresh thread that joined this namespace: sockets it
    /// creates and processes it spawns live in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                // SAFETY: plain syscall on an fd we own; only this thread's
                // network namespace changes.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A socket created in this namespace as UID `fsuid` (what iptables'
    /// owner match sees), for a connect from anywhere.
    pub fn socket_as(&self, fsuid: u32) -> TcpSocket {
        self.run_in(|| {
            // The raw syscall changes only this thread's filesystem UID,
            // which the socket file inherits; the thread ends right after.
            // SAFETY: plain syscall, no memory involved.
            unsafe { libc::syscall(libc::SYS_setfsuid, fsuid as libc::c_long) };
            TcpSocket::new_v4().unwrap()
        })
    }

    pub fn socket(&self) -> TcpSocket {
        self.run_in(|| TcpSocket::new_v4().unwrap())
    }

    pub fn listen(&self, addr: &str) -> TcpListener {
        let std = self.run_in(|| std::net::TcpListener::bind(addr).unwrap());
        std.set_nonblocking(true).unwrap();
        TcpListener::from_std(std).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
