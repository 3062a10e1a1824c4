//! The inbound proxy, explicit mode (DESIGN §6): listen on one address with
//! the agent's mTLS server config, run every request through the pipeline
//! and the policy engine, and forward what is allowed to one application
//! address over plaintext HTTP/1.1. What works and what does not yet is in
//! `docs/pipeline.md` ("Inbound proxy (explicit mode)").
//!
//! Per request, in order: [`strip`](crate::pipeline::strip) (ambiguous →
//! 400), [`request_id`](crate::pipeline::request_id), JWT / API-key
//! verification when the policy configures them, `PolicyEngine::decide`
//! (which normalizes the path), then either the fixed deny response or the
//! forward with the normalized path, the original query and XFCC; rate-limit
//! and deprecation headers go on the response either way.
//!
//! Never panics on peer input: every failure becomes a logged connection
//! close or a fixed deny body.

pub mod policy;

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use palisade_policy::identity::SpiffeId;
use palisade_policy::ratelimit::RateLimitOutcome;
use palisade_policy::wire;
use palisade_policy::{Request as EngineRequest, RequestTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::identity::CertStore;
use crate::pipeline::deny::deny_response;
use crate::pipeline::request_id::ensure_request_id;
use crate::pipeline::response_headers::apply_response_headers;
use crate::pipeline::strip::strip_inbound;
use crate::pipeline::xfcc::{PeerCert, set_xfcc};
use crate::ratelimit::headers::{STORE_UNAVAILABLE_RETRY_AFTER_SECS, insert_rate_limit_headers};
use crate::tls::{MeshTrust, MtlsMode, TlsConfigError, peer_identity};

pub use policy::{LoadedPolicy, SharedPolicy};

/// The response body the proxy sends: the app's, streamed, or a fixed one.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the proxy needs besides the listening socket.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// The application, reached over plaintext HTTP/1.1.
    pub app: SocketAddr,
    pub trust: MeshTrust,
    /// Our certificate (also our SPIFFE ID for XFCC `By=`).
    pub certs: Arc<CertStore>,
    pub policy: SharedPolicy,
    /// Longest a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest connecting to the app may take before answering 502.
    pub app_connect_timeout: Duration,
}

impl InboundConfig {
    pub fn new(
        app: SocketAddr,
        trust: MeshTrust,
        certs: Arc<CertStore>,
        policy: SharedPolicy,
    ) -> Self {
        Self {
            app,
            trust,
            certs,
            policy,
            handshake_timeout: Duration::from_secs(10),
            app_connect_timeout: Duration::from_secs(5),
        }
    }
}

struct Shared {
    config: InboundConfig,
    strict: TlsAcceptor,
    permissive: TlsAcceptor,
    started: Instant,
}

/// The verified peer of one connection.
struct ConnInfo {
    peer_addr: IpAddr,
    peer: Option<(SpiffeId, Option<Vec<u8>>)>,
}

/// A bound inbound listener; [`run`](Self::run) serves it.
pub struct InboundProxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl InboundProxy {
    pub async fn bind(listen: SocketAddr, config: InboundConfig) -> anyhow::Result<Self> {
        let tls = |mode| -> Result<TlsAcceptor, TlsConfigError> {
            let certs = config.certs.clone();
            Ok(TlsAcceptor::from(Arc::new(
                config.trust.server_config(certs, mode)?,
            )))
        };
        let shared = Arc::new(Shared {
            strict: tls(MtlsMode::Strict)?,
            permissive: tls(MtlsMode::Permissive)?,
            config,
            started: Instant::now(),
        });
        let listener = TcpListener::bind(listen).await?;
        Ok(Self { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    let shared = self.shared.clone();
                    tokio::spawn(connection(shared, tcp, peer));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off, never exit.
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The mTLS mode for the app port: the policy's, strict without a policy.
fn mtls_mode(shared: &Shared) -> MtlsMode {
    match shared.config.policy.current() {
        Some(p) if p.engine.mtls_mode(shared.config.app.port()) == wire::MtlsMode::Permissive => {
            MtlsMode::Permissive
        }
        _ => MtlsMode::Strict,
    }
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer_addr: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let mode = mtls_mode(&shared);
    if mode == MtlsMode::Permissive {
        // Permissive: plaintext HTTP is served too, without an identity.
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
                let info = ConnInfo {
                    peer_addr: peer_addr.ip(),
                    peer: None,
                };
                serve(shared, TokioIo::new(tcp), info).await;
                return;
            }
            Ok(Ok(1)) => {}
            _ => return,
        }
    }
    let acceptor = match mode {
        MtlsMode::Strict => &shared.strict,
        MtlsMode::Permissive => &shared.permissive,
    };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer_addr, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer_addr, "inbound handshake timed out");
            return;
        }
    };
    let conn = tls.get_ref().1;
    let peer = match peer_identity(conn, shared.config.trust.trust_domain()) {
        Ok(id) => id.map(|id| {
            let der = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            (id, der)
        }),
        Err(e) => {
            tracing::debug!(peer = %peer_addr, error = %e, "no usable peer identity");
            return;
        }
    };
    let info = ConnInfo {
        peer_addr: peer_addr.ip(),
        peer,
    };
    serve(shared, TokioIo::new(tls), info).await;
}

