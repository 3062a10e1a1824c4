//! Helpers shared by the end-to-end tests: finding the workspace binaries,
//! running them as child processes (killed on drop, output captured), the
//! operator's start-up handshake, the agent's admin endpoint, and an HTTP/2
//! server/client pair over the agent library's mesh TLS configs.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_agent::identity::{CertStore, IdentityClient, IdentityClientConfig, TokenSource};
use palisade_agent::tls::{MeshTrust, MtlsMode, SharedTrustBundle, TrustBundle};
use palisade_policy::identity::SpiffeId;
use palisade_policy::spiffe_cert::CertificateSummary;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The operator's own identity with the default `--namespace`.
pub const OPERATOR_ID: &str = "spiffe://cluster.local/ns/palisade-system/sa/palisade-operator";

/// A binary of this workspace, built next to the test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.file_name().is_some_and(|n| n == "deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("the test executable has no parent directory");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} does not exist. The end-to-end tests run the workspace's binaries; build them \
         first: `cargo test --workspace` (or `cargo build --workspace` with the same profile \
         before `cargo test -p palisade-e2e`).",
        path.display()
    );
    path
}

/// A loopback address nothing listens on at the moment of the call: bind
/// port 0, read the port, close the listener.
pub fn free_port() -> SocketAddr {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// A child process whose stdout and stderr are collected line by line, and
/// which is killed (and reaped) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), lines.clone(), "");
        collect(
            child.stderr.take().expect("stderr"),
            lines.clone(),
            "[stderr] ",
        );
        Self {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// Waits until a line of output satisfies `pred`, and returns it.
    pub async fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return Ok(line.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads drain what is left.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    self.transcript()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} printed no such line within {timeout:?}:\n{}",
                    self.name,
                    self.transcript()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process printed so far (the last 200 lines).
    pub fn transcript(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let skip = lines.len().saturating_sub(200);
        lines[skip..].join("\n")
    }

    pub fn lines_matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }

    /// SIGKILL and reap; no chance to clean up, like a crashed pod.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Sends SIGTERM (what the kubelet sends before killing a container).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>, prefix: &str) {
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            into.lock().unwrap().push(format!("{prefix}{line}"));
        }
    });
}

/// `TOKEN NAMESPACE SERVICEACCOUNT` lines, the operator's local token file.
pub fn write_tokens(path: &Path, tokens: &[(&str, &str, &str)]) {
    let mut text = String::from("# token namespace serviceaccount\n");
    for (t, ns, sa) in tokens {
        text.push_str(&format!("{t} {ns} {sa}\n"));
    }
    std::fs::write(path, text).expect("write token file");
}

/// `palisade-operator ca init`: creates the CA in `state_dir/ca/` and returns
/// the trust bundle's path, so agents can be given it before the operator runs.
pub fn ca_init(state_dir: &Path) -> PathBuf {
    let out = Command::new(workspace_bin("palisade-operator"))
        .args(["ca", "init", "--state-dir"])
        .arg(state_dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run palisade-operator ca init");
    assert!(
        out.status.success(),
        "ca init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = state_dir.join("ca").join("trust-bundle.pem");
    assert!(
        bundle.is_file(),
        "{} missing after ca init",
        bundle.display()
    );
    bundle
}

/// `serve` flags for a `dir:` policy source, polled every 100 ms.
pub fn dir_source_flags(dir: &Path) -> Vec<String> {
    vec![
        "--source".into(),
        format!("dir:{}", dir.display()),
        "--source-poll-interval".into(),
        "100ms".into(),
    ]
}

/// A running `palisade-operator serve` in local mode.
pub struct Operator {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub bundle: PathBuf,
}

impl Operator {
    /// Starts the operator and waits for its two start-up lines.
    pub async fn start(
        state_dir: &Path,
        tokens: &Path,
        listen: SocketAddr,
        cert_ttl: &str,
    ) -> Self {
        Self::start_with(state_dir, tokens, listen, cert_ttl, &[]).await
    }

    /// [`Operator::start`] with more `serve` flags (e.g. `--source dir:…`).
    pub async fn start_with(
        state_dir: &Path,
        tokens: &Path,
        listen: SocketAddr,
        cert_ttl: &str,
        extra: &[String],
    ) -> Self {
        let mut cmd = Command::new(workspace_bin("palisade-operator"));
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--tokens")
            .arg(tokens)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--cert-ttl")
            .arg(cert_ttl)
            // Tests run in parallel: no fixed admin port 15014.
            .args(["--admin", "127.0.0.1:0"])
            .args(extra)
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("palisade-operator", cmd);
        const LISTENING: &str = "palisade-operator listening on ";
        const BUNDLE: &str = "palisade-operator trust bundle ";
        let line = proc
            .wait_for_line(Duration::from_secs(20), |l| l.starts_with(LISTENING))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr: SocketAddr = line[LISTENING.len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        let line = proc
            .wait_for_line(Duration::from_secs(1), |l| l.starts_with(BUNDLE))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let bundle = PathBuf::from(line[BUNDLE.len()..].trim());
        assert!(bundle.is_file(), "{line}: no such file");
        Self { proc, addr, bundle }
    }

    /// [`Operator::start`] on an ephemeral port, with its state in
    /// `dir/state` and `tokens` written to the token file `dir/tokens`.
    pub async fn start_in(dir: &Path, tokens: &[(&str, &str, &str)], cert_ttl: &str) -> Self {
        let token_file = dir.join("tokens");
        write_tokens(&token_file, tokens);
        let listen = "127.0.0.1:0".parse().expect("loopback address");
        Self::start(&dir.join("state"), &token_file, listen, cert_ttl).await
    }

    /// Mesh trust in [`TRUST_DOMAIN`] anchored in the operator's bundle.
    pub fn trust(&self) -> MeshTrust {
        let bundle = TrustBundle::from_pem_file(&self.bundle).expect("operator bundle");
        MeshTrust::new(SharedTrustBundle::new(bundle), TRUST_DOMAIN).expect("mesh trust")
    }

    /// A client of this operator's identity service presenting `token`,
    /// requiring the server to be [`OPERATOR_ID`], with a 5 s timeout.
    pub fn identity_client(&self, trust: MeshTrust, token: TokenSource) -> IdentityClient {
        let mut config = IdentityClientConfig::new(self.addr.to_string(), token);
        config.operator_id = Some(SpiffeId::parse(OPERATOR_ID).expect("operator ID"));
        config.timeout = Duration::from_secs(5);
        IdentityClient::new(config, trust).expect("identity client")
    }
}

/// Plain HTTP/1.1 GET (the agent's admin endpoint): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fetch = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| std::io::Error::other(format!("GET {path} on {addr} timed out")))?
}

/// The value of an unlabelled sample in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// The value of `name` in a `tracing` text record (`name=value` or
/// `name="value"`), without quotes.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let start = line
        .match_indices(&format!("{name}="))
        .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?
        .0
        + name.len()
        + 1;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted.find('"')?;
        Some(quoted[..end].to_owned())
    } else {
        Some(rest.split(' ').next().unwrap_or_default().to_owned())
    }
}

