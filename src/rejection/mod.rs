//! Responses the layer sends instead of calling the handler: why ([`RejectionKind`]), with what
//! detail and `Retry-After` ([`Rejection`]).
//!
//! A rejection renders as RFC 9457 problem details by default (`problem.rs`), or as Stripe's
//! API answers (`stripe.rs`) for APIs whose clients are Stripe's SDKs.

mod problem;
mod stripe;

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;

/// How long to tell clients to wait when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why the layer answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// `400`: the request has no idempotency key and one is required.
    MissingKey,
    /// `400`: the key is malformed, repeated, or two key headers disagree.
    InvalidKey(KeyError),
    /// `413`: the request body is larger than the layer's limit.
    PayloadTooLarge,
    /// `400`: the request body could not be read (the client went away or sent a broken body).
    BodyUnreadable,
    /// `409`: a request with the same key is still being processed. Carries `Retry-After`.
    InFlight,
    /// `422`: the key was already used for a different request (method, path or body differ).
    KeyReused,
    /// `503`: the store could not be reached in time; the handler did not run. Carries
    /// `Retry-After`.
    StoreUnavailable,
    /// `500`: the stored record for this key is unreadable; the handler did not run.
    CorruptRecord,
    /// `409`: with a store that commits the handler's writes with its record, this attempt lost
    /// its claim before it could commit (its lease lapsed and another attempt took the key
    /// over): its writes were rolled back. A retry gets the other attempt's outcome. Carries
    /// `Retry-After`.
    LeaseLost,
    /// `503`: with a store that commits the handler's writes with its record, the commit
    /// failed: the writes did not happen, and the key was released. Carries `Retry-After`.
    CommitFailed,
    /// `500`: the handler panicked or its response body failed; the claim was released, so a
    /// retry runs it again.
    HandlerFailed,
}

impl RejectionKind {
    /// The HTTP status of the rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey(_) | Self::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InFlight | Self::LeaseLost => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::StoreUnavailable | Self::CommitFailed => StatusCode::SERVICE_UNAVAILABLE,
            Self::CorruptRecord | Self::HandlerFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem `title`: a short summary, the same for every occurrence.
    pub fn title(&self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key missing",
            Self::InvalidKey(_) => "Idempotency key invalid",
            Self::PayloadTooLarge => "Request body too large",
            Self::BodyUnreadable => "Request body unreadable",
            Self::InFlight => "Request already in progress",
            Self::KeyReused => "Idempotency key reused",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::CorruptRecord => "Stored response unreadable",
            Self::LeaseLost => "Idempotency claim lost",
            Self::CommitFailed => "Commit failed",
            Self::HandlerFailed => "Request handler failed",
        }
    }
}

/// A response the layer produces itself. By default it renders as `application/problem+json`
/// (RFC 9457) with `type`, `title`, `status` and `detail`; replace the rendering with
/// [`IdempotencyLayer::rejection_with`](crate::IdempotencyLayer::rejection_with).
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    detail: Cow<'static, str>,
    retry_after: Option<Duration>,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// `400`: no key where one is required; `source` says where keys are read from.
    pub(crate) fn missing_key(source: impl fmt::Display) -> Self {
        Self::new(
            RejectionKind::MissingKey,
            format!("send a unique idempotency key in {source}"),
        )
    }

    /// `400`: the key is malformed, repeated, or two key headers disagree.
    pub(crate) fn invalid_key(err: KeyError) -> Self {
        Self::new(RejectionKind::InvalidKey(err), err.to_string())
    }

    /// `400`: the key is shorter than `min` characters.
    pub(crate) fn key_too_short(min: usize) -> Self {
        Self::new(
            RejectionKind::InvalidKey(KeyError::TooShort),
            format!(
                "the idempotency key is shorter than {min} characters; send a random key, such as a UUID"
            ),
        )
    }

    /// `413`: the body is larger than `limit` bytes.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            RejectionKind::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// `400`: the body could not be read.
    pub(crate) fn body_unreadable(err: impl fmt::Display) -> Self {
        Self::new(
            RejectionKind::BodyUnreadable,
            format!("the request body could not be read: {err}"),
        )
    }

    /// `409`: the key's first request is still running; its lease has `retry_after` left.
    pub(crate) fn in_flight(retry_after: Duration) -> Self {
        let detail = "a request with this idempotency key is still being processed; \
                      retry after the time given in Retry-After";
        Self::new(RejectionKind::InFlight, detail).with_retry_after(retry_after)
    }

    /// `422`: the key was used for a different request.
    pub(crate) fn key_reused() -> Self {
        let detail = "this idempotency key was already used for a different request \
                      (method, path or body differ); use a new key for a new request";
        Self::new(RejectionKind::KeyReused, detail)
    }

    /// `503`: the store could not answer; nothing ran.
    pub(crate) fn store_unavailable() -> Self {
        let detail = "the idempotency store is unavailable, so the request could not be \
                      processed safely; it was not processed";
        Self::new(RejectionKind::StoreUnavailable, detail).with_retry_after(STORE_RETRY_AFTER)
    }

    /// `500`: the key's stored record is unreadable; nothing ran.
    pub(crate) fn corrupt_record() -> Self {
        let detail = "the stored response for this idempotency key is unreadable; \
                      the request was not processed";
        Self::new(RejectionKind::CorruptRecord, detail)
    }

    /// `409`: the attempt lost its claim before its writes could commit; they were rolled back.
    pub(crate) fn lease_lost() -> Self {
        let detail = "another request with this idempotency key took over while this one ran; \
                      this request's changes were rolled back; retry to get the outcome";
        Self::new(RejectionKind::LeaseLost, detail).with_retry_after(STORE_RETRY_AFTER)
    }

    /// `503`: the handler's writes and the record could not be committed.
    pub(crate) fn commit_failed() -> Self {
        let detail = "the request's changes could not be committed, so none of them happened; \
                      it may be retried";
        Self::new(RejectionKind::CommitFailed, detail).with_retry_after(STORE_RETRY_AFTER)
    }

    /// `500`: the handler panicked or its body failed; the key was released.
    pub(crate) fn handler_failed() -> Self {
        let detail = "the request handler failed; the request may be retried";
        Self::new(RejectionKind::HandlerFailed, detail)
    }

    /// What went wrong.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// A human-readable explanation of this occurrence.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// When to retry, for `409` and `503`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// A response with `status` and `body` of `content_type`, carrying `Retry-After` where the
    /// rejection has one: what every rendering shares.
    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: String,
    ) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(value) = self.retry_after_header() {
            headers.insert(header::RETRY_AFTER, value);
        }
        response
    }

    /// The `Retry-After` header value: whole seconds, rounded up, at least 1.
    pub fn retry_after_header(&self) -> Option<HeaderValue> {
        self.retry_after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            HeaderValue::from(secs.max(1))
        })
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.title(), self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_at_least_one_second() {
        let r = Rejection::new(RejectionKind::InFlight, "").with_retry_after(Duration::ZERO);
        assert_eq!(r.retry_after_header().unwrap(), "1");
        let r =
            Rejection::new(RejectionKind::InFlight, "").with_retry_after(Duration::from_secs(30));
        assert_eq!(r.retry_after_header().unwrap(), "30");
    }
}
