//! Request bodies kept to be sent again: buffered when small and of known length, else sent
//! once.

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::BoxError;

/// A request body, ready for one attempt or for many.
#[derive(Debug)]
pub(crate) enum Payload<B> {
    /// Buffered: every attempt gets its own copy (a reference-counted `Bytes`, not a copy of
    /// the bytes).
    Replayable(Bytes),
    /// Sent once, as the caller gave it; `None` once sent.
    Once(Option<B>),
}

impl<B> Payload<B>
where
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    /// Buffers `body` when its length is known exactly (`size_hint().exact()`, as for a
    /// `Full<Bytes>`, a `String`, or any body built from bytes) and at most `limit`; any other
    /// body (a stream, or a large one) is kept as it is, to be sent once.
    pub(crate) async fn prepare(body: B, limit: usize) -> Result<Self, BoxError> {
        match body.size_hint().exact() {
            Some(len) if len <= limit as u64 => {
                // The limit also guards against a body longer than its own hint.
                let collected = Limited::new(body, limit).collect().await?;
                Ok(Self::Replayable(collected.to_bytes()))
            }
            _ => Ok(Self::Once(Some(body))),
        }
    }

    /// Whether the body can be sent more than once.
    pub(crate) fn replayable(&self) -> bool {
        matches!(self, Self::Replayable(_))
    }

    /// The body for the next attempt. A body sent once is taken; calling this again then
    /// gives an empty body (never done: such a request has a single attempt).
    pub(crate) fn next(&mut self) -> B {
        match self {
            Self::Replayable(bytes) => B::from(bytes.clone()),
            Self::Once(body) => body.take().unwrap_or_else(|| B::from(Bytes::new())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    #[tokio::test]
    async fn bodies_of_known_small_length_are_replayed() {
        let mut payload = Payload::prepare(Full::new(Bytes::from_static(b"order")), 16)
            .await
            .unwrap();
        assert!(payload.replayable());
        for _ in 0..3 {
            let body = payload.next().collect().await.unwrap().to_bytes();
            assert_eq!(body, "order");
        }
    }

    #[tokio::test]
    async fn large_bodies_are_sent_once() {
        let payload = Payload::prepare(Full::new(Bytes::from_static(b"too long")), 4)
            .await
            .unwrap();
        assert!(!payload.replayable());
    }

    /// A streaming body that can still be built from bytes, as `axum::body::Body` or
    /// `reqwest::Body` can.
    struct Streamed(http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>);

    impl From<Bytes> for Streamed {
        fn from(bytes: Bytes) -> Self {
            Self(Full::new(bytes).boxed_unsync())
        }
    }

    impl Body for Streamed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::pin::Pin::new(&mut self.0).poll_frame(cx)
        }
        fn size_hint(&self) -> http_body::SizeHint {
            self.0.size_hint()
        }
    }

    #[tokio::test]
    async fn streams_are_sent_once_untouched() {
        let chunks = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"a"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"b"))),
        ]);
        let body = Streamed(StreamBody::new(chunks).boxed_unsync());
        let mut payload = Payload::prepare(body, 1024).await.unwrap();
        assert!(!payload.replayable());
        let sent = payload.next().collect().await.unwrap().to_bytes();
        assert_eq!(sent, "ab");
    }
}
