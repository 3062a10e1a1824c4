//! Body validation and response masking in the inbound proxy, end to end on
//! loopback: mTLS clients in front, a recording HTTP/1.1 + h2c app behind that
//! keeps every body byte it received and answers per path.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::backend::{Http, loopback, serve};
use common::inbound::{TestProxy, header, mesh_policy, route_prefix, shared};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame};
use palisade_policy::wire as pb;
use parking_lot::Mutex;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SSN: &str = "123-45-6789";
const CARD: &str = "4111111111111111";
/// The JSON the app returns on `/account`: two secrets the policy masks.
const ACCOUNT_JSON: &str =
    r#"{"name":"Ada","ssn":"123-45-6789","card":{"number":"4111111111111111","brand":"visa"}}"#;

/// One request as the app received it.
#[derive(Clone, Debug, Default)]
struct Seen {
    method: String,
    target: String,
    headers: HeaderMap,
    /// Every body byte that arrived, also of an aborted body.
    body: Vec<u8>,
    /// `Some(true)`: the body ended cleanly; `Some(false)`: it was aborted.
    ended: Option<bool>,
}

/// A body from a list of chunks, one frame each, of unknown length (so
/// hyper sends it chunked).
struct Chunks(VecDeque<Bytes>);

impl Chunks {
    fn new(parts: impl IntoIterator<Item = Bytes>) -> Self {
        Self(parts.into_iter().collect())
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// A request body the test feeds chunk by chunk; unknown length.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

fn fixed(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into()).map_err(|n| match n {}).boxed()
}

/// The app's answer for a path.
fn app_response(path: &str) -> Response<AppBody> {
    let json = |body: AppBody| {
        Response::builder()
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };
    match path {
        "/account" => {
            let mut r = json(fixed(ACCOUNT_JSON));
            r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            r.headers_mut()
                .insert("content-digest", "sha-256=:AAAA:".parse().unwrap());
            r
        }
        "/account/text" => Response::builder()
            .header("content-type", "text/plain")
            .body(fixed(format!("ssn {SSN}")))
            .unwrap(),
        "/account/gzip" => {
            // Labelled gzip: the agent must not pass bytes it cannot inspect,
            // whatever they really are.
            let mut r = json(fixed(ACCOUNT_JSON));
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            r
        }
        "/account/big" => {
            // ~5 MiB of JSON, chunked (no Content-Length), the secret first.
            let filler = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut parts = vec![Bytes::from(format!(r#"{{"ssn":"{SSN}","pad":[""#))];
            parts.extend(std::iter::repeat_n(filler, 80));
            parts.push(Bytes::from_static(b"\"]}"));
            json(Chunks::new(parts).boxed())
        }
        "/account/dup" => json(fixed(format!(r#"{{"ssn":null,"ssn":"{SSN}"}}"#))),
        _ => Response::new(fixed("app")),
    }
}

/// An HTTP/1.1 and h2c app that records every request and its body bytes as they
/// arrive, then answers per [`app_response`].
#[derive(Clone, Default)]
struct Backend(Arc<Mutex<Vec<Seen>>>);

impl Backend {
    async fn start() -> (Self, SocketAddr) {
        let backend = Backend::default();
        // HTTP/1.1 and h2c: the agent speaks HTTP/2 to the app for HTTP/2
        // clients.
        let addr = serve(
            loopback().await,
            Http::Auto,
            backend.clone(),
            |backend: Backend, req| async move {
                let seen = backend.0;
                let index = {
                    let mut all = seen.lock();
                    all.push(Seen {
                        method: req.method().to_string(),
                        target: req.uri().to_string(),
                        headers: req.headers().clone(),
                        ..Seen::default()
                    });
                    all.len() - 1
                };
                let path = req.uri().path().to_owned();
                let mut body = req.into_body();
                let ended = loop {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(d) = frame.data_ref() {
                                seen.lock()[index].body.extend_from_slice(d);
                            }
                        }
                        Some(Err(_)) => break false,
                        None => break true,
                    }
                };
                seen.lock()[index].ended = Some(ended);
                app_response(&path)
            },
        );
        (backend, addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.lock().clone()
    }

    /// The only request the app got, once its body has ended either way.
    async fn only_request(&self) -> Seen {
        for _ in 0..500 {
            let seen = self.seen();
            assert!(seen.len() <= 1, "{seen:?}");
            if let Some(s) = seen.first().filter(|s| s.ended.is_some()) {
                return s.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the app never finished reading a request: {:?}",
            self.seen()
        );
    }
}

const LIMIT: u64 = 1024;

const PAYMENT_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["amount", "currency"],
  "additionalProperties": false,
  "properties": {
    "amount": {"type": "integer", "minimum": 1},
    "currency": {"enum": ["EUR", "USD"]}
  }
}"#;

/// Mesh default (all authenticated), strict mTLS, and:
/// - `/upload`: at most 1024 body bytes;
/// - `/typed`: JSON bodies only;
/// - `/payments`: a JSON Schema, no size limit of its own;
/// - `/account`: `/ssn` redacted, `/card/number` masked (last 4 shown);
/// - everything else: no body rules.
fn policy() -> pb::WorkloadPolicy {
    let mut upload = route_prefix("upload", "/upload");
    upload.validation = Some(pb::Validation {
        max_body_bytes: LIMIT,
        ..Default::default()
    });
    let mut typed = route_prefix("typed", "/typed");
    typed.validation = Some(pb::Validation {
        content_types: vec!["application/json".into()],
        ..Default::default()
    });
    let mut payments = route_prefix("payments", "/payments");
    payments.validation = Some(pb::Validation {
        json_schema: PAYMENT_SCHEMA.into(),
        ..Default::default()
    });
    let mut account = route_prefix("account", "/account");
    account.response = Some(pb::ResponseRules {
        redact: vec!["/ssn".into()],
        mask: vec![pb::MaskRule {
            pointer: "/card/number".into(),
            show_last: 4,
        }],
    });
    mesh_policy(vec![upload, typed, payments, account])
}

struct Setup {
    proxy: TestProxy,
    backend: Backend,
}

async fn setup() -> Setup {
    let (backend, app) = Backend::start().await;
    let proxy = TestProxy::start(app, shared(Some(policy())), |_| {}).await;
    Setup { proxy, backend }
}

/// What the client got back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The fixed deny body for `error`, and nothing else.
    fn assert_denied(&self, status: u16, error: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("JSON deny body");
        assert_eq!(body["error"], error, "{}", self.text());
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(2),
            "{}",
            self.text()
        );
    }
}

impl Setup {
    /// One HTTP/1.1 request over mTLS as WEB. `Err` when the connection
    /// failed before a whole response arrived.
    async fn send<B>(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: B,
    ) -> Result<Answer, hyper::Error>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut sender = self.proxy.h1().await;
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "orders.shop");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender.send_request(req.body(body).unwrap()).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// A request with a fixed body (sent with `Content-Length`).
    async fn fixed(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        self.send(method, target, headers, Full::new(body.into()))
            .await
            .expect("response")
    }

    /// A request whose body is sent chunked, in the given pieces.
    async fn chunked(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        parts: Vec<Bytes>,
    ) -> Result<Answer, hyper::Error> {
        self.send(method, target, headers, Chunks::new(parts)).await
    }
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn declared_length_over_the_limit_is_413_and_never_reaches_the_app() {
    let s = setup().await;
    let over = vec![b'a'; LIMIT as usize + 1];
    s.fixed("POST", "/upload", &[], over)
        .await
        .assert_denied(413, "payload_too_large");
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());

    let exact = vec![b'b'; LIMIT as usize];
    let answer = s.fixed("POST", "/upload", &[], exact.clone()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = s.backend.only_request().await;
    assert_eq!(seen.ended, Some(true));
    assert_eq!(seen.body, exact);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_cut_off_at_the_limit() {
    let s = setup().await;
    let chunk = Bytes::from(vec![b'c'; 512]);
    // 4 × 512 = 2048 bytes against a 1024-byte limit.
    let outcome = s.chunked("POST", "/upload", &[], vec![chunk; 4]).await;
    match outcome {
        Ok(answer) => answer.assert_denied(413, "payload_too_large"),
        // The agent may close the connection while the client still sends.
        Err(e) => eprintln!("connection closed instead of a 413: {e}"),
    }
    let seen = s.backend.only_request().await;
    assert_eq!(seen.ended, Some(false), "the app must see an aborted body");
    assert!(
        seen.body.len() as u64 <= LIMIT,
        "the app got {} bytes past a {LIMIT}-byte limit",
        seen.body.len()
    );
}

#[tokio::test]
async fn http2_body_over_the_limit_is_413_and_cut_off_at_the_limit() {
    let s = setup().await;
    let mut sender = s.proxy.h2().await;
    // DATA frames without Content-Length: only counting can catch them.
    let (tx, rx) = mpsc::channel(4);
    for _ in 0..4 {
        tx.send(Bytes::from(vec![b'h'; 512])).await.unwrap();
    }
    drop(tx);
    let req = Request::post("https://orders.shop/upload")
        .body(ChannelBody(rx))
        .unwrap();
    match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            Answer {
                status,
                headers: HeaderMap::new(),
                body,
            }
            .assert_denied(413, "payload_too_large");
        }
        Err(e) => eprintln!("stream reset instead of a 413: {e}"),
    }
    let seen = s.backend.only_request().await;
    assert_eq!(seen.ended, Some(false), "the app must see an aborted body");
    assert!(seen.body.len() as u64 <= LIMIT, "{}", seen.body.len());
}

#[tokio::test]
async fn chunked_body_under_the_limit_passes_intact() {
    let s = setup().await;
    let parts = vec![
        Bytes::from(vec![b'x'; 300]),
        Bytes::from(vec![b'y'; 300]),
        Bytes::from(vec![b'z'; 424]),
    ];
    let answer = s
        .chunked("POST", "/upload", &[], parts.clone())
        .await
        .expect("response");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "app");
    let seen = s.backend.only_request().await;
    assert_eq!(seen.ended, Some(true));
    assert_eq!(seen.body, parts.concat());
}

#[tokio::test]
async fn wrong_content_type_is_415_for_http1_and_for_http2_without_a_length() {
    let s = setup().await;
    s.fixed("POST", "/typed", &[("content-type", "text/plain")], "{}")
        .await
        .assert_denied(415, "unsupported_media_type");
    // A schema route needs JSON even when it lists no content types.
    s.fixed("POST", "/payments", &[("content-type", "text/plain")], "{}")
        .await
        .assert_denied(415, "unsupported_media_type");

    // HTTP/2 DATA without Content-Length: the engine sees no body in the
    // headers, the agent sees one.
    let mut sender = s.proxy.h2().await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(b"<xml/>")).await.unwrap();
    drop(tx);
    let req = Request::post("https://orders.shop/typed")
        .header("content-type", "application/xml")
        .body(ChannelBody(rx))
        .unwrap();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 415);
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());

    // The allowed type passes.
    let answer = s.fixed("POST", "/typed", &[JSON], "{}").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn schema_valid_json_reaches_the_app_byte_for_byte_with_a_content_length() {
    let s = setup().await;
    // Sent chunked, with whitespace the agent must not normalise away.
    let parts = vec![
        Bytes::from_static(b"{ \"amount\": 250,\n"),
        Bytes::from_static(b"  \"currency\": \"EUR\" }"),
    ];
    let answer = s
        .chunked(
            "POST",
            "/payments",
            &[("content-type", "application/json; charset=utf-8")],
            parts.clone(),
        )
        .await
        .expect("response");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = s.backend.only_request().await;
    let sent = parts.concat();
    assert_eq!(seen.body, sent);
    assert_eq!(
        header(&seen.headers, "content-length"),
        Some(sent.len().to_string().as_str())
    );
    assert!(seen.headers.get("transfer-encoding").is_none());

    // A read without a body is not validated.
    let answer = s.fixed("GET", "/payments/7", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn schema_invalid_duplicate_key_malformed_and_missing_bodies_are_400() {
    let s = setup().await;
    let bodies: [&[u8]; 5] = [
        br#"{"amount": 0, "currency": "EUR"}"#,
        br#"{"amount": 5, "currency": "EUR", "note": "extra"}"#,
        // serde_json would keep the second copy, many apps the first.
        br#"{"amount": 5, "currency": "EUR", "amount": -99999}"#,
        br#"{"amount": 5, "currency": "EUR""#,
        b"",
    ];
    for body in bodies {
        let answer = s.fixed("POST", "/payments", &[JSON], body).await;
        answer.assert_denied(400, "bad_request");
        // The validation error (pointer, keyword) stays in the debug log.
        let text = answer.text();
        for leak in ["amount", "minimum", "schema", "line"] {
            assert!(!text.contains(leak), "{text}");
        }
    }
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
}

#[tokio::test]
async fn schema_body_over_the_default_cap_is_413() {
    let s = setup().await;
    // Valid JSON just over 1 MiB, chunked: only the cap can refuse it.
    let mut parts = vec![Bytes::from_static(
        b"{\"amount\": 5, \"currency\": \"EUR\", \"pad\": \"",
    )];
    parts.extend(std::iter::repeat_n(Bytes::from(vec![b'p'; 64 * 1024]), 16));
    parts.push(Bytes::from_static(b"\"}"));
    match s.chunked("POST", "/payments", &[JSON], parts).await {
        Ok(answer) => answer.assert_denied(413, "payload_too_large"),
        Err(e) => eprintln!("connection closed instead of a 413: {e}"),
    }
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
}

#[tokio::test]
async fn masked_json_response_has_secrets_removed_and_an_exact_content_length() {
    let s = setup().await;
    let answer = s
        .fixed(
            "GET",
            "/account",
            &[("accept-encoding", "gzip, br"), ("range", "bytes=10-30")],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let text = answer.text();
    assert!(!text.contains(SSN), "{text}");
    assert!(!text.contains(CARD), "{text}");
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": "Ada", "card": {"number": "************1111", "brand": "visa"}})
    );
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str())
    );
    // Validators of the app's exact bytes do not survive rewriting.
    assert_eq!(answer.header("etag"), Some("W/\"v1\""));
    assert!(answer.header("content-digest").is_none());

    // The app was asked for an unencoded, whole document.
    let seen = s.backend.only_request().await;
    assert_eq!(header(&seen.headers, "accept-encoding"), Some("identity"));
    assert!(seen.headers.get("range").is_none());
}

