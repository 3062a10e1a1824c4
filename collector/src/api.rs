//! The query API (HTTP JSON over TLS, port 15031): what `palisadectl audit`
//! reads.
//!
//! - `GET /v1/events` — stored records, oldest first, filtered by `from`,
//!   `to` (RFC 3339 or Unix microseconds), `source`, `destination`,
//!   `decision`, `route`, `status`, `request_id`, `kind`, `reporter`;
//!   `limit` (≤ 1000) and `after` (the previous page's `next_after`).
//! - `GET /v1/stats` — decision counts by decision, route and source over
//!   `from`/`to`, and the events agents reported lost.
//! - `GET /v1/verify` — the hash chains checked (edited, missing or
//!   reordered batches).
//! - `GET /v1/tail` — records as they are stored, one JSON object per line,
//!   with the same filters as `/v1/events` but the time range.
//!
//! Every request needs a mesh identity the collector allows
//! (`--query-allow`, SPIFFE ID patterns) on a client certificate, or
//! `Authorization: Bearer <token>` matching `--query-token-file` (re-read on
//! every request, so a rotated Secret takes effect at once). An unknown
//! parameter or a bad value is a 400 naming it.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_policy::identity::{SpiffeId, principal_matches};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use crate::event::StoredEvent;
use crate::ingest::{Ingest, LiveBatch};
use crate::metrics::CollectorMetrics;
use crate::store::{EventQuery, StatsQuery};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// Who may read the audit trail.
#[derive(Debug, Clone, Default)]
pub struct QueryAccess {
    /// SPIFFE ID patterns (`spiffe://td/ns/x/sa/*`) of allowed clients.
    pub allowed: Vec<String>,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
}

pub struct QueryApi {
    ingest: Arc<Ingest>,
    access: QueryAccess,
    metrics: Arc<CollectorMetrics>,
}

impl QueryApi {
    pub fn new(ingest: Arc<Ingest>, access: QueryAccess, metrics: Arc<CollectorMetrics>) -> Self {
        Self {
            ingest,
            access,
            metrics,
        }
    }

