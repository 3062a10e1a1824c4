//! The detect step: which HTTP version a connection on an HTTP port speaks,
//! from the ALPN the TLS handshake agreed on or from its first bytes.
//!
//! - ALPN `h2` → HTTP/2, `http/1.1` → HTTP/1 (no bytes read).
//! - First bytes the HTTP/2 connection preface (`PRI * HTTP/2.0…`) → HTTP/2
//!   (prior knowledge: h2c, or h2 over TLS without ALPN).
//! - First bytes a method token (any length) followed by a space → HTTP/1;
//!   still undecided after [`MAX_SNIFF`] bytes → HTTP/1 too (its parser
//!   refuses what is not HTTP).
//! - Anything else is not HTTP, and nothing within the detection timeout
//!   is silence: either way the connection is closed and audited by the
//!   caller. Detection never picks opaque TCP: a port is opaque only when
//!   the policy declares it so (DESIGN §6), never because a client was slow
//!   or odd — that would hand its bytes to the app past every HTTP rule.
//!
//! The bytes read to decide are replayed to whatever serves the connection
//! ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// How the agent treats an application port the policy declares nothing
/// about (`--opaque-ports` sets `Opaque`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1 or HTTP/2, detected per connection.
    #[default]
    Http,
    /// Opaque TCP: mTLS and identity-level authorization only. The policy
    /// overrides this for a port it gives HTTP rules.
    Opaque,
}

/// What detection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Bytes that cannot start an HTTP request.
    NotHttp,
}

/// How sniffing ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// The first bytes decided; they are to be replayed.
    Decided(Detected, Vec<u8>),
    /// Nothing conclusive within the timeout (`bytes` read so far).
    Silent { bytes: usize },
    /// The peer closed first (`bytes` read so far).
    Closed { bytes: usize },
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most bytes read to decide. Input still undecided at this size (a very
/// long run of method-token characters or empty lines) is served as HTTP/1,
/// whose parser refuses what is not HTTP: never opaque, which would skip the
/// HTTP policy.
pub const MAX_SNIFF: usize = 8 * 1024;

/// Classifies what has been read so far; `None` means "need more bytes".
///
/// A method token of any length followed by a space is HTTP/1: HTTP servers
/// accept extension methods, so calling a long one opaque would hand an HTTP
/// request to the app past every route rule.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    const NOT_HTTP: Option<Detected> = Some(Detected::NotHttp);
    // Empty lines before an HTTP/1 request line are tolerated by HTTP
    // servers (RFC 9112 §2.2); were they not skipped here, such a request
    // would pass as opaque and reach an HTTP app unchecked.
    let buf = match buf.iter().position(|&b| b != b'\r' && b != b'\n') {
        Some(start) => &buf[start..],
        None => return None,
    };
    if buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    for (i, &b) in buf.iter().enumerate() {
        if b == b' ' {
            return if i > 0 {
                Some(Detected::Http1)
            } else {
                NOT_HTTP
            };
        }
        if !is_tchar(b) {
            return NOT_HTTP;
        }
    }
    None
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The protocol ALPN agreed on, if it names one.
pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Detected> {
    match alpn? {
        b"h2" => Some(Detected::Http2),
        b"http/1.1" | b"http/1.0" => Some(Detected::Http1),
        _ => None,
    }
}

/// Reads until the first bytes decide the protocol, for at most `timeout`.
pub async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO, timeout: Duration) -> io::Result<Sniffed> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; H2_PREFACE.len()];
    loop {
        if let Some(d) = classify(&buf) {
            return Ok(Sniffed::Decided(d, buf));
        }
        if buf.len() >= MAX_SNIFF {
            return Ok(Sniffed::Decided(Detected::Http1, buf));
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) => return Ok(Sniffed::Closed { bytes: buf.len() }),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(Sniffed::Silent { bytes: buf.len() }),
        }
    }
}

/// An I/O object that first replays bytes already read from it.
pub struct Rewind<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Vec<u8>, inner: IO) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Done replaying: give the memory back.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

write_through_to_inner!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"PRI"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::NotHttp));
        assert_eq!(classify(b"\0\0\0\x08"), Some(Detected::NotHttp));
        assert_eq!(classify(b" GET"), Some(Detected::NotHttp));
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"\r\nGET / HTTP/1.1"), Some(Detected::Http1));
        // A long method token is still a method: HTTP/1, never opaque.
        assert_eq!(classify(&[b'A'; 30]), None);
        let mut long = vec![b'A'; 30];
        long.extend_from_slice(b" /admin HTTP/1.1\r\n");
        assert_eq!(classify(&long), Some(Detected::Http1));
        assert_eq!(
            classify(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n"),
            Some(Detected::NotHttp)
        );
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::NotHttp));
    }

    #[test]
    fn alpn_short_cuts() {
        assert_eq!(from_alpn(Some(b"h2")), Some(Detected::Http2));
        assert_eq!(from_alpn(Some(b"http/1.1")), Some(Detected::Http1));
        assert_eq!(from_alpn(Some(b"x")), None);
        assert_eq!(from_alpn(None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_and_a_stall_are_never_a_protocol() {
        // Nothing at all, then one byte that could start a method: both end
        // as silence, which the caller closes; neither is ever opaque.
        let (_a, mut b) = tokio::io::duplex(64);
        assert_eq!(
            sniff(&mut b, Duration::from_secs(1)).await.unwrap(),
            Sniffed::Silent { bytes: 0 }
        );
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"G")
            .await
            .unwrap();
        assert_eq!(
            sniff(&mut b, Duration::from_secs(1)).await.unwrap(),
            Sniffed::Silent { bytes: 1 }
        );
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert_eq!(
            sniff(&mut b, Duration::from_secs(1)).await.unwrap(),
            Sniffed::Closed { bytes: 0 }
        );
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut b = b;
        let Sniffed::Decided(d, prefix) = sniff(&mut b, Duration::from_secs(5)).await.unwrap()
        else {
            panic!("undecided")
        };
        assert_eq!(d, Detected::Http1);
        drop(a);
        let mut all = Vec::new();
        Rewind::new(prefix, b).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }
}
