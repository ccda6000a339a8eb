//! The same client behaviour as a `reqwest-middleware` middleware.

use std::sync::Arc;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Error, Middleware, Next, Result};
use tracing::Instrument;

use super::attempts::Attempts;
use super::key;
use super::layer::{IdempotentClientLayer, Settings};
use super::outcome::AttemptTimedOut;
use crate::key::IdempotencyKey;

/// The client behaviour of [`IdempotentClientLayer`] for
/// [`reqwest_middleware::ClientWithMiddleware`]: keys stamped once, retries with the same key
/// and body, the [`ClientOutcome`](super::ClientOutcome) in the final response's extensions.
///
/// ```
/// use tower_idempotency::client::{IdempotencyMiddleware, IdempotentClientLayer};
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(IdempotencyMiddleware::new())
///     .build();
///
/// // Other settings: those of the Tower layer.
/// let middleware = IdempotencyMiddleware::from(IdempotentClientLayer::new().max_attempts(3));
/// ```
///
/// A key of the caller's own goes in the request's `Idempotency-Key` header or, as an
/// [`IdempotencyKey`], in its middleware extensions
/// (`client.post(url).with_extension(key)`). A body sent as a stream
/// (`reqwest::Body::wrap_stream`) or larger than
/// [`max_replay_body`](IdempotentClientLayer::max_replay_body) is sent once.
///
/// Errors: the last attempt's, unchanged. Connection, timeout, request and body errors are
/// retried; builder, redirect and decoding errors, and errors from other middleware, are not.
/// An [`attempt_timeout`](IdempotentClientLayer::attempt_timeout) that elapses is an
/// [`Error::Middleware`] holding an [`AttemptTimedOut`].
#[derive(Clone, Debug, Default)]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub struct IdempotencyMiddleware {
    settings: Arc<Settings>,
}

impl IdempotencyMiddleware {
    /// The middleware with the default settings (those of [`IdempotentClientLayer::new`]).
    pub fn new() -> Self {
        Self::default()
    }
}

impl From<IdempotentClientLayer> for IdempotencyMiddleware {
    fn from(layer: IdempotentClientLayer) -> Self {
        Self {
            settings: layer.settings(),
        }
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<Response> {
        let method = req.method().clone();
        let stamped = key::stamp(
            &self.settings,
            &method,
            req.headers_mut(),
            extensions.get::<IdempotencyKey>(),
        );
        // A body of bytes can be sent again; a stream cannot.
        let replayable = req.body().is_none_or(|body| {
            body.as_bytes()
                .is_some_and(|b| b.len() <= self.settings.max_replay_body)
        });
        let uri = http::Uri::try_from(req.url().as_str()).unwrap_or_default();
        let attempts = Attempts::start(
            self.settings.clone(),
            req.method(),
            &uri,
            stamped,
            replayable,
        );
        let span = attempts.span().clone();
        send(req, extensions, next, attempts).instrument(span).await
    }
}

/// Sends until an answer is final or the budgets are spent.
async fn send(
    req: Request,
    extensions: &mut Extensions,
    next: Next<'_>,
    mut attempts: Attempts,
) -> Result<Response> {
    let mut kept = Some(req);
    loop {
        let this = match attempts.may_retry() {
            true => kept.as_ref().and_then(Request::try_clone),
            false => None,
        };
        let this = match this {
            Some(copy) => copy,
            None => kept
                .take()
                .expect("a request with no retry left is sent once"),
        };
        attempts.sending();
        let call = next.clone().run(this, extensions);
        let result = match attempts.attempt_timeout() {
            None => call.await,
            Some(after) => tokio::time::timeout(after, call)
                .await
                .unwrap_or_else(|_| Err(Error::middleware(AttemptTimedOut { after }))),
        };
        let wait = match &result {
            Ok(res) => attempts.after_response(res.status(), res.headers()),
            Err(err) => attempts.after_error(err, retried(err)),
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
        drop(result);
        tokio::time::sleep(wait).await;
    }
}

/// Whether an error is one a resend may cure: the request may not have arrived, or its answer
/// was lost. Our own attempt timeout is one too.
fn retried(err: &Error) -> bool {
    match err {
        Error::Reqwest(err) => {
            !(err.is_builder() || err.is_redirect() || err.is_decode() || err.is_status())
        }
        Error::Middleware(err) => err.downcast_ref::<AttemptTimedOut>().is_some(),
    }
}
