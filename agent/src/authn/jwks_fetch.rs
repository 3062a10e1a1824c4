//! A JWKS fetched by URI and cached.
//!
//! Rules (also in `docs/authentication.md`):
//! - Keys are fresh for the response's `Cache-Control: max-age`, clamped to
//!   [`JwksFetchConfig::min_max_age`, `max_max_age`] (30 s – 24 h);
//!   `no-cache`/`no-store` count as the minimum; no header means
//!   [`JwksFetchConfig::default_max_age`] (5 min). Stale keys are refetched on
//!   the next request that needs them; concurrent requests share one fetch.
//! - A token naming a `kid` the keys do not have triggers a refetch, at most
//!   once per [`JwksFetchConfig::min_refetch_interval`] (30 s): a stream of
//!   tokens with made-up kids costs the identity provider one request per
//!   interval, not one per token.
//! - A failed fetch (connection, timeout, non-200, body too large, invalid or
//!   private-key-bearing JWKS) keeps the last good keys for
//!   [`JwksFetchConfig::max_stale`] past their freshness; after that, or if no
//!   fetch ever succeeded, keys are unavailable and tokens are refused
//!   (fail closed). Failed fetches are retried at most once per
//!   [`JwksFetchConfig::retry_after_failure`].
//! - `http://` works as is. `https://` needs a rustls client configuration
//!   ([`JwksFetcher::with_tls`]), which decides which CAs are trusted; without
//!   one, an https URI is refused with a clear error. Redirects are not
//!   followed and proxies are not used.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::Clock;
use super::jwks::{KeySet, MAX_JWKS_BYTES};

/// Tunables of [`JwksFetcher`]; the defaults are the documented behaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksFetchConfig {
    /// Freshness when the response has no usable `Cache-Control: max-age`.
    pub default_max_age: Duration,
    /// Lower clamp of `max-age`.
    pub min_max_age: Duration,
    /// Upper clamp of `max-age`.
    pub max_max_age: Duration,
    /// At most one refetch per this interval because of an unknown `kid`.
    pub min_refetch_interval: Duration,
    /// After a failed fetch, no new attempt for this long.
    pub retry_after_failure: Duration,
    /// How long past their freshness the last good keys stay usable while
    /// fetches fail.
    pub max_stale: Duration,
    /// Whole fetch: connect, TLS, request, body.
    pub timeout: Duration,
}

impl Default for JwksFetchConfig {
    fn default() -> Self {
        JwksFetchConfig {
            default_max_age: Duration::from_secs(300),
            min_max_age: Duration::from_secs(30),
            max_max_age: Duration::from_secs(24 * 3600),
            min_refetch_interval: Duration::from_secs(30),
            retry_after_failure: Duration::from_secs(5),
            max_stale: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        }
    }
}

/// No keys can be had from this URI right now; the message says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("JWKS {uri} unavailable: {reason}")]
pub struct KeysUnavailable {
    pub uri: String,
    pub reason: String,
}

#[derive(Debug)]
struct Target {
    https: bool,
    /// Host without IPv6 brackets, for connecting and SNI.
    host: String,
    port: u16,
    /// What goes into the `Host` header.
    authority: String,
    path_and_query: String,
}

#[derive(Debug)]
struct Cached {
    keys: Arc<KeySet>,
    fresh_until: i64,
}

#[derive(Debug, Default)]
struct State {
    current: Option<Cached>,
    /// Start of the last fetch, successful or not.
    last_attempt: Option<i64>,
    /// Why the last fetch failed; `None` after a success.
    last_error: Option<String>,
}

