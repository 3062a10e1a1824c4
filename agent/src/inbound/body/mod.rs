//! The body steps of the inbound pipeline (DESIGN §6 "validate" and "mask"):
//! what `PolicyEngine::decide` cannot settle from the headers alone.
//!
//! - [`validate_request`] (after the global rate limits, before forward): the
//!   size of a body whose length is not declared, counted while it streams
//!   ([`LimitedBody`]), and JSON Schema (the body is read up to a cap,
//!   validated, and forwarded from memory). The media type is the engine's
//!   (the one place it is checked).
//! - [`ClientBody`]: the client's body, remembering whether the client broke
//!   its own framing (answered as that, never as "app unreachable").
//! - [`prepare_mask`] (before forward) and [`mask_response`] (right after
//!   it): redaction and masking of a JSON response by JSON pointer.
//!
//! Routes without body rules or a response mask pay nothing: the request
//! body is boxed once (as the forward step always did) and the response is
//! returned as it came. Nothing here buffers without a cap.

mod client;
mod limited;
mod mask;
mod validate;

use hyper::body::{Body, Bytes};

pub use client::{ClientBody, ClientBodyError, ClientFailure};
pub use limited::{BodyTooLarge, LimitSignal, LimitedBody};
pub use mask::{MAX_MASKED_RESPONSE_BYTES, MaskPlan, Unmaskable, mask_response, prepare_mask};
pub use validate::{DEFAULT_SCHEMA_BODY_CAP, Refusal, Validated, validate_request};

use super::request::BoxError;

/// Audit reason codes of the body steps.
pub mod reason {
    /// Same code as the engine's `Reason::BodyTooLarge`: one reason for a
    /// declared and a counted size.
    pub const BODY_TOO_LARGE: &str = "validation.body_too_large";
    pub const SCHEMA: &str = "validation.schema";
    pub const BODY_UNREADABLE: &str = "validation.body_unreadable";
    pub const UNMASKABLE: &str = "response.unmaskable";
}

/// Whether `error` or anything in its source chain is a [`BodyTooLarge`]:
/// how the forward step tells a limit that tripped while the request body
/// streamed to the app (answer 413) from an app failure (502). hyper's
/// HTTP/1 client keeps the body's error as the source of its own, so the
/// chain reaches it; over HTTP/2 see [`LimitSignal`] and [`over_limit`].
pub fn exceeded_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a failed forward was the request body going over its limit:
/// `signal` (from [`Validated::limit`]) tripped, or a [`BodyTooLarge`] is in
/// the error's source chain.
pub fn over_limit(error: &(dyn std::error::Error + 'static), signal: Option<&LimitSignal>) -> bool {
    signal.is_some_and(LimitSignal::tripped) || exceeded_limit(error)
}

/// Why [`collect_capped`] stopped.
#[derive(Debug)]
enum CollectError {
    TooLarge,
    Read(BoxError),
}

/// Reads a whole body, refusing more than `cap` bytes of data. Trailers are
/// dropped: the caller forwards the bytes with a `Content-Length`.
///
/// A body that arrives in one chunk is returned without copying; otherwise
/// the chunks are copied into one buffer, sized from the declared length
/// (bounded by `cap`) when there is one.
async fn collect_capped<B>(mut body: B, cap: u64) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;

    let declared = body.size_hint().lower();
    if declared > cap {
        return Err(CollectError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Read(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len() as u64);
        if total > cap {
            return Err(CollectError::TooLarge);
        }
        if first.is_none() && buf.is_empty() {
            first = Some(data);
            continue;
        }
        if let Some(f) = first.take() {
            // `declared <= cap`, and `cap` fits in memory by construction.
            let hint = usize::try_from(declared.max(total)).unwrap_or(usize::MAX);
            buf.reserve(hint);
            buf.extend_from_slice(&f);
        }
        buf.extend_from_slice(&data);
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;

    use super::*;

    /// A body delivering the given chunks one frame at a time.
    struct Chunks(VecDeque<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
            )
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().copied().collect())
    }

    #[tokio::test]
    async fn collects_up_to_the_cap_and_refuses_more() {
        let body = collect_capped(chunks(&[b"ab", b"cd", b"e"]), 5)
            .await
            .unwrap();
        assert_eq!(&body[..], b"abcde");
        assert!(matches!(
            collect_capped(chunks(&[b"ab", b"cd", b"ef"]), 5).await,
            Err(CollectError::TooLarge)
        ));
        let single = Full::new(Bytes::from_static(b"xyz"));
        assert_eq!(&collect_capped(single, 3).await.unwrap()[..], b"xyz");
        // A declared length over the cap is refused before reading.
        let declared = Full::new(Bytes::from_static(b"xyzw"));
        assert!(matches!(
            collect_capped(declared, 3).await,
            Err(CollectError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn limited_body_errors_once_past_the_limit() {
        let mut body = LimitedBody::new(chunks(&[b"abc", b"de", b"f"]), 5);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"abc");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&second[..], b"de");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(exceeded_limit(&*err), "{err}");
        // Stays failed: never a clean end once the limit tripped.
        assert!(body.frame().await.unwrap().is_err());

        let signal = LimitSignal::default();
        let mut body = LimitedBody::with_signal(chunks(&[b"abc", b"def"]), 5, signal.clone());
        assert!(body.frame().await.unwrap().is_ok());
        assert!(!signal.tripped());
        assert!(body.frame().await.unwrap().is_err());
        assert!(signal.tripped());

        let ok = LimitedBody::new(chunks(&[b"abc", b"de"]), 5)
            .collect()
            .await;
        assert_eq!(&ok.unwrap().to_bytes()[..], b"abcde");
    }
}
