//! A request body counted while it streams to the app.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Buf, Frame, SizeHint};

use crate::inbound::request::BoxError;

/// More than the route's `maxBodyBytes` arrived. Travels as the body's error
/// through hyper to the forward step, which answers 413 when it finds it in
/// the error's source chain (see [`super::exceeded_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request body exceeds the {limit}-byte limit")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// Set once a [`LimitedBody`] tripped. The forward step checks it as well
/// as the error's source chain: hyper's HTTP/1 client keeps the body's error
/// as the source of its own, but its HTTP/2 client reports a reset stream.
#[derive(Clone, Debug, Default)]
pub struct LimitSignal(Arc<AtomicBool>);

impl LimitSignal {
    /// Whether the body went over its limit.
    pub fn tripped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Passes `inner` through unchanged, frame by frame, until more than `limit`
/// data bytes have arrived; then fails with [`BodyTooLarge`] instead of
/// passing the chunk that crossed the limit. So the app never receives more
/// than `limit` bytes, sees the request aborted (no final chunk), and
/// nothing is buffered for the count.
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    limit: u64,
    seen: u64,
    tripped: bool,
    signal: Option<LimitSignal>,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            tripped: false,
            signal: None,
        }
    }

    /// Also sets `signal` when the limit trips.
    pub fn with_signal(inner: B, limit: u64, signal: LimitSignal) -> Self {
        Self {
            signal: Some(signal),
            ..Self::new(inner, limit)
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.tripped {
            // Polled again after the error: fail again rather than end
            // cleanly, which could let a truncated body pass as whole.
            return Poll::Ready(Some(Err(BoxError::from(BodyTooLarge {
                limit: this.limit,
            }))));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let len = u64::try_from(data.remaining()).unwrap_or(u64::MAX);
            this.seen = this.seen.saturating_add(len);
            if this.seen > this.limit {
                this.tripped = true;
                if let Some(signal) = &this.signal {
                    signal.0.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(BoxError::from(BodyTooLarge {
                    limit: this.limit,
                }))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        !self.tripped && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
