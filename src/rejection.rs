//! Responses the layer sends instead of calling the handler: RFC 9457 problem details.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;

/// How long to tell clients to wait when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The base of every problem `type` URI; the variant name is the fragment.
const TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.RejectionKind.html#variant.";

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

    /// How [`Rejection::to_stripe_response`] renders this kind.
    fn stripe(&self) -> Stripe {
        let (status, error_type, code, should_retry) = match self {
            Self::MissingKey | Self::InvalidKey(_) => {
                (StatusCode::BAD_REQUEST, INVALID_REQUEST, None, false)
            }
            // The client's own transport broke the body: the request sent again may go through.
            Self::BodyUnreadable => (StatusCode::BAD_REQUEST, INVALID_REQUEST, None, true),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, INVALID_REQUEST, None, false),
            // Once the original finishes, the same request is replayed.
            Self::InFlight => (
                StatusCode::CONFLICT,
                IDEMPOTENCY,
                Some("idempotency_key_in_use"),
                true,
            ),
            // Stripe's status for a reused key, which its SDKs raise as `IdempotencyError`.
            Self::KeyReused => (StatusCode::BAD_REQUEST, IDEMPOTENCY, None, false),
            // Another attempt took the key over: a retry gets its outcome.
            Self::LeaseLost => (
                StatusCode::CONFLICT,
                IDEMPOTENCY,
                Some("idempotency_key_in_use"),
                true,
            ),
            // Nothing happened and the key was released: a retry runs again.
            Self::StoreUnavailable | Self::CommitFailed => {
                (StatusCode::SERVICE_UNAVAILABLE, API_ERROR, None, true)
            }
            // The same unreadable record answers every retry until someone removes it.
            Self::CorruptRecord => (StatusCode::INTERNAL_SERVER_ERROR, API_ERROR, None, false),
            // The key was released: a retry runs the handler again.
            Self::HandlerFailed => (StatusCode::INTERNAL_SERVER_ERROR, API_ERROR, None, true),
        };
        Stripe {
            status,
            error_type,
            code,
            should_retry,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::MissingKey => "MissingKey",
            Self::InvalidKey(_) => "InvalidKey",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::BodyUnreadable => "BodyUnreadable",
            Self::InFlight => "InFlight",
            Self::KeyReused => "KeyReused",
            Self::StoreUnavailable => "StoreUnavailable",
            Self::CorruptRecord => "CorruptRecord",
            Self::LeaseLost => "LeaseLost",
            Self::CommitFailed => "CommitFailed",
            Self::HandlerFailed => "HandlerFailed",
        }
    }
}

const INVALID_REQUEST: &str = "invalid_request_error";
const IDEMPOTENCY: &str = "idempotency_error";
const API_ERROR: &str = "api_error";

/// A rejection as Stripe's API would answer it.
struct Stripe {
    status: StatusCode,
    error_type: &'static str,
    code: Option<&'static str>,
    should_retry: bool,
}

