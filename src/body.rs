//! Buffering a body into one `Bytes`.

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

use crate::BoxError;

/// Why a body could not be buffered.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// More than the limit arrived.
    TooLarge,
    /// The body failed.
    Failed(BoxError),
}

/// Reads `body` to its end into one buffer, refusing more than `limit` bytes.
///
/// A body that arrives as a single chunk (the usual case for a small request or response) is
/// returned as that chunk, without a copy or an allocation; several chunks are joined into one
/// buffer sized from the first two and the body's size hint. Trailers are dropped.
pub(crate) async fn read_to_bytes<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| ReadError::Failed(err.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let n = data.remaining();
        if n == 0 {
            continue;
        }
        len = len.saturating_add(n);
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        if let Some(joined) = &mut joined {
            joined.extend_from_slice(&data.copy_to_bytes(n));
        } else if let Some(head) = &first {
            // Sized from the size hint, but never far beyond what has arrived: a client may
            // announce a large body and then stall, and a response's hint may be wrong.
            let hint = usize::try_from(body.size_hint().lower()).unwrap_or(0);
            let capacity = len
                .saturating_add(hint)
                .min(limit)
                .min(len.saturating_mul(2).max(16 * 1024));
            let mut buf = BytesMut::with_capacity(capacity);
            buf.extend_from_slice(head);
            buf.extend_from_slice(&data.copy_to_bytes(n));
            joined = Some(buf);
        } else {
            first = Some(data.copy_to_bytes(n));
        }
    }
    Ok(joined.map_or_else(|| first.unwrap_or_default(), BytesMut::freeze))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = Infallible> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn joins_chunks_in_order() {
        let body = read_to_bytes(chunks(&[b"ab", b"", b"cd", b"e"]), 100).await;
        assert_eq!(body.unwrap(), Bytes::from_static(b"abcde"));
        let one = read_to_bytes(Full::new(Bytes::from_static(b"xyz")), 3).await;
        assert_eq!(one.unwrap(), Bytes::from_static(b"xyz"));
        let empty = read_to_bytes(chunks(&[]), 0).await;
        assert_eq!(empty.unwrap(), Bytes::new());
    }

    #[tokio::test]
    async fn refuses_more_than_the_limit() {
        let over = read_to_bytes(chunks(&[b"ab", b"cd"]), 3).await;
        assert!(matches!(over, Err(ReadError::TooLarge)), "{over:?}");
        let hinted = read_to_bytes(Full::new(Bytes::from_static(b"abcd")), 3).await;
        assert!(matches!(hinted, Err(ReadError::TooLarge)), "{hinted:?}");
        let exact = read_to_bytes(chunks(&[b"ab", b"c"]), 3).await;
        assert_eq!(exact.unwrap(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn passes_on_body_errors() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("reset")),
        ];
        let failed = read_to_bytes(StreamBody::new(futures_util::stream::iter(frames)), 10).await;
        match failed {
            Err(ReadError::Failed(err)) => assert_eq!(err.to_string(), "reset"),
            other => panic!("{other:?}"),
        }
    }
}
