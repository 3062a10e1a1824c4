//! Limits on what a peer may make the inbound proxy do (DESIGN §4 "safe
//! failure"), and the HTTP/1 framing guard that refuses request smuggling
//! hyper would otherwise resolve silently.
//!
//! hyper enforces most limits itself (header block size and count, header
//! read timeout, HTTP/2 streams); see [`Limits`]. Two ambiguities it accepts
//! and resolves on its own, which DESIGN §4 says to refuse with 400 instead:
//!
//! - `Content-Length` together with `Transfer-Encoding`: hyper drops the
//!   length, decodes the body as chunked and closes the connection after it;
//! - a repeated `Content-Length` with the same value: hyper keeps one.
//!
//! Neither leaves a trace in the parsed request, so [`H1Guard`] watches the raw
//! bytes hyper reads, finds each request head (tracking body framing in
//! between, so body bytes are never mistaken for a head) and queues one
//! verdict per head; the service takes them in order, one per request. Every
//! other malformation (obs-fold, NUL or bare CR in a field, a bad chunk size,
//! differing lengths) hyper refuses itself with 400 and closes.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};

use crate::pipeline::strip::trim_ows;

/// Per-listener limits. Defaults are those of common proxies (Envoy, nginx).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest HTTP/1 request head (request line plus headers), bytes.
    /// Over it: 431.
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1 request. Over it: 431.
    pub max_headers: usize,
    /// Longest request target (the URI of the request line), bytes. Over it:
    /// 414, before anything else runs.
    pub max_request_target: usize,
    /// Longest a client may take to send a complete HTTP/1 request head
    /// (and the first bytes of a connection on an HTTP port): slowloris.
    pub header_read_timeout: Duration,
    /// HTTP/2 streams a client may have open at once; more are refused with
    /// `RST_STREAM(REFUSED_STREAM)`.
    pub h2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (decoded), bytes.
    pub h2_max_header_list_size: u32,
    /// Streams a client may open and reset before the server saw them (the
    /// "rapid reset" attack); over it the connection is closed with GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 PING interval on an idle connection; a peer that does not
    /// answer within `h2_keep_alive_timeout` is dropped.
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
    /// Connections served at once by one listener; new ones beyond it are
    /// closed at accept (and counted, see `InboundProxy::refused_connections`).
    pub max_connections: usize,
    /// Requests between arrival and their response head, across every
    /// connection of the listener; more are answered 503 at once (counted,
    /// `ConnectionStats::requests_shed`).
    pub max_requests_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_request_target: 8 * 1024,
            header_read_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 256,
            h2_max_header_list_size: 64 * 1024,
            h2_max_pending_accept_reset_streams: 20,
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_requests_in_flight: 10_000,
        }
    }
}

/// What the guard found in one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    Ok,
    /// `Content-Length` with `Transfer-Encoding`, or `Content-Length` twice.
    AmbiguousFraming,
}

/// The verdicts of heads read but not yet handed to the service, oldest
/// first.
#[derive(Clone, Debug, Default)]
pub struct HeadVerdicts(Arc<Mutex<VecDeque<HeadVerdict>>>);

impl HeadVerdicts {
    /// The next request's verdict. hyper parses heads in order and calls the
    /// service once per head it accepts (a head it refuses closes the
    /// connection), so the queues stay in step. `Ok` when the guard stopped
    /// watching (it never guesses a refusal).
    pub fn next(&self) -> HeadVerdict {
        self.0.lock().pop_front().unwrap_or(HeadVerdict::Ok)
    }

    fn push(&self, v: HeadVerdict) {
        self.0.lock().push_back(v);
    }
}

/// Where the guard is in the byte stream.
#[derive(Debug)]
enum State {
    /// Collecting a request head, line by line.
    Head,
    /// Skipping a `Content-Length` body.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    ChunkDataEnd,
    /// Reading trailer lines up to the empty one.
    Trailers,
    /// Not watching any more: after an upgrade or CONNECT request (the
    /// bytes may stop being HTTP), after a refused head (the connection
    /// closes after the answer), or on input hyper will refuse itself.
    Off,
}

/// Wraps the client side of an HTTP/1 connection; see the module docs.
pub struct H1Guard<IO> {
    inner: IO,
    state: State,
    /// The current line (head lines and chunk lines), bounded.
    line: Vec<u8>,
    head: HeadScan,
    max_line: usize,
    verdicts: HeadVerdicts,
}

/// The framing-relevant facts of the head being read.
#[derive(Debug, Default)]
struct HeadScan {
    started: bool,
    content_lengths: u32,
    length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    upgrade: bool,
    bytes: usize,
}

impl<IO> H1Guard<IO> {
    pub fn new(inner: IO, max_header_bytes: usize) -> (Self, HeadVerdicts) {
        let verdicts = HeadVerdicts::default();
        let guard = Self {
            inner,
            state: State::Head,
            line: Vec::new(),
            head: HeadScan::default(),
            max_line: max_header_bytes,
            verdicts: verdicts.clone(),
        };
        (guard, verdicts)
    }

