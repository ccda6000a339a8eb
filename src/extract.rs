//! The axum extractor for [`IdempotencyKey`].

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use crate::key::IdempotencyKey;

/// Extracts the key of a request the layer let through to the handler (axum 0.8; on another
/// axum version, take it as that version's `Extension<IdempotencyKey>`).
///
/// Use `Option<IdempotencyKey>` on routes where the key is optional
/// ([`require_key(false)`](crate::IdempotencyLayer::require_key)).
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};
///
/// async fn charge(key: IdempotencyKey) -> String {
///     // Forward the key to a payment provider, or store it with the side effect.
///     format!("charged once for key of {} chars", key.as_str().len())
/// }
///
/// let app: Router = Router::new()
///     .route("/charges", post(charge))
///     .route_layer(IdempotencyLayer::new(MemoryStore::new()));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = MissingKeyExtension;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<IdempotencyKey>()
            .cloned()
            .ok_or(MissingKeyExtension)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<IdempotencyKey>().cloned())
    }
}

/// The handler asked for an [`IdempotencyKey`] but the request has none: the route is not behind
/// [`IdempotencyLayer`](crate::IdempotencyLayer), or the key is optional there. Renders as `500`:
/// it is a server configuration error, not the client's.
#[derive(Debug, Clone, Copy)]
pub struct MissingKeyExtension;

impl std::fmt::Display for MissingKeyExtension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "no idempotency key in the request extensions: is the route behind IdempotencyLayer?",
        )
    }
}

impl std::error::Error for MissingKeyExtension {}

impl IntoResponse for MissingKeyExtension {
    fn into_response(self) -> Response {
        let body = format!(
            "{{\"type\":\"about:blank\",\"title\":\"Internal Server Error\",\"status\":500,\"detail\":\"{self}\"}}"
        );
        (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            [(http::header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}
