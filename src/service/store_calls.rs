//! The store calls of the protected path, each within the store timeout and measured: claim,
//! wait for an in-flight duplicate, renew, complete (tried again while the store fails) and
//! release (in the background when the store fails).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use super::Shared;
use super::response::record_of;
use super::scope::{RouteName, ScopedKey};
use crate::metrics::{self, Stopwatch};
use crate::record::CompletedRecord;
use crate::rejection::Rejection;
use crate::store::{Attempt, Claim, Fenced, IdempotencyStore, StoreError};

/// What the protected path needs besides the inner service, shared by the handler task and the
/// lease renewal.
pub(super) struct Ctx<St> {
    pub(super) shared: Arc<Shared<St>>,
    /// The scoped key the store sees.
    pub(super) scoped: ScopedKey,
    /// The route, for the warnings and errors the layer logs.
    pub(super) route: RouteName,
}

impl<St: IdempotencyStore> Ctx<St> {
    /// Store operation `name` within the store timeout, measured: its duration is `watch`'s lap
    /// when it ends, so `watch` must have been started or lapped just before.
    fn timed<'a, F>(&self, name: &'static str, watch: &'a mut Stopwatch, op: F) -> Timed<'a, F> {
        Timed {
            op,
            timer: None,
            timeout: self.shared.config.store_timeout,
            name,
            watch,
        }
    }

    /// Claims the key for `attempt`. A claim whose outcome is unknown (the store failed or timed
    /// out, or this future was dropped while the claim was on the wire) may still have been
    /// applied: it is released in the background, so the key is not left claimed by an attempt
    /// that gave up.
    pub(super) async fn claim(
        &self,
        attempt: &Attempt,
        watch: &mut Stopwatch,
    ) -> Result<Claim<St::Token>, StoreError> {
        let mut unknown = ReleaseOnDrop {
            ctx: self,
            attempt,
            armed: true,
        };
        let lease = self.shared.config.lock_ttl;
        let claim = self
            .timed(
                "claim",
                watch,
                self.shared
                    .store
                    .claim(self.scoped.as_str(), attempt, lease),
            )
            .await;
        unknown.armed = matches!(&claim, Err(err) if err.outcome_unknown());
        claim
    }

    /// Releases `attempt`'s claim in a task of its own (tracked in the layer's
    /// [`DetachedWork`](crate::DetachedWork)), trying again until the store answers or the lease
    /// would have lapsed anyway.
    pub(super) fn release_in_background(&self, attempt: Attempt) {
        let shared = self.shared.clone();
        let scoped = self.scoped;
        let route = self.route.clone();
        let started = self.shared.config.detached.spawn_release(async move {
            let ctx = Ctx {
                shared,
                scoped,
                route,
            };
            let lease = ctx.shared.config.lock_ttl;
            let released = ctx
                .with_retries("release", lease, || {
                    ctx.shared.store.release(ctx.scoped.as_str(), &attempt)
                })
                .await;
            if let Err(err) = released {
                tracing::warn!(
                    route = %ctx.route,
                    error = %err,
                    "could not release an abandoned claim; it lapses with its lease"
                );
            }
        });
        if started {
            metrics::count(metrics::BACKGROUND_RELEASES);
        } else {
            tracing::warn!(
                route = %self.route,
                "too many claims being released in the background; this one lapses with its lease"
            );
        }
    }

    /// Runs the fenced store operation `op` until it answers, trying again with back-off (50 ms
    /// doubling to 1 s) while the store fails or times out, for at most `bound`. Every
    /// operation is safe to repeat: a repeat of one that applied finds it applied.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        name: &'static str,
        bound: Duration,
        mut op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + bound;
        let mut delay = Duration::from_millis(50);
        loop {
            let mut watch = Stopwatch::start();
            match self.timed(name, &mut watch, op()).await {
                Err(err)
                    if err.outcome_unknown() && tokio::time::Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Waits (bounded in time and in concurrent waiters) for the request holding the key to
    /// finish, polling the store with exponential back-off. Returns the last claim result: the
    /// completed record to replay, `Acquired` if the holder released the key (its handler
    /// failed) and this request now owns it, or still `InFlight` when the wait ran out. `watch`
    /// is lapped at the end of the last claim.
    pub(super) async fn wait_in_flight(
        &self,
        attempt: &Attempt,
        first: Result<Claim<St::Token>, StoreError>,
        watch: &mut Stopwatch,
    ) -> Result<Claim<St::Token>, StoreError> {
        let Ok(_permit) = self.shared.config.waiters.try_acquire() else {
            tracing::debug!("too many requests waiting; not waiting");
            return first;
        };
        let deadline = tokio::time::Instant::now() + self.shared.config.wait_in_flight;
        let mut delay = Duration::from_millis(20);
        let mut claim = first;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return claim;
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(500));
            *watch = Stopwatch::start();
            claim = self.claim(attempt, watch).await;
            if !matches!(claim, Ok(Claim::InFlight { fingerprint, .. }) if fingerprint == *attempt.fingerprint())
            {
                return claim;
            }
        }
    }

