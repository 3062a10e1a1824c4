//! A real PostgreSQL server for the tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port (its unix socket in the same
//! directory, trust authentication, no fsync), killed when the last test
//! using it lets go. Tests running at the same time share one server and
//! each gets a database of its own.
//!
//! The binaries come from `PALISADE_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout), else `pg_config --bindir`.
//! Run as root, the server runs as the `postgres` user (PostgreSQL refuses
//! root). Without the binaries the PostgreSQL tests are skipped with a note,
//! unless `PALISADE_REQUIRE_POSTGRES=1`, which makes that a failure.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// A running `postgres`, stopped on drop.
pub struct PgServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

static SHARED: tokio::sync::Mutex<Weak<PgServer>> = tokio::sync::Mutex::const_new(Weak::new());
static DATABASES: AtomicU64 = AtomicU64::new(0);

impl PgServer {
    /// The server the running tests share, started if none is; `None` (with
    /// a note on stderr) when PostgreSQL is not installed and not required.
    pub async fn shared() -> Option<Arc<PgServer>> {
        let mut shared = SHARED.lock().await;
        if let Some(server) = shared.upgrade() {
            return Some(server);
        }
        let bin = match find_bin() {
            Some(bin) => bin,
            None if required() => panic!(
                "PALISADE_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries were found \
                 (set PALISADE_PG_BIN, or install Debian's `postgresql`)"
            ),
            None => {
                eprintln!(
                    "note: PostgreSQL server binaries not found (PALISADE_PG_BIN, \
                     /usr/lib/postgresql/*/bin, pg_config): skipping the PostgreSQL half"
                );
                return None;
            }
        };
        let server = Arc::new(Self::start(&bin).await);
        *shared = Arc::downgrade(&server);
        Some(server)
    }

    /// A new server from `bin`; panics with the server's log if it cannot
    /// start.
    pub async fn start(bin: &Path) -> PgServer {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::start_once(bin).await {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start PostgreSQL: {last_error}");
    }

    async fn start_once(bin: &Path) -> Result<PgServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("palisade-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let owner = server_user()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.path().display()))?;
        }
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");

        let output = as_server_user(Command::new(bin.join("initdb")), owner, dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }

        let port = free_port();
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(&log, Some(uid), Some(gid));
        }
        let child = as_server_user(Command::new(bin.join("postgres")), owner, dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn postgres: {e}"))?;
        let mut server = PgServer {
            child: Some(child),
            port,
            dir,
        };

        // Ready once it accepts a connection (bounded).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = server.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "postgres exited ({status}) on port {port}:\n{}",
                    server.log()
                ));
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_postgres::connect(&server.conninfo("postgres"), NoTls),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres never accepted a connection:\n{}",
                    server.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn conninfo(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} connect_timeout=5",
            self.port
        )
    }

    /// `postgres://` address of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database; its `postgres://` address.
    pub async fn create_database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) = tokio_postgres::connect(&self.conninfo("postgres"), NoTls)
            .await
            .expect("connect to the test server");
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        self.url(&name)
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGQUIT: immediate shutdown, the postmaster takes its backends
        // with it (SIGKILL would leave them behind for a while).
        let signalled = Command::new("kill")
            .args(["-QUIT", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // Not signalled: straight to SIGKILL.
        let grace = if signalled {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn required() -> bool {
    std::env::var("PALISADE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PALISADE_PG_BIN") {
        let dir = PathBuf::from(dir);
        return has_server(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    has_server(&dir).then_some(dir)
}

/// (uid, gid) of `postgres` when running as root; `None` to run as
/// ourselves.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("/proc/self: {e}"))?;
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&"postgres") || fields.len() < 4 {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        })
        .map(Some)
        .ok_or_else(|| "running as root and there is no `postgres` user to run the server".into())
}

fn as_server_user(mut command: Command, owner: Option<(u32, u32)>, dir: &Path) -> Command {
    // The server user may not be allowed into the test's directory.
    command.current_dir(dir);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
        command.env("HOME", "/tmp");
    }
    command
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