/// The header Stripe's SDKs read to decide whether to retry, before the status.
const STRIPE_SHOULD_RETRY: HeaderName = HeaderName::from_static("stripe-should-retry");

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

    /// The `Retry-After` header value: whole seconds, rounded up, at least 1.
    pub fn retry_after_header(&self) -> Option<HeaderValue> {
        self.retry_after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            HeaderValue::from(secs.max(1))
        })
    }

    /// The default problem+json response.
    pub fn to_response(&self) -> Response<Bytes> {
        let status = self.status();
        let mut body = String::with_capacity(200 + self.detail.len());
        body.push_str("{\"type\":\"");
        body.push_str(TYPE_BASE);
        body.push_str(self.kind.type_name());
        body.push_str("\",\"title\":");
        push_json_string(&mut body, self.kind.title());
        body.push_str(",\"status\":");
        body.push_str(&status.as_u16().to_string());
        body.push_str(",\"detail\":");
        push_json_string(&mut body, &self.detail);
        body.push('}');
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(value) = self.retry_after_header() {
            headers.insert(header::RETRY_AFTER, value);
        }
        response
    }

    /// The rejection as Stripe's API answers: `application/json` with
    /// `{"error": {"type": ..., "message": ...}}`, for APIs whose clients are Stripe's SDKs or
    /// modelled on them. Pass it to
    /// [`rejection_with`](crate::IdempotencyLayer::rejection_with):
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Rejection};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .rejection_with(Rejection::to_stripe_response);
    /// ```
    ///
    /// Stripe's SDKs then raise their `IdempotencyError` for a reused key, which Stripe answers
    /// `400` (not this crate's `422`), and retry a duplicate still in flight (`409`, as Stripe
    /// answers it) after its `Retry-After`, getting the original's response once it is stored.
    /// The `message` is [`detail`](Self::detail). Every answer also carries
    /// `Stripe-Should-Retry`, which those SDKs obey before the status: `true` where the same
    /// request sent again can be served, `false` where it would get the same answer.
    ///
    /// | kind | status | `type` | `code` | `Stripe-Should-Retry` |
    /// |---|---|---|---|---|
    /// | [`MissingKey`](RejectionKind::MissingKey), [`InvalidKey`](RejectionKind::InvalidKey) | `400` | `invalid_request_error` | | `false` |
    /// | [`BodyUnreadable`](RejectionKind::BodyUnreadable) | `400` | `invalid_request_error` | | `true` |
    /// | [`PayloadTooLarge`](RejectionKind::PayloadTooLarge) | `413` | `invalid_request_error` | | `false` |
    /// | [`InFlight`](RejectionKind::InFlight) | `409` + `Retry-After` | `idempotency_error` | `idempotency_key_in_use` | `true` |
    /// | [`KeyReused`](RejectionKind::KeyReused) | `400` | `idempotency_error` | | `false` |
    /// | [`StoreUnavailable`](RejectionKind::StoreUnavailable) | `503` + `Retry-After` | `api_error` | | `true` |
    /// | [`CorruptRecord`](RejectionKind::CorruptRecord) | `500` | `api_error` | | `false` |
    /// | [`HandlerFailed`](RejectionKind::HandlerFailed) (the key was released) | `500` | `api_error` | | `true` |
    pub fn to_stripe_response(&self) -> Response<Bytes> {
        let stripe = self.kind.stripe();
        let mut body = String::with_capacity(120 + self.detail.len());
        body.push_str("{\"error\":{\"type\":\"");
        body.push_str(stripe.error_type);
        body.push('"');
        if let Some(code) = stripe.code {
            body.push_str(",\"code\":\"");
            body.push_str(code);
            body.push('"');
        }
        body.push_str(",\"message\":");
        push_json_string(&mut body, &self.detail);
        body.push_str("}}");
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = stripe.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(value) = self.retry_after_header() {
            headers.insert(header::RETRY_AFTER, value);
        }
        let should_retry = if stripe.should_retry { "true" } else { "false" };
        headers.insert(STRIPE_SHOULD_RETRY, HeaderValue::from_static(should_retry));
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.title(), self.detail)
    }
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let cases = [
            (RejectionKind::MissingKey, 400),
            (RejectionKind::InvalidKey(KeyError::Empty), 400),
            (RejectionKind::BodyUnreadable, 400),
            (RejectionKind::PayloadTooLarge, 413),
            (RejectionKind::InFlight, 409),
            (RejectionKind::KeyReused, 422),
            (RejectionKind::StoreUnavailable, 503),
            (RejectionKind::CorruptRecord, 500),
            (RejectionKind::HandlerFailed, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
            let response = Rejection::new(kind, "x").to_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[test]
    fn body_is_problem_json() {
        let rejection = Rejection::new(RejectionKind::InFlight, "a \"quoted\"\nline\u{1}")
            .with_retry_after(Duration::from_millis(2500));
        let response = rejection.to_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["status"], 409);
        assert_eq!(json["title"], "Request already in progress");
        assert_eq!(json["detail"], "a \"quoted\"\nline\u{1}");
        assert!(
            json["type"]
                .as_str()
                .unwrap()
                .ends_with("#variant.InFlight")
        );
    }

    #[test]
    fn stripe_shape_and_statuses() {
        // kind, status, type, code, Stripe-Should-Retry, Retry-After
        let cases = [
            (
                RejectionKind::MissingKey,
                400,
                INVALID_REQUEST,
                None,
                "false",
                None,
            ),
            (
                RejectionKind::InvalidKey(KeyError::Empty),
                400,
                INVALID_REQUEST,
                None,
                "false",
                None,
            ),
            (
                RejectionKind::BodyUnreadable,
                400,
                INVALID_REQUEST,
                None,
                "true",
                None,
            ),
            (
                RejectionKind::PayloadTooLarge,
                413,
                INVALID_REQUEST,
                None,
                "false",
                None,
            ),
            (
                RejectionKind::InFlight,
                409,
                IDEMPOTENCY,
                Some("idempotency_key_in_use"),
                "true",
                Some("3"),
            ),
            (
                RejectionKind::KeyReused,
                400,
                IDEMPOTENCY,
                None,
                "false",
                None,
            ),
            (
                RejectionKind::StoreUnavailable,
                503,
                API_ERROR,
                None,
                "true",
                Some("1"),
            ),
            (
                RejectionKind::CorruptRecord,
                500,
                API_ERROR,
                None,
                "false",
                None,
            ),
            (
                RejectionKind::HandlerFailed,
                500,
                API_ERROR,
                None,
                "true",
                None,
            ),
        ];
        for (kind, status, error_type, code, should_retry, retry_after) in cases {
            // The rejections the layer makes, where it makes one of this kind.
            let rejection = match kind {
                RejectionKind::InFlight => Rejection::in_flight(Duration::from_millis(2500)),
                RejectionKind::KeyReused => Rejection::key_reused(),
                RejectionKind::StoreUnavailable => Rejection::store_unavailable(),
                kind => Rejection::new(kind, "a \"quoted\" detail"),
            };
            let response = rejection.to_stripe_response();
            assert_eq!(response.status().as_u16(), status, "{kind:?}");
            let headers = response.headers();
            assert_eq!(
                headers[header::CONTENT_TYPE],
                "application/json",
                "{kind:?}"
            );
            assert_eq!(headers["stripe-should-retry"], should_retry, "{kind:?}");
            assert_eq!(
                headers
                    .get(header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap()),
                retry_after,
                "{kind:?}"
            );
            let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            let mut expected = serde_json::json!({
                "error": { "type": error_type, "message": rejection.detail() }
            });
            if let Some(code) = code {
                expected["error"]["code"] = code.into();
            }
            assert_eq!(json, expected, "{kind:?}");
        }
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let r = Rejection::new(RejectionKind::InFlight, "").with_retry_after(Duration::ZERO);
        assert_eq!(r.retry_after_header().unwrap(), "1");
        let r =
            Rejection::new(RejectionKind::InFlight, "").with_retry_after(Duration::from_secs(30));
        assert_eq!(r.retry_after_header().unwrap(), "30");
    }
}
