//! Giving a claim back: at once when the handler failed, or in a task of its own when the
//! store could not be reached, tried again until the store answers or the lease would have
//! lapsed anyway.

use std::future::Future;
use std::time::Duration;

use super::Ctx;
use crate::metrics::{self, Stopwatch};
use crate::store::{Attempt, IdempotencyStore, StoreError};

impl<St: IdempotencyStore> Ctx<St> {
    /// Releases the claim; `watch` was lapped when the handler finished. If the store fails,
    /// the release goes on in the background.
    pub(in crate::service) async fn release(&self, attempt: &Attempt, watch: &mut Stopwatch) {
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

    /// Releases `attempt`'s claim in a task of its own (tracked in the layer's
    /// [`DetachedWork`](crate::DetachedWork)), trying again until the store answers or the lease
    /// would have lapsed anyway.
    pub(in crate::service) fn release_in_background(&self, attempt: Attempt) {
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
    pub(in crate::service) async fn with_retries<T, F, Fut>(
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
}
