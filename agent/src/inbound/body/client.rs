//! The client's request body, remembering whether the client broke its own
//! framing (a bad chunk, an HTTP/2 DATA length that contradicts
//! `Content-Length`, a connection cut mid-body).
//!
//! Whichever step reads the body (validation buffering it, the forward
//! streaming it to the app) only sees "the body failed"; the one exit of the
//! pipeline asks [`ClientFailure`] whose fault it was, so a client's framing
//! error is answered as one (400, or a reset HTTP/2 stream) and never as
//! "app unreachable".

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use parking_lot::Mutex;

use crate::inbound::request::BoxError;

/// Shared between the body and the exchange that owns it.
#[derive(Clone, Debug, Default)]
pub struct ClientFailure(Arc<Mutex<ClientFailureState>>);

#[derive(Debug, Default)]
struct ClientFailureState {
    failed: bool,
    /// The error as hyper reported it, kept so a reset of the HTTP/2
    /// stream carries hyper's own reason.
    error: Option<hyper::Error>,
}

impl ClientFailure {
    pub fn failed(&self) -> bool {
        self.0.lock().failed
    }

    /// The client's error, once.
    pub fn take(&self) -> Option<hyper::Error> {
        self.0.lock().error.take()
    }

    fn set(&self, error: hyper::Error) {
        let mut state = self.0.lock();
        state.failed = true;
        state.error.get_or_insert(error);
    }
}

/// What a reader of [`ClientBody`] sees when the client's body failed.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(String);

/// The request body as the client sends it.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    failure: ClientFailure,
}

impl ClientBody {
    pub fn new(inner: Incoming) -> (Self, ClientFailure) {
        let failure = ClientFailure::default();
        (
            Self {
                inner,
                failure: failure.clone(),
            },
            failure,
        )
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                let message = e.to_string();
                this.failure.set(e);
                Poll::Ready(Some(Err(Box::new(ClientBodyError(message)))))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
