//! Hostile HTTP input against the inbound proxy, written byte by byte on raw
//! mTLS sockets: smuggling, oversized and malformed heads, slowloris,
//! HTTP/2 stream floods. Every test checks what the recording app saw, and
//! that the proxy still serves a normal request afterwards.

mod common;

use std::time::Duration;

use common::WEB;
use common::inbound::{RequestLog, TestProxy, exchange, mesh_policy, shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Upper bound on any wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    proxy: TestProxy,
    /// What the app (HTTP/1.1 and h2c) received; `/slow` never answers.
    backend: RequestLog,
}

/// A proxy with small limits, so each attack is cheap to mount.
async fn setup() -> Setup {
    let (backend, app) = RequestLog::start(Some("/slow")).await;
    let proxy = TestProxy::start(app, shared(Some(mesh_policy(vec![]))), |config| {
        config.limits.max_header_bytes = 16 * 1024;
        config.limits.max_headers = 20;
        config.limits.max_request_target = 1024;
        config.limits.header_read_timeout = Duration::from_millis(500);
        config.limits.h2_max_concurrent_streams = 2;
    })
    .await;
    Setup { proxy, backend }
}

impl Setup {
    async fn tls(&self, alpn: &[u8]) -> TlsStream<TcpStream> {
        self.proxy.tls_as(WEB, Some(alpn)).await.unwrap()
    }

