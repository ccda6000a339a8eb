//! Operator tools: look up what the store holds for a key, and forget a completed key, given
//! what the layer scopes keys by (route, namespace, caller, key).

use std::time::{Duration, SystemTime};

use http::StatusCode;

use crate::IdempotencyLayer;
use crate::service::scope::{ScopedKey, scoped_key_of};
use crate::store::{IdempotencyStore, Lookup, StoreError};

/// Which key to look up or forget: what the layer scopes a request's key by. Its namespace is
/// the layer's own ([`IdempotencyLayer::namespace`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyQuery {
    route: String,
    key: String,
    caller: Option<String>,
}

impl KeyQuery {
    /// The key `key` sent to `route`: the route as the layer saw it, which with axum's
    /// `Router::route_layer` is the route's pattern (`/orders/{id}`), and otherwise the request
    /// path (without the query). `key` is the key as the client sent it, unquoted.
    pub fn new(route: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            route: route.into(),
            key: key.into(),
            caller: None,
        }
    }

    /// The caller part of the scope: what the layer's
    /// [`scope_with`](IdempotencyLayer::scope_with) function returned for the request. Without
    /// it, the query names the caller-less scope.
    pub fn caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }
}

/// What the store holds for a key, as [`IdempotencyLayer::inspect`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing: the next request with the key runs the handler.
    Absent,
    /// A request with the key is running; its lease has `retry_after` left.
    Running {
        /// Time left on the lease.
        retry_after: Duration,
    },
    /// The key completed; requests with it are replayed until `expires_at`.
    Completed {
        /// The stored status.
        status: StatusCode,
        /// The length of the body a replay sends (decrypted, with encryption).
        body_len: usize,
        /// The record's size in the crate's encoding, as stored (encrypted, with encryption).
        stored_bytes: usize,
        /// When the record expires.
        expires_at: SystemTime,
    },
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// Looks up what the store holds for `query`'s key without changing it (no claim is made),
    /// within the [`store_timeout`](Self::store_timeout).
    ///
    /// An encrypted record is decrypted to report its body length; one that does not decrypt
    /// is [`StoreError::Corrupt`]. A store that does not implement
    /// [`IdempotencyStore::lookup`] answers [`StoreError::Unsupported`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_idempotency::{IdempotencyLayer, KeyQuery, KeyState, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new());
    /// let query = KeyQuery::new("/orders", "order-7f3a").caller("tenant-42");
    /// assert_eq!(layer.inspect(&query).await.unwrap(), KeyState::Absent);
    /// assert!(!layer.forget(&query).await.unwrap());
    /// # }
    /// ```
    pub async fn inspect(&self, query: &KeyQuery) -> Result<KeyState, StoreError> {
        let scoped = self.scoped(query);
        let found = self
            .within_timeout(self.store().lookup(scoped.as_str()))
            .await?;
        Ok(match found {
            Lookup::Running { retry_after, .. } => KeyState::Running { retry_after },
            Lookup::Completed(record) => {
                let stored_bytes = record.encoded_len();
                let record = crate::encryption::open(&self.config, scoped.as_str(), record)?;
                KeyState::Completed {
                    status: record.status,
                    body_len: record.body.len(),
                    stored_bytes,
                    expires_at: record.expires_at,
                }
            }
            Lookup::Absent => KeyState::Absent,
        })
    }

    /// Deletes the completed record of `query`'s key, so that the next request with it runs the
    /// handler again (forcing a delivery through once more, after fixing what its first run
    /// got wrong). Answers whether a record was deleted: `false` when the key is absent or
    /// running (a running key is never forgotten; its lease ends it). Within the
    /// [`store_timeout`](Self::store_timeout).
    ///
    /// A [`LocalCache`](crate::LocalCache) of another instance may still replay the record
    /// until its expiry. A store that does not implement [`IdempotencyStore::forget`] answers
    /// [`StoreError::Unsupported`].
    pub async fn forget(&self, query: &KeyQuery) -> Result<bool, StoreError> {
        let scoped = self.scoped(query);
        // This instance's cached copy goes first, whatever the store answers.
        #[cfg(feature = "cache")]
        if let Some(cache) = &self.config.cache {
            cache.remove(scoped.as_str());
        }
        self.within_timeout(self.store().forget(scoped.as_str()))
            .await
    }

    fn scoped(&self, query: &KeyQuery) -> ScopedKey {
        scoped_key_of(
            &query.route,
            &self.config,
            query.caller.as_deref(),
            &query.key,
        )
    }

    async fn within_timeout<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.config.store_timeout, op)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }
}
