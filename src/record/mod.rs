//! Stored records: the completed response that is replayed ([`CompletedRecord`]), its compact
//! binary encoding (`encoding.rs`), and the running record the Redis store keeps while a
//! request runs (`running.rs`).

mod encoding;
// The running record and `Stored` are only used by stores that keep encoded bytes (Redis).
#[cfg(feature = "redis")]
mod running;

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::clock::{from_unix_ms, unix_ms_of};
use crate::fingerprint::Fingerprint;

pub use encoding::DecodeError;
#[cfg(feature = "redis")]
pub(crate) use running::{RunningRecord, Stored};

/// A completed request as the store keeps it: the fingerprint of the request that produced it
/// and the response to replay.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CompletedRecord {
    /// Fingerprint of the request that ran.
    pub fingerprint: Fingerprint,
    /// Status of the original response.
    pub status: StatusCode,
    /// Headers of the original response, hop-by-hop and excluded headers removed. The stores
    /// keep records encoded, which does not carry a value's
    /// [`is_sensitive`](http::HeaderValue::is_sensitive) flag (HTTP/2's never-indexed hint): a replay
    /// from the store has it unset.
    pub headers: HeaderMap,
    /// Body of the original response (empty when [`body_omitted`](Self::body_omitted)).
    pub body: Bytes,
    /// The original body was larger than the layer's response limit and was not stored: the
    /// replay carries the original status and headers with an empty body.
    pub body_omitted: bool,
    /// When the record expires (to the millisecond). Set by the layer when it completes a
    /// request; a store must keep it with the record, since the local cache bounds how long it
    /// keeps a record by it.
    pub expires_at: SystemTime,
}

impl CompletedRecord {
    /// A record of a response with `status`, no headers and an empty body, expiring at
    /// `expires_at` (kept to the millisecond).
    pub fn new(fingerprint: Fingerprint, status: StatusCode, expires_at: SystemTime) -> Self {
        Self {
            fingerprint,
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            body_omitted: false,
            expires_at: from_unix_ms(unix_ms_of(expires_at)),
        }
    }

    /// Sets the headers.
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// Marks the body as not stored (it was over the response limit): the body is emptied and
    /// [`body_omitted`](Self::body_omitted) set.
    pub fn with_body_omitted(mut self) -> Self {
        self.body = Bytes::new();
        self.body_omitted = true;
        self
    }

    /// [`expires_at`](Self::expires_at) in milliseconds since the Unix epoch.
    pub(crate) fn expires_at_ms(&self) -> u64 {
        unix_ms_of(self.expires_at)
    }
}
