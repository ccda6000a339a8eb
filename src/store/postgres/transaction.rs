//! Transactional mode: the transaction the layer opens for a claimed request, shared with the
//! handler through [`PgTx`].

use std::sync::Arc;

use sqlx::{PgConnection, Postgres, Transaction};

use crate::store::{Attempt, StoreError};

/// A transaction shared by the layer and the handler's [`PgTx`]: the layer takes it back to
/// complete and commit it.
pub(super) type SharedTx = Arc<tokio::sync::Mutex<Option<Transaction<'static, Postgres>>>>;

/// What [`PgStore`](super::PgStore) remembers about a claim it granted: the attempt, and in transactional mode
/// the transaction opened for its handler. Dropped without a complete, the transaction rolls
/// back.
#[derive(Debug)]
pub struct PgToken {
    pub(super) attempt: Attempt,
    pub(super) tx: Option<SharedTx>,
}

/// The handler's share of the request's transaction, with [`PgStore::transactional`](super::PgStore::transactional): run the
/// handler's queries on [`PgTx::conn`], and the layer commits them together with the stored
/// response, or rolls them back. The handler cannot commit or roll back itself.
///
/// With the `axum` feature it is an extractor; the request must come through the layer over a
/// transactional `PgStore`, or the extractor answers `500`.
///
/// # Example
///
/// A webhook receiver whose stock change commits with its stored response: a crash before the
/// commit leaves neither, and the sender's retry runs the handler once.
///
/// ```no_run
/// use axum::{Router, http::StatusCode, routing::post};
/// use tower_idempotency::{IdempotencyLayer, PgStore, PgTx};
///
/// async fn order_paid(tx: PgTx, body: String) -> Result<&'static str, StatusCode> {
///     let sku = body.trim();
///     let mut conn = tx.conn().await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
///     let changed = sqlx::query("UPDATE stock SET qty = qty - 1 WHERE sku = $1 AND qty > 0")
///         .bind(sku)
///         .execute(&mut *conn)
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     // A 4xx is stored and replayed like a 2xx; a 5xx rolls back and releases the key.
///     match changed.rows_affected() {
///         1 => Ok("applied"),
///         _ => Err(StatusCode::UNPROCESSABLE_ENTITY),
///     }
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
///     sqlx::query("CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, qty bigint NOT NULL)")
///         .execute(&pool)
///         .await?;
///     let store = PgStore::new(pool).transactional(true);
///     store.migrate().await?;
///     let app = Router::new()
///         .route("/webhooks/order-paid", post(order_paid))
///         .route_layer(IdempotencyLayer::new(store));
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
///     axum::serve(listener, app).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug)]
pub struct PgTx(pub(super) SharedTx);

impl PgTx {
    /// The transaction's connection, for the handler's queries:
    /// `sqlx::query(..).execute(&mut *tx.conn().await?)`. Hold it only for a query or a few:
    /// the layer needs it back when the handler answers.
    pub async fn conn(
        &self,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, PgConnection>, StoreError> {
        tokio::sync::MutexGuard::try_map(self.0.lock().await, |slot| {
            slot.as_mut().map(|tx| &mut **tx)
        })
        .map_err(|_| StoreError::backend("the request's transaction has ended"))
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PgTx {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<PgTx>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "PgTx needs the idempotency layer over a PgStore in transactional mode",
        ))
    }
}