    /// Writes raw bytes on a fresh HTTP/1.1 connection and reads until the
    /// proxy closes it (or the upper bound passes); the text read.
    async fn raw(&self, bytes: &[u8]) -> String {
        let out = exchange(self.tls(b"http/1.1").await, bytes, false, WAIT).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A normal request still works: nothing panicked or wedged.
    async fn still_serves(&self) {
        let before = self.backend.seen().len();
        let resp = self
            .raw(b"GET /ok HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
            .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("app"), "{resp}");
        let seen = self.backend.seen();
        assert_eq!(seen.len(), before + 1);
        assert_eq!(seen.last().map(String::as_str), Some("GET /ok"));
    }
}

fn status(resp: &str) -> &str {
    resp.get(9..12).unwrap_or("")
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    let s = setup().await;
    for req in [
        &b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let resp = s.raw(req).await;
        assert_eq!(status(&resp), "400", "{resp}");
        assert!(resp.contains(r#"{"error":"bad_request""#), "{resp}");
        assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp}");
    }
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
    s.still_serves().await;
}

#[tokio::test]
async fn differing_and_repeated_content_lengths_are_refused() {
    let s = setup().await;
    // Differing: hyper refuses it itself.
    let resp = s
        .raw(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")
        .await;
    assert_eq!(status(&resp), "400", "{resp}");
    // Identical: hyper would keep one; DESIGN §4 says refuse, not guess.
    let resp = s
        .raw(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd")
        .await;
    assert_eq!(status(&resp), "400", "{resp}");
    assert!(resp.contains(r#"{"error":"bad_request""#), "{resp}");
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
    s.still_serves().await;
}

#[tokio::test]
async fn smuggling_inside_a_body_is_only_a_body() {
    // A keep-alive connection: a well-framed POST whose body looks like an
    // ambiguous request, then a real second request. Both reach the app as
    // exactly two requests; the body is not judged as a head.
    let s = setup().await;
    let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut req = format!(
        "POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req.extend_from_slice(b"GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let resp = s.raw(&req).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    assert_eq!(s.backend.seen(), ["POST /first", "GET /second"]);
}

#[tokio::test]
async fn obs_fold_nul_and_bare_cr_are_refused() {
    let s = setup().await;
    for req in [
        &b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n"[..],
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: on\0e\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: on\re\r\n\r\n",
        b"GET /a\0b HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let resp = s.raw(req).await;
        assert_eq!(status(&resp), "400", "{req:?} → {resp}");
    }
    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
    s.still_serves().await;
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let s = setup().await;
    // A header block over 16 KiB.
    let big = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let resp = s.raw(big.as_bytes()).await;
    assert_eq!(status(&resp), "431", "{resp}");

    // More than 20 fields.
    let mut many = String::from("GET /a HTTP/1.1\r\nHost: x\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = s.raw(many.as_bytes()).await;
    assert_eq!(status(&resp), "431", "{resp}");

    // A request target over 1 KiB.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(2000));
    let resp = s.raw(long.as_bytes()).await;
    assert_eq!(status(&resp), "414", "{resp}");
    assert!(resp.contains(r#"{"error":"uri_too_long""#), "{resp}");

    assert!(s.backend.seen().is_empty(), "{:?}", s.backend.seen());
    s.still_serves().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_by_the_header_timeout() {
    let s = setup().await;
    let mut tls = s.tls(b"http/1.1").await;
    tls.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        // One byte every 100 ms, never finishing the head (the header
        // timeout is 500 ms); stops when the proxy closes.
        for _ in 0..100 {
            if wr.write_all(b"a").await.is_err() || wr.flush().await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(WAIT, rd.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the proxy kept a slowloris connection open");
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    writer.abort();
    assert!(s.backend.seen().is_empty());
    s.still_serves().await;
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn http2_streams_over_the_limit_are_refused() {
    let s = setup().await;
    let mut tls = s.tls(b"h2").await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    // HEADERS, END_STREAM | END_HEADERS: GET https x /slow (HPACK: indexed
    // :method GET, :scheme https; literal :path and :authority).
    let mut block = vec![0x82, 0x87, 0x04, 5];
    block.extend_from_slice(b"/slow");
    block.extend_from_slice(&[0x01, 1, b'x']);
    for stream in [1u32, 3, 5, 7] {
        out.extend(frame(0x1, 0x5, stream, &block));
    }
    tls.write_all(&out).await.unwrap();

    // Read frames until both streams over the limit were reset.
    let mut refused = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        while refused.len() < 2 {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).await?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == 0x3 && payload.len() == 4 {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                refused.push((stream, code));
            }
            if head[3] == 0x7 {
                break; // GOAWAY
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    assert!(matches!(read, Ok(Ok(()))), "{read:?}");
    // REFUSED_STREAM (0x7) for the third and fourth streams.
    assert_eq!(refused, [(5, 0x7), (7, 0x7)]);
    // The two admitted streams reach the app (waiting for them is bounded);
    // the refused ones never do.
    let _ = tokio::time::timeout(WAIT, async {
        while s.backend.seen().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let seen = s.backend.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|r| r == "GET /slow" || r == "GET http://x/slow"),
        "{seen:?}"
    );
    s.still_serves().await;
}

/// HPACK literal header field without indexing, new name, no Huffman.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

/// Frames of one connection, parsed by a task of their own (so waiting on
/// them with a deadline never cuts a frame in half): (type, stream, payload).
fn frames(
    read: tokio::io::ReadHalf<TlsStream<TcpStream>>,
) -> tokio::sync::mpsc::UnboundedReceiver<(u8, u32, Vec<u8>)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut read = read;
        loop {
            let mut head = [0u8; 9];
            if read.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if read.read_exact(&mut payload).await.is_err() {
                return;
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if tx.send((head[3], stream, payload)).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next frame of stream 1 (HEADERS or RST_STREAM) within `wait`.
async fn next_on_stream_one(
    frames: &mut tokio::sync::mpsc::UnboundedReceiver<(u8, u32, Vec<u8>)>,
    wait: Duration,
) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(wait, async {
        while let Some((kind, stream, payload)) = frames.recv().await {
            if stream == 1 {
                return Some((kind, payload));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// HTTP/2: a DATA length that contradicts `content-length` resets the
/// stream before any policy answer, every time: the agent waits for a small
/// declared body before refusing, so its decision (a 403 here) never races
/// the reset; an allowed request's stream is reset too.
#[tokio::test]
async fn http2_data_contradicting_content_length_resets_before_any_answer() {
    let (backend, app) = RequestLog::start(None).await;
    let mut deny_admin = common::inbound::route_prefix("admin", "/admin");
    deny_admin.deny = vec![palisade_policy::wire::Rule::default()];
    let proxy = TestProxy::start(app, shared(Some(mesh_policy(vec![deny_admin]))), |_| {}).await;
    for path in ["/admin/x", "/public/x"] {
        let tls = proxy.tls_as(WEB, Some(b"h2")).await.unwrap();
        let (read, mut write) = tokio::io::split(tls);
        let mut frames = frames(read);
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        let mut block = Vec::new();
        for (k, v) in [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "orders"),
            ("content-length", "5"),
        ] {
            block.extend(literal(k, v));
        }
        // HEADERS (END_HEADERS, no END_STREAM): the body is still to come,
        // so nothing may be answered yet.
        out.extend(frame(0x1, 0x4, 1, &block));
        write.write_all(&out).await.unwrap();
        if path == "/admin/x" {
            // Policy refuses it: no answer until the body is judged.
            let early = next_on_stream_one(&mut frames, Duration::from_millis(300)).await;
            assert_eq!(early, None, "{path}: answered before the body");
        }
        // DATA of 10 bytes (END_STREAM) against a content-length of 5.
        write
            .write_all(&frame(0x0, 0x1, 1, b"0123456789"))
            .await
            .unwrap();
        // RST_STREAM with PROTOCOL_ERROR (0x1); on the allowed path the
        // app may have answered first (its answer, not a policy's).
        let mut outcome = next_on_stream_one(&mut frames, WAIT).await;
        if path == "/public/x" && matches!(outcome, Some((0x1, _))) {
            outcome = next_on_stream_one(&mut frames, WAIT).await;
        }
        assert_eq!(outcome, Some((0x3, vec![0, 0, 0, 1])), "{path}");
    }
    // The denied path never reached the app.
    assert!(
        !backend.seen().iter().any(|r| r.contains("/admin")),
        "{:?}",
        backend.seen()
    );
}

/// A cap on requests in flight across all connections: beyond it requests
/// are shed with 503 and `Retry-After`, counted, and served again once the
/// load is gone.
#[tokio::test]
async fn requests_beyond_the_in_flight_cap_are_shed_with_503() {
    let (backend, app) = RequestLog::start(Some("/slow")).await;
    let (proxy, server) = TestProxy::bind(app, shared(Some(mesh_policy(vec![]))), |c| {
        c.limits.max_requests_in_flight = 1;
    })
    .await;
    let stats = server.stats();
    tokio::spawn(server.run());

    // One request in flight (the app never answers it).
    let mut slow = proxy.tls_as(WEB, Some(b"http/1.1")).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while backend.seen().is_empty() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the slow request reaches the app");
    assert_eq!(stats.requests_in_flight(), 1);

    let shed = exchange(
        proxy.tls_as(WEB, Some(b"http/1.1")).await.unwrap(),
        b"GET /ok HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
        false,
        WAIT,
    )
    .await;
    let shed = String::from_utf8_lossy(&shed);
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );
    assert!(shed.contains(r#"{"error":"unavailable""#), "{shed}");
    assert_eq!(stats.requests_shed(), 1);
    assert_eq!(backend.seen(), ["GET /slow"]);

    // The slow client goes away: its place is free again.
    drop(slow);
    tokio::time::timeout(WAIT, async {
        while stats.requests_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the abandoned request leaves");
    let ok = exchange(
        proxy.tls_as(WEB, Some(b"http/1.1")).await.unwrap(),
        b"GET /ok HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
        false,
        WAIT,
    )
    .await;
    assert!(String::from_utf8_lossy(&ok).starts_with("HTTP/1.1 200"));
}
