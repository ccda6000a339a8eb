//! The Tower service: stamps the key once, then sends the request until an answer is final.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, request};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use super::attempts::Attempts;
use super::body::Payload;
use super::key;
use super::layer::Settings;
use super::outcome::AttemptTimedOut;
use crate::BoxError;
use crate::key::IdempotencyKey;

/// The service made by [`IdempotentClientLayer`](super::IdempotentClientLayer), around an HTTP
/// client `S` (such as hyper-util's `Client`).
///
/// Its error is the inner client's error from the last attempt, boxed (downcast it to the
/// client's own type), or [`AttemptTimedOut`]. A Tower client's errors do not say in a common
/// way whether the request left, so every error of the inner client is taken for a connection
/// failure and retried: harmless with the key, and bounded like any retry. A request body that
/// fails while it is being buffered is returned at once, before anything is sent.
///
/// The inner client must be `Clone`: the first attempt goes to the client driven to readiness
/// by `poll_ready`, a clone of it takes its place.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub struct IdempotentClient<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> IdempotentClient<S> {
    pub(crate) fn new(inner: S, settings: Arc<Settings>) -> Self {
        Self { inner, settings }
    }

    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> std::fmt::Debug for IdempotentClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The future of [`IdempotentClient`].
pub type ResponseFuture<ResB> =
    Pin<Box<dyn Future<Output = Result<Response<ResB>, BoxError>> + Send + 'static>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for IdempotentClient<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The first attempt goes to the client that was driven to readiness; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = req.into_parts();
        let chosen = parts.extensions.get::<IdempotencyKey>().cloned();
        let stamped = key::stamp(
            &self.settings,
            &parts.method,
            &mut parts.headers,
            chosen.as_ref(),
        );
        let settings = self.settings.clone();
        Box::pin(async move {
            let payload = Payload::prepare(body, settings.max_replay_body).await?;
            let attempts = Attempts::start(
                settings,
                &parts.method,
                &parts.uri,
                stamped,
                payload.replayable(),
            );
            let span = attempts.span().clone();
            send(inner, parts, payload, attempts).instrument(span).await
        })
    }
}

/// Sends until an answer is final or the budgets are spent.
async fn send<S, ReqB, ResB>(
    mut inner: S,
    parts: request::Parts,
    mut payload: Payload<ReqB>,
    mut attempts: Attempts,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ReqB: Body + From<Bytes>,
    ReqB::Error: Into<BoxError>,
{
    let mut parts = Some(parts);
    let mut first = true;
    loop {
        let head = match (attempts.may_retry(), &parts) {
            (true, Some(kept)) => copy(kept),
            _ => parts
                .take()
                .expect("a request with no retry left is sent once"),
        };
        let req = Request::from_parts(head, payload.next());
        attempts.sending();
        let result = attempt(&mut inner, req, !first, attempts.attempt_timeout()).await;
        first = false;
        let wait = match &result {
            Ok(res) => attempts.after_response(res.status(), res.headers()),
            Err(err) => attempts.after_error(err.as_ref(), true),
        };
        let Some(wait) = wait else {
            return match result {
                Ok(mut res) => {
                    let outcome = attempts.outcome(res.status(), res.headers());
                    res.extensions_mut().insert(outcome);
                    Ok(res)
                }
                Err(err) => {
                    attempts.failed();
                    Err(err)
                }
            };
        };
        // The answer being retried is dropped before the wait, freeing its connection.
        drop(result);
        tokio::time::sleep(wait).await;
    }
}

/// One attempt: readiness (for a retry; the first was made ready by the caller), the call, and
/// the attempt timeout over both.
async fn attempt<S, ReqB, ResB>(
    inner: &mut S,
    req: Request<ReqB>,
    wait_ready: bool,
    timeout: Option<std::time::Duration>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    let call = async {
        if wait_ready {
            poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
        }
        inner.call(req).await.map_err(Into::into)
    };
    match timeout {
        None => call.await,
        Some(after) => match tokio::time::timeout(after, call).await {
            Ok(result) => result,
            Err(_) => Err(AttemptTimedOut { after }.into()),
        },
    }
}

/// A copy of a request head for another attempt (`request::Parts` is not `Clone`).
fn copy(parts: &request::Parts) -> request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req.into_parts().0
}
