//! Recording test apps: an accept loop that serves every connection with one
//! request handler, which gets its own clone of the app's state per request
//! (typically the log the test reads back).

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the app speaks.
#[derive(Clone, Copy, Debug)]
pub enum Http {
    /// HTTP/1.1 only.
    H1,
    /// HTTP/1.1 with upgrades (WebSocket).
    H1Upgrades,
    /// HTTP/2 with prior knowledge (h2c) only.
    H2,
    /// HTTP/1.1 or h2c, whichever the client speaks.
    Auto,
}

/// A listener on an ephemeral loopback port.
pub async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Serves every connection `listener` accepts, in the background, answering
/// each request with `handler(state.clone(), request)`; the address served.
pub fn serve<S, F, Fut, B>(listener: TcpListener, http: Http, state: S, handler: F) -> SocketAddr
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (state, handler) = (state.clone(), handler.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let answer = handler(state.clone(), req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let io = TokioIo::new(tcp);
                // The app's side of a connection's end is of no interest.
                match http {
                    Http::H1 => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                    Http::H1Upgrades => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    }
                    Http::H2 => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    }
                    Http::Auto => {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}
