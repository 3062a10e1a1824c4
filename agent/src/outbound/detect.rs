//! Which ALPN protocol to offer the destination, from the app's first bytes.
//!
//! The outbound side is a byte tunnel, but the inbound agent at the other end
//! serves HTTP and benefits from knowing up front what is coming; ALPN is how
//! TLS says it. The app's bytes are only *peeked* (`TcpStream::peek`): they
//! stay in the socket and are copied into the tunnel unchanged.
//!
//! - HTTP/2 connection preface (`PRI * HTTP/2.0`): `h2` (h2c prior knowledge,
//!   gRPC);
//! - an HTTP/1 request line (`METHOD SP target SP HTTP/1.x`): `http/1.1`
//!   (also WebSocket and `Upgrade: h2c`, which start as HTTP/1.1);
//! - anything else, nothing within the detection timeout (server-first
//!   protocols such as SMTP or MySQL), or an app that closes: no ALPN.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::{ALPN_H2, ALPN_HTTP11};

/// The ALPN protocol offered on a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http11,
    /// Opaque TCP (or undetected): no ALPN extension at all.
    None,
}

impl Alpn {
    /// The `alpn_protocols` list for the client config.
    pub fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![ALPN_H2.to_vec()],
            Alpn::Http11 => vec![ALPN_HTTP11.to_vec()],
            Alpn::None => Vec::new(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::H2 => "h2",
            Alpn::Http11 => "http/1.1",
            Alpn::None => "none",
        }
    }
}

/// The start of the HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// Longest method token we accept in a request line.
const MAX_METHOD: usize = 20;
/// How many bytes are peeked at most: a request line longer than this is
/// not recognised (the connection is still tunnelled, without ALPN).
pub const MAX_SNIFF: usize = 2048;
/// Pause between peeks while a partial request line sits in the socket:
/// `peek` returns at once while any byte is buffered, so without a pause the
/// loop would spin until the rest arrives.
const REPEEK_PAUSE: Duration = Duration::from_millis(5);

/// What the bytes seen so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Decided(Alpn),
    /// Consistent with a protocol we know, but too short to tell.
    NeedMore,
}

/// Classifies the first bytes an app sent. Pure, so the grammar is unit-tested.
pub fn classify(buf: &[u8]) -> Sniffed {
    if buf.len() >= H2_PREFACE.len() {
        if buf.starts_with(H2_PREFACE) {
            return Sniffed::Decided(Alpn::H2);
        }
    } else if H2_PREFACE.starts_with(buf) {
        // Also true for an empty buffer.
        return Sniffed::NeedMore;
    }
    classify_http1(buf)
}

fn is_tchar_upper(b: u8) -> bool {
    // Methods are tokens; the registered ones are upper-case letters (and
    // `-`/`_` in a few extension methods). Lower-case is not HTTP/1 here.
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// `METHOD SP request-target SP HTTP/1.<digit> (CR|LF)`.
fn classify_http1(buf: &[u8]) -> Sniffed {
    const OPAQUE: Sniffed = Sniffed::Decided(Alpn::None);
    // Method.
    let method_len = buf.iter().take_while(|b| is_tchar_upper(**b)).count();
    if method_len > MAX_METHOD {
        return OPAQUE;
    }
    let Some(&after_method) = buf.get(method_len) else {
        return Sniffed::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return OPAQUE;
    }
    // Request target: visible ASCII (RFC 9112 §3.2), at least one byte.
    let rest = &buf[method_len + 1..];
    let target_len = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    let Some(&after_target) = rest.get(target_len) else {
        return Sniffed::NeedMore;
    };
    if target_len == 0 || after_target != b' ' {
        return OPAQUE;
    }
    // Version, then the end of the line.
    let version = &rest[target_len + 1..];
    const V: &[u8] = b"HTTP/1.";
    let n = version.len().min(V.len());
    if version[..n] != V[..n] {
        return OPAQUE;
    }
    match (version.get(V.len()), version.get(V.len() + 1)) {
        (None, _) | (Some(_), None) => Sniffed::NeedMore,
        (Some(d), Some(b'\r' | b'\n')) if d.is_ascii_digit() => Sniffed::Decided(Alpn::Http11),
        _ => OPAQUE,
    }
}

/// Peeks at `tcp` for at most `timeout` and classifies what the app sent.
/// Never consumes a byte.
pub async fn detect_alpn(tcp: &TcpStream, timeout: Duration) -> Alpn {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_SNIFF];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Timeout (server-first protocol) or a socket error (the copy
            // will see it again): tunnel without ALPN.
            Ok(Err(_)) | Err(_) => return Alpn::None,
        };
        if n == 0 {
            // The app closed its side without sending anything.
            return Alpn::None;
        }
        match classify(&buf[..n]) {
            Sniffed::Decided(alpn) => return alpn,
            Sniffed::NeedMore if n == buf.len() => return Alpn::None,
            Sniffed::NeedMore => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(REPEEK_PAUSE))
                    .await
                    .is_err()
                {
                    return Alpn::None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(buf: &[u8]) -> Option<Alpn> {
        match classify(buf) {
            Sniffed::Decided(a) => Some(a),
            Sniffed::NeedMore => None,
        }
    }

    #[test]
    fn h2_preface_is_h2() {
        assert_eq!(decided(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Some(Alpn::H2));
        assert_eq!(decided(b"PRI * HTTP/2.0"), Some(Alpn::H2));
        // A partial preface waits for more.
        assert_eq!(decided(b"PRI * HT"), None);
        assert_eq!(decided(b""), None);
    }

    #[test]
    fn http1_request_lines_are_http11() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /orders?id=1 HTTP/1.0\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"GET http://example.com/ HTTP/1.1\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"PRI / HTTP/1.1\r\n",
        ] {
            assert_eq!(
                decided(line),
                Some(Alpn::Http11),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn partial_request_lines_wait_for_more() {
        for part in [
            &b"G"[..],
            b"GET",
            b"GET ",
            b"GET /orders",
            b"GET /orders ",
            b"GET /orders HTTP/",
            b"GET /orders HTTP/1.",
            b"GET /orders HTTP/1.1",
            b"P",
            b"PRI",
        ] {
            assert_eq!(decided(part), None, "{}", String::from_utf8_lossy(part));
        }
    }

    #[test]
    fn everything_else_is_opaque() {
        for bytes in [
            &b"\x16\x03\x01\x02\x00"[..], // a TLS ClientHello
            b"get / HTTP/1.1\r\n",        // lower-case method
            b"GET  / HTTP/1.1\r\n",       // empty target
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.1x\r\n",
            b"GET / HTTP/1.x\r\n",
            b"GET /a\tb HTTP/1.1\r\n",
            b"EHLO example.com\r\n",
            b"*3\r\n$3\r\nSET\r\n",              // Redis
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n", // method too long
        ] {
            assert_eq!(
                decided(bytes),
                Some(Alpn::None),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn detection_peeks_without_consuming_and_times_out_on_silence() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        // A request line sent in two pieces is still recognised.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET /x HT").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            client
        });
        assert_eq!(
            detect_alpn(&server, Duration::from_secs(5)).await,
            Alpn::Http11
        );
        let _client = writer.await.unwrap();
        let mut got = vec![0u8; 19];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"GET /x HTTP/1.1\r\n\r\n", "bytes were consumed");

        // A silent (server-first) client: no ALPN once the timeout passes.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(
            detect_alpn(&server, Duration::from_millis(50)).await,
            Alpn::None
        );
    }
}
