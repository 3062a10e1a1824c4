//! Property-based robustness tests of the inbound steps that read raw peer
//! bytes (DESIGN §6: each inbound step has its tests and a fuzz target beside
//! it; on the stable toolchain the fuzz target is a proptest).
//!
//! - [`super::limits::H1Guard`]: never panics on any bytes in any split; the
//!   verdicts do not depend on how the bytes were split; well-formed requests
//!   are never flagged; `Content-Length` with `Transfer-Encoding` (or twice)
//!   always is.
//! - [`super::detect`]: `classify` never panics, never changes its mind as
//!   more bytes arrive, never calls a prefix of a request line or of the h2
//!   preface something else; `sniff` + `Rewind` give the same answer and the
//!   same bytes whatever the split.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::{Index, select};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::detect::{Detected, H2_PREFACE, Rewind, Sniffed, classify, sniff};
use super::limits::{H1Guard, HeadVerdict, HeadVerdicts};

/// One runtime for the async properties (a runtime per case would dominate).
static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
});

/// A reader that hands out exactly one pre-cut chunk per read, then EOF.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut chunk) = this.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                // The caller's buffer was smaller: the rest comes next time.
                this.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `input` cut at the given points (any order, duplicates allowed: empty
/// chunks are skipped, an empty read would be EOF).
fn split(input: &[u8], cuts: &[Index]) -> VecDeque<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2)
        .map(|w| input[w[0]..w[1]].to_vec())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Runs `input`, cut at `cuts`, through an [`H1Guard`] by its `AsyncRead`
/// (the path hyper uses) and answers the verdict queue.
fn guard(input: &[u8], cuts: &[Index], max_header_bytes: usize) -> HeadVerdicts {
    let chunks = split(input, cuts);
    let reads = chunks.len();
    let (mut g, verdicts) = H1Guard::new(Chunks(chunks), max_header_bytes);
    let mut cx = Context::from_waker(Waker::noop());
    let mut storage = vec![0u8; input.len().max(1)];
    for _ in 0..reads {
        let mut buf = ReadBuf::new(&mut storage);
        let polled = Pin::new(&mut g).poll_read(&mut cx, &mut buf);
        assert!(matches!(polled, Poll::Ready(Ok(()))));
    }
    verdicts
}

/// The whole queue, exactly. `HeadVerdicts` exposes only `next` (which
/// answers `Ok` once empty), so its `Debug` form is what is compared.
fn queue(v: &HeadVerdicts) -> String {
    format!("{v:?}")
}

// ---------------------------------------------------------------------------
// Strategies: HTTP/1 requests.

fn method() -> impl Strategy<Value = &'static str> {
    select(vec![
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "M-SEARCH",
    ])
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[A-Za-z0-9._~!$&'()*+,;=:@/%-]{0,40}(\\?[A-Za-z0-9=&%._-]{0,20})?",
        Just("*".to_owned()),
        "http://[a-z]{1,10}\\.example(:[0-9]{1,5})?/[a-z]{0,10}",
    ]
}

fn eol() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just("\r\n"), 1 => Just("\n")]
}

fn is_framing(name: &str) -> bool {
    ["content-length", "transfer-encoding", "upgrade"]
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f))
}

/// A header that says nothing about framing (nor upgrades, which stop the
/// guard from watching).
fn plain_header() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        select(vec![
            "Host",
            "accept",
            "User-Agent",
            "cookie",
            "x-request-id"
        ])
        .prop_map(str::to_owned),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}".prop_filter("framing", |n| !is_framing(n)),
    ];
    // Visible ASCII, spaces and tabs, and obs-text.
    let value = proptest::collection::vec(
        prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
        0..40,
    );
    (name, value).prop_map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
}

#[derive(Clone, Debug)]
enum Body {
    None,
    Fixed(Vec<u8>),
    Chunked(Vec<Vec<u8>>, Vec<(String, String)>),
}