async fn serve<IO>(shared: Arc<Shared>, io: TokioIo<IO>, info: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &info, req).await) }
    });
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "inbound connection ended with an error");
    }
}

fn full(body: Vec<u8>) -> ProxyBody {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed()
}

fn deny(status: u16, request_id: &str, www_authenticate: bool) -> Response<ProxyBody> {
    deny_response(status, request_id, www_authenticate).map(full)
}

/// What the engine decided, owned, so the request can be changed afterwards.
struct Outcome {
    allowed: bool,
    status: u16,
    path: Option<String>,
    query: Option<String>,
    rate_limit: Option<RateLimitOutcome>,
    /// `scope: global` limits matched; `true` if any fails closed.
    global: Option<bool>,
    response_headers: Vec<(&'static str, String)>,
    /// A rule this proxy cannot enforce yet matched: the request is refused
    /// rather than passed unchecked (fail closed).
    unenforceable: Option<&'static str>,
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Body rules this proxy does not enforce yet (JSON Schema, a size limit on a
/// body of unknown length, response masking): naming one makes the request
/// fail closed instead of passing unchecked.
fn unenforceable_rule(
    d: &palisade_policy::Decision<'_, '_>,
    headers: &http::HeaderMap,
) -> Option<&'static str> {
    if let Some(body) = d.body {
        if body.schema.is_some() {
            return Some("validation.jsonSchema");
        }
        let length_known = headers.contains_key(http::header::CONTENT_LENGTH);
        if body.max_body_bytes > 0
            && !length_known
            && headers.contains_key(http::header::TRANSFER_ENCODING)
        {
            return Some("validation.maxBodyBytes");
        }
    }
    d.response_mask.is_some().then_some("response")
}

async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    // 1. strip, before anything reads a header.
    let stripped = strip_inbound(req.headers_mut());
    // 2. request id.
    let request_id = ensure_request_id(req.headers_mut(), conn.peer.is_some());
    let rid = request_id.to_str().unwrap_or_default();
    if stripped.is_err() {
        return deny(400, rid, false);
    }
    // No policy: fail closed.
    let Some(policy) = shared.config.policy.current() else {
        return deny(403, rid, false);
    };
    let www = policy.accepts_jwt();

    // 3. authenticate.
    let mut credential_error: Option<&'static str> = None;
    let mut claims = None;
    if let Some(jwt) = &policy.jwt {
        match jwt.verify(req.headers()).await {
            Ok(v) => claims = Some(v.claims),
            Err(e) if e.is_missing() => {}
            Err(e) => credential_error = Some(e.code()),
        }
    }
    let mut api_key_client = None;
    if let Some(keys) = &policy.api_keys {
        match keys.verify(req.headers()) {
            Ok(client) => api_key_client = Some(client),
            Err(e) if e.is_missing() => {}
            Err(e) => {
                credential_error.get_or_insert(e.code());
            }
        }
    }

    // 4. decide (normalizes the path).
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let outcome = {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let host = match req.headers().get(HOST) {
            Some(h) => h.to_str().ok(),
            None => authority.as_deref(),
        };
        let request = EngineRequest {
            method: req.method(),
            target,
            host,
            headers: req.headers(),
            port: shared.config.app.port(),
            peer_addr: conn.peer_addr,
            peer: conn.peer.as_ref().map(|(id, _)| id),
            jwt_claims: claims.as_deref(),
            api_key_client,
            credential_error,
            time: RequestTime {
                unix_seconds: unix_seconds(),
                monotonic: shared.started.elapsed(),
            },
        };
        let mut d = policy.engine.decide(&request);
        Outcome {
            allowed: d.verdict.allowed,
            status: d.verdict.status,
            path: d.normalized_path.as_deref().map(str::to_owned),
            query: d.query.map(str::to_owned),
            rate_limit: d.rate_limit.map(|r| r.outcome),
            global: (!d.global_limits.is_empty()).then(|| {
                d.global_limits
                    .iter()
                    .any(|l| l.failure_mode != wire::rate_limit::FailureMode::Open)
            }),
            response_headers: std::mem::take(&mut d.response_headers),
            unenforceable: unenforceable_rule(&d, request.headers),
        }
    };
    if outcome.allowed
        && let Some(what) = outcome.unenforceable
    {
        tracing::warn!(
            request_id = rid,
            rule = what,
            "matched a rule this agent cannot enforce yet; refusing"
        );
        return deny(403, rid, www);
    }
    if !outcome.allowed {
        let mut resp = deny(outcome.status, rid, www);
        if outcome.status == 429
            && let Some(rl) = &outcome.rate_limit
        {
            insert_rate_limit_headers(resp.headers_mut(), rl);
        }
        apply_response_headers(resp.headers_mut(), outcome.response_headers);
        return resp;
    }
    // `scope: global` limits need the shared store, which the inbound proxy
    // does not reach yet: fail as each limit's failure mode says.
    if outcome.global == Some(true) {
        let mut resp = deny(429, rid, www);
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(STORE_UNAVAILABLE_RETRY_AFTER_SECS),
        );
        return resp;
    }