/// The keys behind one JWKS URI.
#[derive(Debug)]
pub struct JwksFetcher {
    uri: String,
    target: Result<Target, String>,
    config: JwksFetchConfig,
    clock: Arc<dyn Clock>,
    tls: Option<Arc<rustls::ClientConfig>>,
    state: Mutex<State>,
    /// Held while fetching: concurrent callers wait for one fetch.
    fetch_lock: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl JwksFetcher {
    /// A fetcher for `uri`. Nothing is fetched until keys are first needed;
    /// an unusable URI makes every request for keys fail.
    pub fn new(uri: &str, config: JwksFetchConfig, clock: Arc<dyn Clock>) -> JwksFetcher {
        JwksFetcher {
            uri: redact_userinfo(uri),
            target: parse_target(uri),
            config,
            clock,
            tls: None,
            state: Mutex::new(State::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// Enables `https://` URIs with this client configuration (its roots are
    /// the CAs trusted for the identity provider).
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> JwksFetcher {
        self.tls = Some(tls);
        self
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn config(&self) -> &JwksFetchConfig {
        &self.config
    }

    /// How many fetches were attempted (metrics, tests).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Usable keys: fresh ones from the cache, else a fetch, else the last
    /// good keys while within `max_stale`.
    pub async fn keys(&self) -> Result<Arc<KeySet>, KeysUnavailable> {
        if let Some(keys) = self.fresh(self.clock.unix_seconds()) {
            return Ok(keys);
        }
        let _fetching = self.fetch_lock.lock().await;
        let now = self.clock.unix_seconds();
        if let Some(keys) = self.fresh(now) {
            return Ok(keys); // another caller fetched while we waited
        }
        let may_fetch = {
            let state = self.state.lock();
            match (state.last_attempt, &state.last_error) {
                (Some(at), Some(_)) => now - at >= secs(self.config.retry_after_failure),
                _ => true,
            }
        };
        if may_fetch {
            self.fetch(now).await;
        }
        self.usable(now)
    }

    /// Called when a token names a `kid` that `seen` does not have: refetch,
    /// unless keys changed since `seen` was handed out or the last fetch was
    /// less than `min_refetch_interval` ago. Answers the keys to try again
    /// with (possibly still `seen`).
    pub async fn keys_after_unknown_kid(
        &self,
        seen: &Arc<KeySet>,
    ) -> Result<Arc<KeySet>, KeysUnavailable> {
        let _fetching = self.fetch_lock.lock().await;
        let now = self.clock.unix_seconds();
        let (changed, may_fetch) = {
            let state = self.state.lock();
            let changed = state
                .current
                .as_ref()
                .is_some_and(|c| !Arc::ptr_eq(&c.keys, seen));
            let may_fetch = state
                .last_attempt
                .is_none_or(|at| now - at >= secs(self.config.min_refetch_interval));
            (changed, may_fetch)
        };
        if !changed && may_fetch {
            self.fetch(now).await;
        }
        self.usable(now)
    }

    fn fresh(&self, now: i64) -> Option<Arc<KeySet>> {
        let state = self.state.lock();
        let current = state.current.as_ref()?;
        (now < current.fresh_until).then(|| current.keys.clone())
    }

    fn usable(&self, now: i64) -> Result<Arc<KeySet>, KeysUnavailable> {
        let state = self.state.lock();
        if let Some(current) = &state.current
            && now
                < current
                    .fresh_until
                    .saturating_add(secs(self.config.max_stale))
        {
            return Ok(current.keys.clone());
        }
        let reason = match (&state.last_error, &state.current) {
            (Some(e), None) => e.clone(),
            (Some(e), Some(_)) => format!("{e}; the last good keys are too old to use"),
            (None, _) => "no keys fetched yet".to_owned(),
        };
        Err(KeysUnavailable {
            uri: self.uri.clone(),
            reason,
        })
    }

    /// One fetch; records the outcome in the state. Caller holds `fetch_lock`.
    async fn fetch(&self, now: i64) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.state.lock().last_attempt = Some(now);
        let outcome = match &self.target {
            Err(e) => Err(e.clone()),
            Ok(target) => match tokio::time::timeout(self.config.timeout, self.get(target)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no complete answer within {:?}",
                    self.config.timeout
                )),
            },
        };
        let outcome = outcome.and_then(|(body, max_age)| {
            KeySet::from_json(&body)
                .map(|keys| (keys, max_age))
                .map_err(|e| e.to_string())
        });
        let mut state = self.state.lock();
        match outcome {
            Ok((keys, max_age)) => {
                let max_age = match max_age {
                    Some(age) => {
                        age.clamp(secs(self.config.min_max_age), secs(self.config.max_max_age))
                    }
                    None => secs(self.config.default_max_age),
                };
                tracing::debug!(uri = %self.uri, keys = keys.len(), skipped = keys.skipped(), max_age, "JWKS fetched");
                state.current = Some(Cached {
                    keys: Arc::new(keys),
                    fresh_until: now + max_age,
                });
                state.last_error = None;
            }
            Err(reason) => {
                tracing::warn!(uri = %self.uri, %reason, "JWKS fetch failed");
                state.last_error = Some(reason);
            }
        }
    }

    /// GET the document: its body and `max-age` in seconds, if any.
    async fn get(&self, target: &Target) -> Result<(Bytes, Option<i64>), String> {
        if target.https && self.tls.is_none() {
            return Err(
                "https JWKS URIs need a TLS client configuration (trusted CAs) and none is set"
                    .to_owned(),
            );
        }
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let request = Request::get(target.path_and_query.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .header(header::USER_AGENT, "palisade-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        if target.https {
            let Some(tls) = &self.tls else {
                return Err("no TLS client configuration".to_owned());
            };
            let name = rustls_pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(TokioIo::new(stream), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
    }
}

/// One HTTP/1.1 request on `io`; the connection is driven in this future, so
/// a timeout around it leaves nothing behind.
async fn exchange<I>(io: I, request: Request<Empty<Bytes>>) -> Result<(Bytes, Option<i64>), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let response = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let max_age = max_age(response.headers());
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((body, max_age))
    };
    tokio::select! {
        result = response => result,
        closed = conn => Err(match closed {
            Ok(()) => "connection closed before the response".to_owned(),
            Err(e) => format!("HTTP connection: {e}"),
        }),
    }
}

/// `max-age` of `Cache-Control` in seconds; `no-cache`/`no-store` are 0 (the
/// caller clamps to the minimum). Several headers or directives: the smallest.
fn max_age(headers: &http::HeaderMap) -> Option<i64> {
    let mut age: Option<i64> = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            let this = if directive == "no-cache" || directive == "no-store" {
                Some(0)
            } else if let Some(n) = directive.strip_prefix("max-age=") {
                n.trim_matches('"')
                    .parse::<u64>()
                    .ok()
                    .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
            } else {
                None
            };
            if let Some(this) = this {
                age = Some(age.map_or(this, |a| a.min(this)));
            }
        }
    }
    age
}

fn parse_target(uri: &str) -> Result<Target, String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("invalid JWKS URI: {e}"))?;
    let https = match parsed.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("JWKS URI must be http:// or https://".to_owned()),
    };
    let authority = parsed.authority().ok_or("JWKS URI has no host")?;
    if authority.as_str().contains('@') {
        return Err("JWKS URI must not carry credentials".to_owned());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err("JWKS URI has no host".to_owned());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    Ok(Target {
        https,
        host,
        port,
        authority: authority.as_str().to_owned(),
        path_and_query,
    })
}