fn body() -> impl Strategy<Value = Body> {
    // Body bytes that look like request heads are the interesting ones.
    let bytes = proptest::collection::vec(
        prop_oneof![
            3 => any::<u8>().prop_map(|b| vec![b]),
            1 => select(vec![
                &b"GET / HTTP/1.1\r\n"[..],
                b"Content-Length: 3\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"\r\n",
                b"0\r\n\r\n",
            ])
            .prop_map(<[u8]>::to_vec),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat());
    prop_oneof![
        2 => Just(Body::None),
        1 => bytes.clone().prop_map(Body::Fixed),
        1 => (
            proptest::collection::vec(bytes, 0..4),
            proptest::collection::vec(plain_header(), 0..3)
        )
            .prop_map(|(c, t)| Body::Chunked(c, t)),
    ]
}

#[derive(Clone, Debug)]
struct Req {
    blank_lines: usize,
    method: &'static str,
    target: String,
    minor: u8,
    eol: &'static str,
    headers: Vec<(String, String)>,
    ows: Vec<&'static str>,
    body: Body,
}

fn request() -> impl Strategy<Value = Req> {
    (
        0..3usize,
        method(),
        target(),
        0..2u8,
        eol(),
        proptest::collection::vec(plain_header(), 0..8),
        proptest::collection::vec(select(vec!["", " ", "  ", "\t"]), 8),
        body(),
    )
        .prop_map(
            |(blank_lines, method, target, minor, eol, headers, ows, body)| Req {
                blank_lines,
                method,
                target,
                minor,
                eol,
                headers,
                ows,
                body,
            },
        )
}

impl Req {
    /// The head up to (not including) the blank line, with `extra` header
    /// lines inserted at the given positions.
    fn head(&self, extra: &[(usize, String)]) -> Vec<u8> {
        let eol = self.eol;
        let mut out = Vec::new();
        for _ in 0..self.blank_lines {
            out.extend_from_slice(eol.as_bytes());
        }
        out.extend_from_slice(
            format!("{} {} HTTP/1.{}{eol}", self.method, self.target, self.minor).as_bytes(),
        );
        let mut lines: Vec<Vec<u8>> = self
            .headers
            .iter()
            .zip(self.ows.iter().cycle())
            .map(|((n, v), ows)| {
                let mut l = format!("{n}:{ows}").into_bytes();
                l.extend_from_slice(v.as_bytes());
                l
            })
            .collect();
        match &self.body {
            Body::None => {}
            Body::Fixed(b) => lines.push(format!("Content-Length: {}", b.len()).into_bytes()),
            Body::Chunked(..) => lines.push(b"Transfer-Encoding: chunked".to_vec()),
        }
        for (at, line) in extra {
            let at = (*at).min(lines.len());
            lines.insert(at, line.clone().into_bytes());
        }
        for l in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(eol.as_bytes());
        }
        out
    }

    fn render(&self) -> Vec<u8> {
        let mut out = self.head(&[]);
        out.extend_from_slice(self.eol.as_bytes());
        match &self.body {
            Body::None => {}
            Body::Fixed(b) => out.extend_from_slice(b),
            Body::Chunked(chunks, trailers) => {
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                for (n, v) in trailers {
                    out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }
}

/// A request head with both framing fields, or `Content-Length` twice.
fn ambiguous_head() -> impl Strategy<Value = Vec<u8>> {
    let cl_name = select(vec!["Content-Length", "content-length", "CONTENT-LENGTH"]);
    let te_name = select(vec![
        "Transfer-Encoding",
        "transfer-encoding",
        "TRANSFER-encoding",
    ]);
    let te_value = select(vec![
        "chunked",
        "gzip, chunked",
        "chunked, gzip",
        "identity",
        "x",
    ]);
    let cl_value = prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        Just("abc".to_owned()),
        Just(String::new()),
    ];
    let second = prop_oneof![
        (te_name, te_value).prop_map(|(n, v)| format!("{n}: {v}")),
        (cl_name.clone(), 0u64..100).prop_map(|(n, v)| format!("{n}: {v}")),
    ];
    (
        request().prop_map(|mut r| {
            r.body = Body::None;
            r
        }),
        cl_name,
        cl_value,
        second,
        any::<usize>(),
        any::<usize>(),
    )
        .prop_map(|(req, cl_name, cl_value, second, a, b)| {
            let n = req.headers.len() + 1;
            let mut head = req.head(&[
                (a % n, format!("{cl_name}: {cl_value}")),
                (b % (n + 1), second),
            ]);
            head.extend_from_slice(req.eol.as_bytes());
            head
        })
}

/// Bytes built from HTTP-ish fragments and noise: reaches every state of
/// the guard far more often than uniform bytes.
fn http_soup() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            2 => proptest::collection::vec(any::<u8>(), 0..8),
            3 => select(vec![
                &b"GET / HTTP/1.1\r\n"[..],
                b"POST /x HTTP/1.1\n",
                b"CONNECT a:443 HTTP/1.1\r\n",
                b"Content-Length: 4\r\n",
                b"Content-Length: 18446744073709551616\r\n",
                b"content-length:\t0\r\n",
                b"Transfer-Encoding: chunked\r\n",
                b"transfer-encoding: gzip\r\n",
                b"Upgrade: websocket\r\n",
                b"x: y\r\n",
                b"no colon\r\n",
                b"\r\n",
                b"\n",
                b"\r",
                b"0\r\n",
                b"ffffffffffffffffff\r\n",
                b"4;ext=1\r\n",
                b"abcd\r\n",
                b"zz\r\n",
            ])
            .prop_map(<[u8]>::to_vec),
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

fn cuts() -> impl Strategy<Value = Vec<Index>> {
    proptest::collection::vec(any::<Index>(), 0..24)
}

// ---------------------------------------------------------------------------
// Strategies: detection.

fn request_line() -> impl Strategy<Value = Vec<u8>> {
    (
        0..3usize,
        prop_oneof![
            method().prop_map(str::to_owned),
            // Method tokens, including long extension methods.
            "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}",
        ],
        target(),
        0..2u8,
        eol(),
    )
        .prop_map(|(blank, m, t, minor, eol)| {
            format!("{}{m} {t} HTTP/1.{minor}{eol}", "\r\n".repeat(blank)).into_bytes()
        })
}

fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..128),
        (request_line(), tail.clone()).prop_map(|(a, b)| [a, b].concat()),
        tail.clone().prop_map(|t| [H2_PREFACE, &t].concat()),
        (0..H2_PREFACE.len(), tail.clone()).prop_map(|(n, t)| [&H2_PREFACE[..n], &t].concat()),
        // A TLS record header.
        (0u8..4, tail).prop_map(|(v, t)| [&[0x16, 0x03, v][..], &t].concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bytes, any split, any limit: no panic, and the same verdicts as
    /// the same bytes in one piece.
    #[test]
    fn h1_guard_arbitrary_bytes_are_chunking_invariant(
        input in prop_oneof![proptest::collection::vec(any::<u8>(), 0..2048), http_soup()],
        cuts in cuts(),
        max in prop_oneof![Just(64 * 1024), 16usize..512],
    ) {
        let whole = guard(&input, &[], max);
        let cut = guard(&input, &cuts, max);
        prop_assert_eq!(queue(&cut), queue(&whole));
        // One byte per read.
        let mut g1 = VecDeque::new();
        for b in &input {
            g1.push_back(vec![*b]);
        }
        let (mut g, v) = H1Guard::new(Chunks(g1), max);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..input.len() {
            let mut s = [0u8; 1];
            let mut buf = ReadBuf::new(&mut s);
            let _ = Pin::new(&mut g).poll_read(&mut cx, &mut buf);
        }
        prop_assert_eq!(queue(&v), queue(&whole));
    }

    /// Pipelined well-formed requests (bodies included, whatever the body
    /// bytes look like) are each judged `Ok`, once, in any split; an
    /// ambiguous head after them is the next verdict.
    #[test]
    fn h1_guard_well_formed_requests_pass_and_ambiguous_framing_is_flagged(
        reqs in proptest::collection::vec(request(), 1..5),
        bad in ambiguous_head(),
        cuts in cuts(),
    ) {
        let mut input: Vec<u8> = reqs.iter().flat_map(Req::render).collect();
        let v = guard(&input, &cuts, 64 * 1024);
        for (i, _) in reqs.iter().enumerate() {
            prop_assert_eq!(v.next(), HeadVerdict::Ok, "request {}", i);
        }
        input.extend_from_slice(&bad);
        let v = guard(&input, &cuts, 64 * 1024);
        for (i, _) in reqs.iter().enumerate() {
            prop_assert_eq!(v.next(), HeadVerdict::Ok, "request {}", i);
        }
        prop_assert_eq!(
            v.next(),
            HeadVerdict::AmbiguousFraming,
            "{}",
            String::from_utf8_lossy(&bad)
        );
    }

    /// A single ambiguous head, alone, in any split.
    #[test]
    fn h1_guard_flags_every_cl_te_combination(bad in ambiguous_head(), cuts in cuts()) {
        let v = guard(&bad, &cuts, 64 * 1024);
        prop_assert_eq!(v.next(), HeadVerdict::AmbiguousFraming);
    }

    /// `classify` never panics and never changes its mind: once a prefix is
    /// decided, every longer input is decided the same way (sniff stops at
    /// the first decision, so this is what makes it split-independent).
    #[test]
    fn detect_classify_is_total_and_monotonic(input in first_bytes()) {
        let full = classify(&input);
        let mut decided = None;
        for n in 0..=input.len() {
            let c = classify(&input[..n]);
            if let Some(d) = decided {
                prop_assert_eq!(c, Some(d), "prefix {} of {:?}", n, input);
            }
            decided = decided.or(c);
        }
        prop_assert_eq!(full, decided);
    }

    /// Every prefix of a request line is "need more" or HTTP/1, the whole
    /// line is HTTP/1; every prefix of the h2 preface is "need more" or
    /// HTTP/2, the whole preface is HTTP/2. Never a definitive wrong answer.
    #[test]
    fn detect_prefixes_are_never_misclassified(line in request_line()) {
        for n in 0..=line.len() {
            let c = classify(&line[..n]);
            prop_assert!(
                matches!(c, None | Some(Detected::Http1)),
                "{:?} for {:?}", c, String::from_utf8_lossy(&line[..n])
            );
        }
        prop_assert_eq!(classify(&line), Some(Detected::Http1));
        for n in 0..H2_PREFACE.len() {
            prop_assert_eq!(classify(&H2_PREFACE[..n]), None);
        }
        prop_assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
    }

    /// `sniff` over any split gives what `classify` says of the bytes it
    /// read, the same decision as the whole input, and `Rewind` hands the
    /// server every byte exactly once.
    #[test]
    fn detect_sniff_is_split_independent_and_rewind_is_lossless(
        input in first_bytes(),
        cuts in cuts(),
    ) {
        let chunks = split(&input, &cuts);
        let (detected, all) = RT.block_on(async {
            let mut io = Chunks(chunks);
            match sniff(&mut io, Duration::from_secs(5)).await.unwrap() {
                Sniffed::Decided(d, prefix) => {
                    let mut all = Vec::new();
                    Rewind::new(prefix, io).read_to_end(&mut all).await.unwrap();
                    (Some(d), all)
                }
                // Read to EOF undecided: the connection is dropped, nothing
                // is replayed.
                Sniffed::Closed { bytes } => (None, input[..bytes].to_vec()),
                Sniffed::Silent { .. } => panic!("a reader that never blocks cannot be silent"),
            }
        });
        prop_assert_eq!(&all, &input);
        // Decided: the same as the whole input; undecided: the whole input
        // is undecided too (sniff read to EOF).
        prop_assert_eq!(detected, classify(&input));
    }
}