    /// Renews the lease every third of its length. Never returns; stops renewing (and waits
    /// forever) once the lease is lost.
    pub(super) async fn renew_forever(&self, token: &mut St::Token) {
        let lease = self.shared.config.lock_ttl;
        let period = lease / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let mut watch = Stopwatch::start();
            match self
                .timed(
                    "renew",
                    &mut watch,
                    self.shared.store.renew(self.scoped.as_str(), token, lease),
                )
                .await
            {
                Ok(Fenced::Applied) => {
                    metrics::count(metrics::RENEWALS);
                    tracing::trace!("lease renewed");
                }
                Ok(Fenced::NotOwner) => {
                    metrics::count(metrics::LEASES_LOST);
                    tracing::warn!(
                        route = %self.route,
                        "lease lost while the handler runs: another attempt may run this key; \
                         this attempt's response will not be stored"
                    );
                    std::future::pending::<()>().await;
                }
                Err(err) => {
                    tracing::warn!(route = %self.route, error = %err, "lease renewal failed; will retry")
                }
            }
        }
    }

    /// Stores the response; `watch` was lapped when the handler finished, so the operation's
    /// duration includes building the record.
    pub(super) async fn complete(
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
        let mut stored = self
            .timed(
                "complete",
                watch,
                store.complete(self.scoped.as_str(), token, &record, ttl),
            )
            .await;
        let transactional = store.commits_handler_writes(token);
        if let Err(err) = &stored
            && err.outcome_unknown()
            && !transactional
        {
            tracing::warn!(route = %self.route, error = %err, "could not store the response; trying again");
            // Boxed: rare, and its future would make every first delivery's future larger.
            stored = Box::pin(self.complete_again(token, &record)).await;
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
                self.release(attempt, watch).await;
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

    /// Lets the store prepare the handler's unit of work ([`IdempotencyStore::prepare`]). If it
    /// fails, or this future is dropped meanwhile, the claim is released in the background.
    pub(super) async fn prepare(
        &self,
        attempt: &Attempt,
        token: &mut St::Token,
        extensions: &mut http::Extensions,
        watch: &mut Stopwatch,
    ) -> Result<(), StoreError> {
        let mut unwound = ReleaseOnDrop {
            ctx: self,
            attempt,
            armed: true,
        };
        let prepared = self
            .timed(
                "prepare",
                watch,
                self.shared.store.prepare(token, extensions),
            )
            .await;
        unwound.armed = prepared.is_err();
        prepared
    }

    /// Tries again to store a response whose first try failed: while the store fails, with
    /// back-off, for at most half the lease, renewing the lease before each try so that it
    /// cannot lapse meanwhile. Ends when the record is stored, the lease is proven lost, or the
    /// bound is reached.
    pub(super) async fn complete_again(
        &self,
        token: &mut St::Token,
        record: &CompletedRecord,
    ) -> Result<Fenced, StoreError> {
        let lease = self.shared.config.lock_ttl;
        let ttl = self.shared.config.record_ttl;
        let store = &self.shared.store;
        let key = self.scoped.as_str();
        let deadline = tokio::time::Instant::now() + lease / 2;
        let mut delay = Duration::from_millis(50);
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
            match stored {
                Err(err)
                    if err.outcome_unknown() && tokio::time::Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Ok(Fenced::Applied) => {
                    tracing::info!(route = %self.route, tries, "response stored after trying again");
                    return stored;
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Releases the claim; `watch` was lapped when the handler finished. If the store fails,
    /// the release goes on in the background.
    pub(super) async fn release(&self, attempt: &Attempt, watch: &mut Stopwatch) {
        let released = self
            .timed(
                "release",
                watch,
                self.shared.store.release(self.scoped.as_str(), attempt),
            )
            .await;
        if let Err(err) = released {
            tracing::warn!(
                route = %self.route,
                error = %err,
                "could not release the key; trying again in the background"
            );
            self.release_in_background(*attempt);
        }
    }
}

/// Releases a claim in the background when dropped armed: see [`Ctx::claim`].
struct ReleaseOnDrop<'a, St: IdempotencyStore> {
    ctx: &'a Ctx<St>,
    attempt: &'a Attempt,
    armed: bool,
}

impl<St: IdempotencyStore> Drop for ReleaseOnDrop<'_, St> {
    fn drop(&mut self) {
        if self.armed {
            self.ctx.release_in_background(*self.attempt);
        }
    }
}

pin_project_lite::pin_project! {
    /// A store operation within the store timeout, measured when it ends.
    ///
    /// The operation is polled once before any timer exists: a store that answers at once (the
    /// in-memory one, a cache) costs no timer registration and no clock read. A future of its
    /// own rather than an `async fn`, which would keep the operation twice.
    struct Timed<'a, F> {
        #[pin]
        op: F,
        // Polled unconstrained, as `tokio::time::timeout` polls its timer: an operation that
        // used up the task's scheduling budget must not keep the timeout from firing.
        #[pin]
        timer: Option<tokio::task::coop::Unconstrained<tokio::time::Sleep>>,
        timeout: Duration,
        name: &'static str,
        watch: &'a mut Stopwatch,
    }
}

impl<T, F: Future<Output = Result<T, StoreError>>> Future for Timed<'_, F> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = match this.op.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                if this.timer.is_none() {
                    let sleep = tokio::time::sleep(*this.timeout);
                    this.timer
                        .set(Some(tokio::task::coop::unconstrained(sleep)));
                }
                match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
                    Some(Poll::Ready(())) => Err(StoreError::Timeout),
                    _ => return Poll::Pending,
                }
            }
        };
        metrics::store_op(this.name, this.watch.lap(), result.is_ok());
        Poll::Ready(result)
    }
}