/// The URI as it may appear in errors and logs: any `user:password@` removed.
fn redact_userinfo(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://***@{}", &uri[..scheme_end], &rest[at + 1..]),
        None => uri.to_owned(),
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::ManualClock;
    use crate::authn::test_support::*;

    const T0: i64 = 1_700_000_000;

    fn fetcher(uri: &str, clock: &Arc<ManualClock>) -> JwksFetcher {
        JwksFetcher::new(uri, JwksFetchConfig::default(), clock.clone())
    }

    #[tokio::test]
    async fn caches_for_max_age_clamped() {
        let key = TestKey::ec("a");
        let server = JwksServer::start(jwks_json(&[&key])).await;
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&server.uri(), &clock);

        // No Cache-Control: 300 s.
        assert!(f.keys().await.unwrap().has_kid("a"));
        clock.advance(299);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 1);
        clock.advance(1);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 2);

        // max-age=5 is clamped up to 30 s.
        server.set_cache_control(Some("public, max-age=5"));
        clock.advance(300);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 3);
        clock.advance(29);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 3);
        clock.advance(1);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 4);

        // max-age of a week is clamped down to 24 h.
        server.set_cache_control(Some("max-age=604800"));
        clock.advance(30);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 5);
        clock.advance(24 * 3600 - 1);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 5);
        clock.advance(1);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 6);
        assert_eq!(f.fetch_count(), 6);
    }

    #[test]
    fn cache_control_parsing() {
        let parse = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(header::CACHE_CONTROL, v.parse().unwrap());
            }
            max_age(&h)
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["public"]), None);
        assert_eq!(parse(&["public, Max-Age=600"]), Some(600));
        assert_eq!(parse(&["max-age=600, no-cache"]), Some(0));
        assert_eq!(parse(&["max-age=600", "max-age=60"]), Some(60));
        assert_eq!(parse(&["max-age=junk"]), None);
    }

    #[tokio::test]
    async fn unknown_kid_refetch_is_rate_bounded() {
        let key = TestKey::ec("a");
        let server = JwksServer::start(jwks_json(&[&key])).await;
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&server.uri(), &clock);
        let seen = f.keys().await.unwrap();
        assert_eq!(server.hits(), 1);

        // Within 30 s of the last fetch: no refetch, however many unknown kids.
        clock.advance(10);
        for _ in 0..20 {
            let keys = f.keys_after_unknown_kid(&seen).await.unwrap();
            assert!(Arc::ptr_eq(&keys, &seen));
        }
        assert_eq!(server.hits(), 1);

        // 30 s after the last fetch: one refetch, then quiet again.
        clock.advance(20);
        let after = f.keys_after_unknown_kid(&seen).await.unwrap();
        assert_eq!(server.hits(), 2);
        assert!(!Arc::ptr_eq(&after, &seen));
        // A caller still holding the old set gets the new one without a fetch.
        f.keys_after_unknown_kid(&seen).await.unwrap();
        f.keys_after_unknown_kid(&after).await.unwrap();
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn failure_keeps_last_good_keys_until_max_stale() {
        let key = TestKey::ec("a");
        let server = JwksServer::start(jwks_json(&[&key])).await;
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&server.uri(), &clock);
        f.keys().await.unwrap();

        server.set_status(503);
        clock.advance(300); // stale
        assert!(f.keys().await.unwrap().has_kid("a"), "stale keys served");
        assert_eq!(server.hits(), 2);
        // Failed fetches are not retried more than once per 5 s.
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 2);
        clock.advance(5);
        f.keys().await.unwrap();
        assert_eq!(server.hits(), 3);

        // One hour past freshness: nothing usable.
        clock.advance(3600 - 5);
        let err = f.keys().await.unwrap_err();
        assert!(err.reason.contains("503"), "{err}");
        assert!(err.reason.contains("too old"), "{err}");

        // Recovery.
        server.set_status(200);
        clock.advance(5);
        assert!(f.keys().await.is_ok());
    }

    #[tokio::test]
    async fn refuses_a_jwks_with_private_keys_and_keeps_the_old_one() {
        let key = TestKey::ec("a");
        let server = JwksServer::start(jwks_json(&[&key])).await;
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&server.uri(), &clock);
        f.keys().await.unwrap();
        let mut leaked = key.jwk();
        leaked["d"] = "AAAA".into();
        server.set_body(serde_json::json!({ "keys": [leaked] }).to_string());
        clock.advance(300);
        assert!(f.keys().await.unwrap().has_kid("a"));
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn unreachable_and_unsupported_uris_are_unavailable() {
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&dead_uri().await, &clock);
        let err = f.keys().await.unwrap_err();
        assert!(err.reason.contains("connect"), "{err}");

        let f = fetcher("https://idp.example/jwks", &clock);
        let err = f.keys().await.unwrap_err();
        assert!(err.reason.contains("TLS client configuration"), "{err}");

        for bad in ["ftp://x/jwks", "/jwks", "http://user:pw@x/jwks"] {
            let err = fetcher(bad, &clock).keys().await.unwrap_err();
            assert!(err.reason.contains("JWKS URI"), "{bad}: {err}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    #[tokio::test]
    async fn https_with_a_configured_ca() {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&ca_key).unwrap();
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca_key.serialize_der()));

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = jwks_json(&[&TestKey::ed("t")]);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from(body)),
                    ))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let clock = Arc::new(ManualClock::new(T0));
        let f = fetcher(&format!("https://localhost:{port}/jwks"), &clock)
            .with_tls(Arc::new(client_cfg));
        assert!(f.keys().await.unwrap().has_kid("t"));
        server.abort();
    }
}
