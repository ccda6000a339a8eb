//! How much of its answer a handler lets the layer keep for replays.

use http::{Extensions, response};

/// What the layer keeps of one response for replays, decided by the handler: insert it in the
/// response's extensions (or, with axum, return it among the response parts).
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::Json;
/// use tower_idempotency::StorePolicy;
///
/// // A one-time secret: the first caller gets it, a retry gets `201` and an empty body.
/// async fn create_api_key() -> (StorePolicy, Json<serde_json::Value>) {
///     (StorePolicy::StatusAndHeaders, Json(serde_json::json!({ "secret": "sk_live_..." })))
/// }
/// # }
/// ```
///
/// Without the extension the layer keeps what its settings say: the whole response, within
/// [`max_response_body`](crate::IdempotencyLayer::max_response_body), or its status alone with
/// [`status_only`](crate::IdempotencyLayer::status_only). A policy only ever keeps less:
/// a response that [`store_response_with`](crate::IdempotencyLayer::store_response_with) does
/// not store (by default a `5xx`) releases its key whatever the policy, and `status_only` wins
/// over [`StatusAndHeaders`](Self::StatusAndHeaders).
///
/// The first caller always gets the handler's whole response; a duplicate that arrives while
/// the handler runs gets `409` as usual. The layer removes the extension from the responses it
/// protects before answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StorePolicy {
    /// Keep the response as the layer's settings say (the default).
    #[default]
    Full,
    /// Keep the status and headers, not the body: a replay gets the original status and
    /// headers (without `Content-Length`) and an empty body, as for a body over
    /// [`max_response_body`](crate::IdempotencyLayer::max_response_body). For a body that
    /// must reach one caller only, a one-time secret in it; headers are replayed, so a secret
    /// in a header (a link in `Location`, a `Set-Cookie`) needs
    /// [`ProcessedOnly`](Self::ProcessedOnly) or
    /// [`exclude_headers`](crate::IdempotencyLayer::exclude_headers).
    StatusAndHeaders,
    /// Keep only that the request was processed, and its status: a replay gets the original
    /// status, no headers and an empty body (the same record
    /// [`status_only`](crate::IdempotencyLayer::status_only) keeps), with
    /// `Idempotent-Replayed: true` as every replay.
    ProcessedOnly,
    /// Keep nothing and release the key: a retry runs the handler again. For answers that are
    /// not final (an upstream said "try later") but not a `5xx`. With
    /// `PgStore` in transactional mode, the handler's writes are rolled back,
    /// as for any response that is not stored.
    DoNotStore,
}

impl StorePolicy {
    /// The policy a response carries, [`Full`](Self::Full) if none.
    pub(crate) fn of(extensions: &Extensions) -> Self {
        extensions.get::<Self>().copied().unwrap_or_default()
    }

    /// Whether the handler lets `parts` be stored at all.
    pub(crate) fn stores(parts: &response::Parts) -> bool {
        Self::of(&parts.extensions) != Self::DoNotStore
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum::response::IntoResponseParts for StorePolicy {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}