    /// Serves TLS connections from `listener` until the task is dropped.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        trust_domain: String,
    ) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "query API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let api = self.clone();
            let acceptor = acceptor.clone();
            let trust_domain = trust_domain.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "query API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                // A certificate that fails the SPIFFE rule carries no identity.
                let identity = palisade_agent::tls::server_peer_identity(&tls, &trust_domain)
                    .ok()
                    .flatten();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let api = api.clone();
                    let identity = identity.clone();
                    async move { Ok::<_, Infallible>(api.respond(identity.as_ref(), req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    }

    async fn respond(&self, identity: Option<&SpiffeId>, req: Request<Incoming>) -> Response<Body> {
        if let Err((status, message)) = self.authorize(identity, &req) {
            self.metrics.queries_unauthorized.inc();
            return error(status, message);
        }
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        let params = match Params::parse(req.uri().query().unwrap_or("")) {
            Ok(params) => params,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let store = self.ingest.store();
        match req.uri().path() {
            "/v1/events" => match params.event_query(true) {
                Ok(query) => match store.query(&query).await {
                    Ok(page) => json(
                        StatusCode::OK,
                        &EventsBody {
                            next_after: page.next_after_id,
                            events: page.events,
                        },
                    ),
                    Err(e) => store_error(&e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            },
            "/v1/stats" => match params.stats_query() {
                Ok(query) => match store.stats(&query).await {
                    Ok(stats) => json(StatusCode::OK, &stats),
                    Err(e) => store_error(&e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            },
            "/v1/verify" => match params.expect_none() {
                Ok(()) => match store.verify().await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err(e) => store_error(&e),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            },
            "/v1/tail" => match params.event_query(false) {
                Ok(filter) => self.tail(filter),
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            },
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    fn authorize<B>(
        &self,
        identity: Option<&SpiffeId>,
        req: &Request<B>,
    ) -> Result<(), (StatusCode, &'static str)> {
        if let Some(id) = identity
            && self
                .access
                .allowed
                .iter()
                .any(|p| principal_matches(p, id.as_str()))
        {
            return Ok(());
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "an allowed mesh identity or a bearer token is required",
            ));
        };
        let expected = self
            .access
            .token_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok());
        match expected {
            Some(token) if !token.trim().is_empty() && same(token.trim(), presented.trim()) => {
                Ok(())
            }
            _ => Err((StatusCode::FORBIDDEN, "the bearer token is not valid")),
        }
    }

    fn tail(&self, filter: EventQuery) -> Response<Body> {
        let stream = BroadcastStream::new(self.ingest.subscribe()).filter_map(move |item| {
            let mut out = String::new();
            match item {
                Ok(batch) => {
                    for line in live_lines(&batch, &filter) {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    out.push_str(&format!(
                        "{{\"kind\":\"tail_lagged\",\"missed_batches\":{n}}}\n"
                    ));
                }
            }
            (!out.is_empty()).then(|| Ok::<_, Infallible>(Frame::data(Bytes::from(out))))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"))
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Serialize)]
struct EventsBody {
    events: Vec<crate::event::StoredRow>,
    next_after: Option<i64>,
}

#[derive(Serialize)]
struct LiveRecord<'a> {
    agent_instance_id: &'a str,
    sequence: u64,
    #[serde(flatten)]
    event: &'a StoredEvent,
}

fn live_lines<'a>(
    batch: &'a LiveBatch,
    filter: &'a EventQuery,
) -> impl Iterator<Item = String> + 'a {
    batch
        .events
        .iter()
        .filter(|e| live_matches(e, filter))
        .filter_map(|event| {
            serde_json::to_string(&LiveRecord {
                agent_instance_id: &batch.agent_instance_id,
                sequence: batch.sequence,
                event,
            })
            .ok()
        })
}

/// `/v1/tail`'s filter: the `/v1/events` filters but the time range.
pub fn live_matches(e: &StoredEvent, q: &EventQuery) -> bool {
    let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    q.source
        .as_deref()
        .is_none_or(|s| s == e.source_principal || s == e.source_ip)
        && is(&q.destination, &e.destination_workload)
        && is(&q.decision, &e.decision)
        && is(&q.route, &e.route)
        && is(&q.request_id, &e.request_id)
        && is(&q.kind, e.kind.as_str())
        && is(&q.reporter, &e.reporter)
        && q.status.is_none_or(|s| s == e.status)
}

/// Query parameters, percent-decoded; each may appear once.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Result<Self, String> {
        let mut out: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            if out.iter().any(|(seen, _)| *seen == k) {
                return Err(format!("parameter {k:?} is given twice"));
            }
            out.push((k, v));
        }
        Ok(Self(out))
    }

    fn expect_none(&self) -> Result<(), String> {
        match self.0.first() {
            Some((k, _)) => Err(format!("unknown parameter {k:?}")),
            None => Ok(()),
        }
    }

    fn event_query(&self, with_time: bool) -> Result<EventQuery, String> {
        let mut q = EventQuery::default();
        for (k, v) in &self.0 {
            let text = || Some(v.clone());
            match k.as_str() {
                "from" if with_time => q.from_us = Some(time(k, v)?),
                "to" if with_time => q.to_us = Some(time(k, v)?),
                "after" if with_time => q.after_id = Some(number(k, v)?),
                "limit" if with_time => q.limit = Some(number(k, v)?),
                "source" => q.source = text(),
                "destination" => q.destination = text(),
                "decision" if v == "allow" || v == "deny" => q.decision = text(),
                "decision" => return Err("decision: must be allow or deny".into()),
                "route" => q.route = text(),
                "status" => q.status = Some(number(k, v)?),
                "request_id" => q.request_id = text(),
                "kind" if crate::event::RecordKind::parse(v).is_some() => q.kind = text(),
                "kind" => return Err(format!("kind: {v:?} is not a record kind")),
                "reporter" => q.reporter = text(),
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        Ok(q)
    }

    fn stats_query(&self) -> Result<StatsQuery, String> {
        let mut q = StatsQuery::default();
        for (k, v) in &self.0 {
            match k.as_str() {
                "from" => q.from_us = Some(time(k, v)?),
                "to" => q.to_us = Some(time(k, v)?),
                _ => return Err(format!("unknown parameter {k:?}")),
            }
        }
        Ok(q)
    }
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{name}: {value:?} is not a number"))
}

/// RFC 3339 or Unix microseconds.
fn time(name: &str, value: &str) -> Result<i64, String> {
    if let Ok(us) = value.parse::<i64>() {
        return Ok(us);
    }
    value
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_microsecond())
        .map_err(|_| format!("{name}: {value:?} is neither RFC 3339 nor Unix microseconds"))
}

fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("malformed percent-encoding in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    match serde_json::to_vec(body) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
        Err(_) => Response::new(Full::new(Bytes::new()).boxed()),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn store_error(e: &crate::store::StoreError) -> Response<Body> {
    tracing::error!(error = %e, "query API: the store failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the audit store is unavailable",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_decode_and_name_what_is_wrong() {
        let q = Params::parse("source=spiffe%3A%2F%2Fx&status=403&decision=deny")
            .unwrap()
            .event_query(true)
            .unwrap();
        assert_eq!(q.source.as_deref(), Some("spiffe://x"));
        assert_eq!(q.status, Some(403));
        assert_eq!(q.decision.as_deref(), Some("deny"));
        let err = |s: &str| {
            Params::parse(s)
                .and_then(|p| p.event_query(true))
                .unwrap_err()
        };
        assert!(err("status=abc").starts_with("status:"));
        assert!(err("decision=maybe").starts_with("decision:"));
        assert!(err("colour=red").contains("colour"));
        assert!(err("a=1&a=2").contains("twice"));
        assert!(err("from=yesterday").starts_with("from:"));
        assert!(err("source=%zz").contains("percent"));
    }

    #[test]
    fn times_are_rfc3339_or_microseconds() {
        assert_eq!(time("from", "1000").unwrap(), 1000);
        assert_eq!(time("from", "1970-01-01T00:00:01Z").unwrap(), 1_000_000);
    }

    #[test]
    fn tail_filters_like_the_query() {
        let mut e = StoredEvent::new(crate::event::RecordKind::Decision, 0);
        e.decision = "deny".into();
        e.source_ip = "10.0.0.1".into();
        let q = |s: &str| Params::parse(s).unwrap().event_query(false).unwrap();
        assert!(live_matches(&e, &q("decision=deny&source=10.0.0.1")));
        assert!(!live_matches(&e, &q("decision=allow")));
        assert!(!live_matches(&e, &q("kind=gap")));
        assert!(Params::parse("from=1").unwrap().event_query(false).is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("secret", "secret"));
        assert!(!same("secret", "secreT"));
        assert!(!same("secret", "secret2"));
    }
}
