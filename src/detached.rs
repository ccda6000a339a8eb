//! Work a layer leaves running on its own, and the handle to wait for it on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::task::TaskTracker;

/// The most claims released in the background at once, per layer; past it, a claim whose
/// outcome was lost is left to lapse with its lease.
const MAX_BACKGROUND_RELEASES: usize = 4096;

/// The work an [`IdempotencyLayer`](crate::IdempotencyLayer) has left running on its own:
///
/// - handlers whose client went away (the layer never cancels a handler halfway), with storing
///   or releasing their claims;
/// - releases of claims whose outcome was lost (the store timed out, the connection dropped, or
///   the client left while the claim was on the wire), and of claims a failed handler could not
///   release at once.
///
/// A server shutting down gracefully stops accepting requests and waits for the ones still
/// connected; this work belongs to none of them. Wait for it too, or a handler whose client left
/// is cut off halfway and its key stays claimed until its lease lapses:
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// let detached = layer.detached_work();
/// let app: Router = Router::new().route("/pay", post(|| async { "ok" })).route_layer(layer);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// if !detached.wait_for(Duration::from_secs(30)).await {
///     eprintln!("{} detached requests still running at exit", detached.len());
/// }
/// # Ok(()) }
/// ```
///
/// Clones (and every clone of the layer) share the same work.
#[derive(Clone, Debug, Default)]
pub struct DetachedWork {
    tracker: TaskTracker,
    releases: Arc<AtomicUsize>,
}

impl DetachedWork {
    /// The number of pieces of work still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no work is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Completes once no work is running; work that starts meanwhile is waited for too.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// [`wait`](Self::wait)s at most `timeout`. Returns whether all work finished.
    pub async fn wait_for(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait()).await.is_ok()
    }

    /// Runs `future` on the current runtime as tracked work. Without a runtime nothing could
    /// drive it: it is dropped, and returns `false`.
    pub(crate) fn spawn<F>(&self, future: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.tracker.spawn_on(future, &runtime);
                true
            }
            Err(_) => false,
        }
    }

    /// Runs a background release, unless `MAX_BACKGROUND_RELEASES` already run.
    pub(crate) fn spawn_release<F>(&self, release: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.releases.fetch_add(1, Ordering::Relaxed) >= MAX_BACKGROUND_RELEASES {
            self.releases.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        // Given back when the release ends, panics included, or when it could not be spawned.
        let slot = ReleaseSlot(self.releases.clone());
        self.spawn(async move {
            let _slot = slot;
            release.await;
        })
    }
}

struct ReleaseSlot(Arc<AtomicUsize>);

impl Drop for ReleaseSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