/// DER to PEM (base64 with 64-column lines), for handing certificates to tools.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn serial_of(der: &[u8]) -> String {
    CertificateSummary::parse(der)
        .expect("X.509 certificate")
        .serial_hex
}

/// An HTTP/2 server over the agent's inbound TLS config (strict mTLS). Every
/// response body is `<client SPIFFE ID> <client certificate serial>`, both
/// from the connection's verified handshake.
pub async fn start_h2_server(trust: MeshTrust, store: Arc<CertStore>) -> SocketAddr {
    let config = trust
        .server_config(store, MtlsMode::Strict)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let trust = trust.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(Some(peer)) = trust.peer_identity(&tls) else {
                    return;
                };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| serial_of(c.as_ref()))
                    .unwrap_or_default();
                let body = format!("{peer} {serial}");
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

pub type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// A new HTTP/2 connection over the agent's outbound TLS config, requiring
/// the server to be `server_id`; returns the sender and the serial of the
/// certificate the server presented.
pub async fn h2_connect(
    addr: SocketAddr,
    trust: &MeshTrust,
    store: Arc<CertStore>,
    server_id: &str,
) -> Result<(H2Sender, String), String> {
    let config = trust
        .client_config(
            Some(store),
            Some(SpiffeId::parse(server_id).map_err(|e| e.to_string())?),
        )
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("mesh.invalid").expect("name"), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if tls.get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
        return Err("ALPN did not select h2".into());
    }
    let server_serial = serial_of(
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no server certificate")?
            .as_ref(),
    );
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok((send, server_serial))
}

/// One GET; the body on 200.
pub async fn h2_get(send: &mut H2Sender) -> Result<String, String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get("http://mesh.invalid/")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    String::from_utf8(body.to_bytes().to_vec()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_rustls() {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        for len in [0usize, 1, 2, 3, 4, 47, 48, 49, 500] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            if len == 0 {
                continue;
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect(&pem);
            assert_eq!(back.as_ref(), der.as_slice(), "{pem}");
        }
        assert_eq!(
            pem_encode("X", b"Man"),
            "-----BEGIN X-----\nTWFu\n-----END X-----\n"
        );
        assert_eq!(
            pem_encode("X", b"Ma"),
            "-----BEGIN X-----\nTWE=\n-----END X-----\n"
        );
    }

    #[test]
    fn reads_metric_samples() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total 3\nb -1.5\n";
        assert_eq!(metric(text, "a_total"), Some(3.0));
        assert_eq!(metric(text, "b"), Some(-1.5));
        assert_eq!(metric(text, "a"), None);
        assert_eq!(metric(text, "HELP"), None);
    }
}

/// Runs a test's `scenario`, failing it if it takes longer than `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, scenario: F) -> F::Output {
    tokio::time::timeout(limit, scenario)
        .await
        .unwrap_or_else(|e| panic!("the scenario took longer than {} s: {e:?}", limit.as_secs()))
}

/// Polls `check` every 100 ms until it returns `Ok`; after `timeout`,
/// panics with what `fail` makes of the last `Err`.
pub async fn poll_until<T, E, Fut>(
    timeout: Duration,
    mut check: impl FnMut() -> Fut,
    fail: impl FnOnce(E) -> String,
) -> T
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("{}", fail(last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a test app speaks.
#[derive(Clone, Copy, Debug)]
pub enum AppHttp {
    /// HTTP/1.1 only; a handler may take a connection over with
    /// `hyper::upgrade::on` (e.g. a WebSocket app).
    H1,
    /// HTTP/1.1 or h2c, whichever the client speaks.
    Auto,
    /// h2c only (HTTP/2 with prior knowledge), as a gRPC server.
    H2,
}

/// A test app on an ephemeral loopback port, served in the background:
/// every request is answered by `handler(state.clone(), request)`. Its
/// address.
pub async fn serve_app<S, F, Fut, B>(http: AppHttp, state: S, handler: F) -> SocketAddr
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (state, handler) = (state.clone(), handler.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(state.clone(), req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let io = TokioIo::new(tcp);
                // The app's side of a connection's end is of no interest.
                match http {
                    AppHttp::H1 => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                    AppHttp::Auto => {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    }
                    AppHttp::H2 => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}
