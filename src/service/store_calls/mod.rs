//! The store calls of the protected path, each within the store timeout and measured: claim,
//! wait for an in-flight duplicate, renew and prepare here; complete (tried again while the
//! store fails) in `complete.rs`; release (in the background when the store fails) in
//! `release.rs`. Both retries back off the same way ([`Backoff`]).

mod complete;
mod release;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::Shared;
use super::scope::{RouteName, ScopedKey};
use crate::metrics::{self, Stopwatch};
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
    pub(in crate::service) async fn claim(
        &self,
        attempt: &Attempt,
        watch: &mut Stopwatch,
    ) -> Result<Claim<St::Token>, StoreError> {
        let mut unknown = ReleaseOnDrop {
            ctx: self,
            attempt,
            armed: true,
        };
        let lease = self.shared.config.lease_ttl;
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
        // A completed record is decrypted here (feature `encryption`); one that does not
        // decrypt under this key is unreadable.
        crate::encryption::open_claim(&self.shared.config, self.scoped.as_str(), claim)
    }

    /// Waits (bounded in time and in concurrent waiters) for the request holding the key to
    /// finish, polling the store with exponential back-off. Returns the last claim result: the
    /// completed record to replay, `Acquired` if the holder released the key (its handler
    /// failed) and this request now owns it, or still `InFlight` when the wait ran out. `watch`
    /// is lapped at the end of the last claim.
    pub(in crate::service) async fn wait_in_flight(
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
    pub(in crate::service) async fn renew_forever(&self, token: &mut St::Token) {
        let lease = self.shared.config.lease_ttl;
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

    /// Lets the store prepare the handler's unit of work ([`IdempotencyStore::prepare`]). If it
    /// fails, or this future is dropped meanwhile, the claim is released in the background.
    pub(in crate::service) async fn prepare(
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
}

/// The back-off of a store call tried again while its outcome is unknown (the store failed or
/// timed out): 50 ms doubling to 1 s between tries, no try started once the next wait would
/// pass the budget. Every fenced operation is safe to repeat: a repeat of one that applied
/// finds it applied.
struct Backoff {
    deadline: tokio::time::Instant,
    delay: Duration,
}

impl Backoff {
    fn new(budget: Duration) -> Self {
        Self {
            deadline: tokio::time::Instant::now() + budget,
            delay: Duration::from_millis(50),
        }
    }

    /// Whether to try again after `result`: if so, having waited; if not, `result` is final.
    async fn wait_to_retry<T>(&mut self, result: &Result<T, StoreError>) -> bool {
        let unknown = matches!(result, Err(err) if err.outcome_unknown());
        if !unknown || tokio::time::Instant::now() + self.delay >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
        true
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