#[tokio::test]
async fn masked_route_passes_non_json_responses_untouched() {
    let s = setup().await;
    let answer = s.fixed("GET", "/account/text", &[], Bytes::new()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), format!("ssn {SSN}"));
    assert_eq!(answer.header("content-type"), Some("text/plain"));
}

#[tokio::test]
async fn masked_route_withholds_encoded_oversized_and_ambiguous_json() {
    let s = setup().await;
    for path in ["/account/gzip", "/account/big", "/account/dup"] {
        let answer = s.fixed("GET", path, &[], Bytes::new()).await;
        answer.assert_denied(502, "bad_gateway");
        assert!(!answer.text().contains(SSN), "{path}: {}", answer.text());
    }
    assert_eq!(s.backend.seen().len(), 3);
}

#[tokio::test]
async fn routes_without_body_rules_stream_a_large_body_unchanged() {
    let s = setup().await;
    // 8 MiB of varied bytes, sent chunked.
    let parts: Vec<Bytes> = (0u8..128)
        .map(|i| Bytes::from(vec![i; 64 * 1024]))
        .collect();
    let answer = s
        .chunked(
            "PUT",
            "/files/blob",
            &[("content-type", "application/octet-stream")],
            parts.clone(),
        )
        .await
        .expect("response");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = s.backend.only_request().await;
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, "/files/blob");
    assert_eq!(seen.ended, Some(true));
    assert!(seen.body == parts.concat(), "body changed on the way");
    // Streamed, not buffered and re-framed with a length.
    assert!(seen.headers.get("content-length").is_none());
    assert_eq!(header(&seen.headers, "transfer-encoding"), Some("chunked"));
    // No masking request header on a route without a mask.
    assert!(seen.headers.get("accept-encoding").is_none());
}
