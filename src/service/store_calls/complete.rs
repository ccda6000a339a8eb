//! Storing the handler's answer: the record is built, completed under the attempt's fence and
//! (with the `cache` feature) kept in the local cache. A completion whose outcome is unknown is
//! tried again for up to half the lease, the lease renewed before each try; with a store that
//! commits the handler's writes with the record, a failed completion is final instead.

use bytes::Bytes;

use super::{Backoff, Ctx};
use crate::metrics::{self, Stopwatch};
use crate::record::CompletedRecord;
use crate::rejection::Rejection;
use crate::service::response::record_of;
use crate::store::{Attempt, Fenced, IdempotencyStore, StoreError};

impl<St: IdempotencyStore> Ctx<St> {
    /// Stores the response; `watch` was lapped when the handler finished, so the operation's
    /// duration includes building the record.
    pub(in crate::service) async fn complete(
        &self,
        attempt: &Attempt,
        token: &mut St::Token,
        parts: &mut http::response::Parts,
        body: &Bytes,
        watch: &mut Stopwatch,
    ) -> Result<(), Rejection> {
        let ttl = self.shared.config.record_ttl;
        // Built in a block of its own: a local moved into the record would otherwise keep its
        // room in this future across the store's `await`.
        let (mut record, lent) =
            { record_of(&self.shared.config, *attempt.fingerprint(), parts, body) };
        let store = &self.shared.store;
        // What the store gets: the record, or (feature `encryption`) its sealed form.
        let sealed = crate::encryption::seal(&self.shared.config, self.scoped.as_str(), &record);
        let mut stored = match &sealed {
            Ok(sealed) => {
                let to_store = sealed.as_deref().unwrap_or(&record);
                self.timed(
                    "complete",
                    watch,
                    store.complete(self.scoped.as_str(), token, to_store, ttl),
                )
                .await
            }
            Err(err) => Err(StoreError::corrupt(err.to_string())),
        };
        let transactional = store.commits_handler_writes(token);
        if let (Err(err), Ok(sealed)) = (&stored, &sealed)
            && err.outcome_unknown()
            && !transactional
        {
            tracing::warn!(route = %self.route, error = %err, "could not store the response; trying again");
            // Boxed: rare, and its future would make every first delivery's future larger.
            let to_store = sealed.as_deref().unwrap_or(&record);
            stored = Box::pin(self.complete_again(token, to_store)).await;
        }
        #[cfg(feature = "cache")]
        let cache = self
            .shared
            .config
            .cache
            .as_ref()
            .filter(|_| matches!(stored, Ok(Fenced::Applied)));
        #[cfg(not(feature = "cache"))]
        let cache: Option<std::convert::Infallible> = None;
        if lent {
            parts.headers = match cache {
                // The cache keeps the record: the response gets a copy.
                Some(_) => record.headers.clone(),
                None => std::mem::take(&mut record.headers),
            };
        }
        match stored {
            Ok(Fenced::Applied) =>
            {
                #[cfg(feature = "cache")]
                if let Some(cache) = cache {
                    cache.insert(self.scoped.as_str(), record);
                }
            }
            // The handler's writes were rolled back with the record: its answer must not go out.
            Ok(Fenced::NotOwner) if transactional => {
                metrics::count(metrics::LEASES_LOST);
                tracing::warn!(
                    route = %self.route,
                    "lease lost before the handler's writes could commit; they were rolled back"
                );
                return Err(Rejection::lease_lost());
            }
            Err(err) if transactional => {
                tracing::error!(
                    route = %self.route,
                    error = %err,
                    "could not commit the handler's writes with the response; nothing happened, \
                     the key is released"
                );
                // Boxed: rare, and its future would make every first delivery's future larger.
                Box::pin(self.release(attempt, watch)).await;
                return Err(Rejection::commit_failed());
            }
            Ok(Fenced::NotOwner) => {
                metrics::count(metrics::LEASES_LOST);
                tracing::warn!(
                    route = %self.route,
                    "lease lost before the response could be stored; the response was not stored"
                );
            }
            Err(err) => tracing::error!(
                route = %self.route,
                error = %err,
                "could not store the response after trying for half the lease; the key stays \
                 claimed until its lease lapses, and a retry after that runs the handler again"
            ),
        }
        Ok(())
    }

    /// Tries again to store a response whose first try failed: while the store fails, with
    /// back-off, for at most half the lease, renewing the lease before each try so that it
    /// cannot lapse meanwhile. Ends when the record is stored, the lease is proven lost, or the
    /// bound is reached.
    async fn complete_again(
        &self,
        token: &mut St::Token,
        record: &CompletedRecord,
    ) -> Result<Fenced, StoreError> {
        let lease = self.shared.config.lease_ttl;
        let ttl = self.shared.config.record_ttl;
        let store = &self.shared.store;
        let key = self.scoped.as_str();
        let mut backoff = Backoff::new(lease / 2);
        for tries in 2.. {
            metrics::count(metrics::COMPLETE_RETRIES);
            // The lease first: a renewal that finds the key no longer running is not final (a
            // complete whose reply was lost may have applied); the complete decides.
            let mut watch = Stopwatch::start();
            let _ = self
                .timed("renew", &mut watch, store.renew(key, token, lease))
                .await;
            let stored = self
                .timed(
                    "complete",
                    &mut watch,
                    store.complete(key, token, record, ttl),
                )
                .await;
            if matches!(stored, Ok(Fenced::Applied)) {
                tracing::info!(route = %self.route, tries, "response stored after trying again");
                return stored;
            }
            if !backoff.wait_to_retry(&stored).await {
                return stored;
            }
        }
        unreachable!("the loop returns")
    }
}
