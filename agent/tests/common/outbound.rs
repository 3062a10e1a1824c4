//! Pieces the outbound tests share: an HTTP app that records each request's
//! headers, the XFCC check that proves a request crossed mTLS from web to
//! orders, and a bounded read of whatever arrives before the other side
//! closes.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Response};
use http_body_util::Full;
use hyper::body::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;

use super::backend::{Http, serve};
use super::{ORDERS, WEB};

/// Headers of every request an app received, in order.
pub type SeenHeaders = Arc<Mutex<Vec<HeaderMap>>>;

/// An app on `listener` speaking `http`, recording the headers of every
/// request and answering `body`.
pub fn recording_app(listener: TcpListener, http: Http, body: &'static [u8]) -> SeenHeaders {
    let seen: SeenHeaders = Arc::new(Mutex::new(Vec::new()));
    serve(
        listener,
        http,
        seen.clone(),
        move |record: SeenHeaders, req| {
            record.lock().push(req.headers().clone());
            async move { Response::new(Full::new(Bytes::from_static(body))) }
        },
    );
    seen
}

/// The app saw exactly one request, and its XFCC says orders' agent took it
/// over mTLS from web (`missing`: the message when there is no XFCC).
pub fn assert_one_request_from_web_at_orders(seen: &SeenHeaders, missing: &str) {
    let headers = seen.lock().clone();
    assert_eq!(headers.len(), 1);
    let xfcc = headers[0]
        .get("x-forwarded-client-cert")
        .expect(missing)
        .to_str()
        .unwrap()
        .to_owned();
    assert!(xfcc.starts_with(&format!("By={ORDERS};")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={WEB}")), "{xfcc}");
}

/// Reads from `stream` until the other side closes it (an error counts as
/// closed) or `done(what arrived so far)`; what arrived. Panics with `open`
/// when nothing happens for `wait`.
pub async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
    open: &str,
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf))
            .await
            .expect(open)
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if done(&got) {
                    return got;
                }
            }
        }
    }
}
