//! Giving a claim back: at once when the handler failed, or in a task of its own when the
//! store could not be reached, tried again until the store answers or the lease would have
//! lapsed anyway.

use super::{Backoff, Ctx};
use crate::metrics::{self, Stopwatch};
use crate::store::{Attempt, IdempotencyStore};

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
            // A release repeated after it applied finds the key no longer this attempt's.
            let mut backoff = Backoff::new(ctx.shared.config.lease_ttl);
            let released = loop {
                let mut watch = Stopwatch::start();
                let release = ctx.shared.store.release(ctx.scoped.as_str(), &attempt);
                let released = ctx.timed("release", &mut watch, release).await;
                if !backoff.wait_to_retry(&released).await {
                    break released;
                }
            };
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
}
