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
