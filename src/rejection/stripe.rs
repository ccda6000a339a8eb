//! The rejection as Stripe's API answers it, for APIs whose clients are Stripe's SDKs:
//! `{"error": {...}}` with the status and `Stripe-Should-Retry` those SDKs act on.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::problem::push_json_string;
use super::{Rejection, RejectionKind};

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

impl RejectionKind {
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
}

impl Rejection {
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
    /// | [`LeaseLost`](RejectionKind::LeaseLost) (the writes were rolled back) | `409` + `Retry-After` | `idempotency_error` | `idempotency_key_in_use` | `true` |
    /// | [`CommitFailed`](RejectionKind::CommitFailed) (nothing happened, the key was released) | `503` + `Retry-After` | `api_error` | | `true` |
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
        let mut response = self.response(stripe.status, "application/json", body);
        let should_retry = if stripe.should_retry { "true" } else { "false" };
        let should_retry = HeaderValue::from_static(should_retry);
        response
            .headers_mut()
            .insert(STRIPE_SHOULD_RETRY, should_retry);
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header;

    use super::*;
    use crate::key::KeyError;

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
            (
                RejectionKind::LeaseLost,
                409,
                IDEMPOTENCY,
                Some("idempotency_key_in_use"),
                "true",
                Some("1"),
            ),
            (
                RejectionKind::CommitFailed,
                503,
                API_ERROR,
                None,
                "true",
                Some("1"),
            ),
        ];
        for (kind, status, error_type, code, should_retry, retry_after) in cases {
            // The rejections the layer makes, where it makes one of this kind.
            let rejection = match kind {
                RejectionKind::InFlight => Rejection::in_flight(Duration::from_millis(2500)),
                RejectionKind::KeyReused => Rejection::key_reused(),
                RejectionKind::StoreUnavailable => Rejection::store_unavailable(),
                RejectionKind::LeaseLost => Rejection::lease_lost(),
                RejectionKind::CommitFailed => Rejection::commit_failed(),
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
}