    // 5. forward: the normalized path and the original query, XFCC, HTTP/1.1.
    let Some(path) = outcome.path else {
        return deny(400, rid, false);
    };
    let target = match outcome.query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(pq) = PathAndQuery::try_from(target) else {
        return deny(400, rid, false);
    };
    *req.uri_mut() = Uri::from(pq);
    *req.version_mut() = Version::HTTP_11;
    if !req.headers().contains_key(HOST)
        && let Some(value) = authority.and_then(|a| HeaderValue::try_from(a).ok())
    {
        req.headers_mut().insert(HOST, value);
    }
    match (&conn.peer, shared.config.certs.current()) {
        (Some((id, der)), Some(local)) => set_xfcc(
            req.headers_mut(),
            local.spiffe_id(),
            Some(PeerCert {
                id,
                der: der.as_deref(),
            }),
        ),
        // Plaintext (or no local certificate): no XFCC; strip removed any.
        _ => {
            req.headers_mut()
                .remove(crate::pipeline::strip::X_FORWARDED_CLIENT_CERT);
        }
    }

    let mut resp = match forward(shared, req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => {
            tracing::warn!(app = %shared.config.app, error = %e, "app unreachable");
            return deny(502, rid, false);
        }
    };
    strip_hop_by_hop(resp.headers_mut());
    if let Some(rl) = &outcome.rate_limit {
        insert_rate_limit_headers(resp.headers_mut(), rl);
    }
    apply_response_headers(resp.headers_mut(), outcome.response_headers);
    resp
}

/// One plaintext HTTP/1.1 connection to the app per request (no pool yet).
async fn forward(shared: &Shared, req: Request<Incoming>) -> anyhow::Result<Response<Incoming>> {
    let app = shared.config.app;
    let tcp = tokio::time::timeout(shared.config.app_connect_timeout, TcpStream::connect(app))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "app connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// Hop-by-hop fields of the app's response (RFC 9110 §7.6.1): hyper frames
/// the message to the client itself, and HTTP/2 forbids them.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in nominated {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
    ] {
        headers.remove(name);
    }
    headers.remove(TRANSFER_ENCODING);
}