    /// Feeds bytes hyper just read.
    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Fixed(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::ChunkDataEnd;
                    }
                }
                State::Head | State::ChunkSize | State::ChunkDataEnd | State::Trailers => {
                    let (line_done, used) = match data.iter().position(|&b| b == b'\n') {
                        Some(i) => (true, i + 1),
                        None => (false, data.len()),
                    };
                    let chunk = &data[..used];
                    data = &data[used..];
                    if matches!(self.state, State::Head) {
                        self.head.bytes += chunk.len();
                    }
                    if self.line.len() + chunk.len() > self.max_line
                        || self.head.bytes > self.max_line
                    {
                        // hyper refuses an oversized head or chunk line itself.
                        self.state = State::Off;
                        return;
                    }
                    self.line.extend_from_slice(chunk);
                    if line_done {
                        let line = std::mem::take(&mut self.line);
                        self.end_line(trim_eol(&line));
                        self.line = line;
                        self.line.clear();
                    }
                }
            }
        }
    }

    fn end_line(&mut self, line: &[u8]) {
        match self.state {
            State::Head => self.head_line(line),
            State::ChunkSize => {
                let digits =
                    line.iter()
                        .take_while(|b| b.is_ascii_hexdigit())
                        .try_fold(0u64, |acc, &b| {
                            let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                            acc.checked_mul(16)?.checked_add(d)
                        });
                self.state = match digits {
                    _ if line.first().is_none_or(|b| !b.is_ascii_hexdigit()) => State::Off,
                    None => State::Off,
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                };
            }
            State::ChunkDataEnd => {
                self.state = if line.is_empty() {
                    State::ChunkSize
                } else {
                    State::Off
                };
            }
            State::Trailers => {
                if line.is_empty() {
                    self.state = State::Head;
                }
            }
            State::Fixed(_) | State::ChunkData(_) | State::Off => {}
        }
    }

    fn head_line(&mut self, line: &[u8]) {
        if !self.head.started {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            if line.is_empty() {
                self.head.bytes = 0;
                return;
            }
            self.head.started = true;
            let method = line.split(|&b| b == b' ').next().unwrap_or_default();
            // A tunnel: what follows is not HTTP.
            self.head.upgrade |= method == b"CONNECT";
            return;
        }
        if !line.is_empty() {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                // hyper refuses it.
                self.state = State::Off;
                return;
            };
            let name = &line[..colon];
            let value = trim_ows(&line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                self.head.content_lengths += 1;
                self.head.length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                self.head.transfer_encoding = true;
                // hyper: chunked iff the last coding of this field is.
                self.head.chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| trim_ows(c).eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                self.head.upgrade = true;
            }
            return;
        }
        // The end of the head.
        let head = std::mem::take(&mut self.head);
        let ambiguous =
            head.content_lengths > 1 || (head.content_lengths > 0 && head.transfer_encoding);
        if ambiguous {
            self.verdicts.push(HeadVerdict::AmbiguousFraming);
            // Answered 400 with `Connection: close`: nothing after matters.
            self.state = State::Off;
            return;
        }
        self.verdicts.push(HeadVerdict::Ok);
        self.state = if head.upgrade {
            State::Off
        } else if head.transfer_encoding {
            if head.chunked {
                State::ChunkSize
            } else {
                State::Off
            }
        } else if head.content_lengths == 1 {
            match head.length {
                Some(0) => State::Head,
                Some(n) => State::Fixed(n),
                None => State::Off,
            }
        } else {
            State::Head
        };
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl<IO: AsyncRead + Unpin> AsyncRead for H1Guard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && !matches!(this.state, State::Off) {
            // Only the bytes this read added; no copy.
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

write_through_to_inner!(H1Guard);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[&[u8]]) -> Vec<HeadVerdict> {
        let (mut g, v) = H1Guard::new((), 64 * 1024);
        for part in input {
            g.scan(part);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().pop_front() {
            out.push(x);
        }
        out
    }

    #[test]
    fn keep_alive_requests_with_bodies_are_each_judged_once() {
        let v = verdicts(&[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /",
            b" HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3;ext=1\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"\r\nGET /d HTTP/1.1\nHost: y\n\n",
        ]);
        assert_eq!(v, [HeadVerdict::Ok; 4]);
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_heads() {
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        let v = verdicts(&[head.as_bytes(), body]);
        assert_eq!(v, [HeadVerdict::Ok]);
    }

    #[test]
    fn cl_with_te_and_repeated_cl_are_ambiguous() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert_eq!(verdicts(&[head]), [HeadVerdict::AmbiguousFraming]);
        }
    }

    #[test]
    fn byte_at_a_time_is_the_same() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiPOST / HTTP/1.1\r\nContent-Length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let parts: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            verdicts(&parts),
            [HeadVerdict::Ok, HeadVerdict::AmbiguousFraming]
        );
    }
}
