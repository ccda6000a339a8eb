//! Futures that outlive their request: boxing in place, and detaching on drop.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::detached::DetachedWork;

/// Allocates room for a future, then builds it there: built first and boxed after, as
/// `Box::pin(make())` does, the whole state machine (a kilobyte or more) is built on the stack
/// and copied into the box.
pub(super) fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Drives a future in the caller's task; if dropped before the future finished, spawns the rest
/// on the current runtime as the layer's [`DetachedWork`] instead of cancelling it (without a
/// runtime, nothing could drive it: it is dropped, and a claim it held lapses with its lease).
///
/// Compared with spawning up front, a request whose client stays (nearly all of them) costs no
/// task allocation and no hop to another worker thread.
pub(super) struct DetachOnDrop<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    detached: DetachedWork,
}

impl<T: Send + 'static> DetachOnDrop<T> {
    pub(super) fn new<F: Future<Output = T> + Send + 'static>(
        detached: DetachedWork,
        make: impl FnOnce() -> F,
    ) -> Self {
        Self {
            future: Some(boxed(make)),
            detached,
        }
    }
}

impl<T: Send + 'static> Future for DetachOnDrop<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // Out of the slot while it is polled: if the poll panics, the future is dropped as the
        // panic unwinds, never spawned to be polled again.
        let mut future = self.future.take().expect("polled after completion");
        match future.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(output),
            Poll::Pending => {
                self.future = Some(future);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for DetachOnDrop<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            self.detached.spawn(async move {
                let _ = future.await;
            });
        }
    }
}
