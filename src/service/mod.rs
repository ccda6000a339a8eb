//! The service: which requests the layer protects, and the future it answers with.
//!
//! The protected path itself (claim, run, complete or release, replay) is in `flow.rs`; the store
//! calls it makes, each within the store timeout, in `store_calls/`.

mod detach;
mod flow;
mod response;
pub(crate) mod scope;
mod store_calls;
mod trace;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body::Body;
use tower_service::Service;
use tracing::{Instrument, Span};

use self::detach::boxed;

use crate::BoxError;
use crate::config::Config;
use crate::key::{IdempotencyKey, KeyError};
use crate::rejection::Rejection;
use crate::store::IdempotencyStore;

pub use response::IDEMPOTENT_REPLAYED;

/// The service produced by [`IdempotencyLayer`](crate::IdempotencyLayer).
#[derive(Clone)]
pub struct Idempotency<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

/// The store and the settings, behind one reference count: a protected request takes one
/// `Arc` clone for both, instead of cloning the store (`RedisStore` holds four) and the
/// settings each. The settings stay the layer's own `Arc`, so making a service clones no
/// settings.
pub(crate) struct Shared<St> {
    pub(crate) store: St,
    pub(crate) config: Arc<Config>,
}

impl<S, St> std::fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: St, config: Arc<Config>) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared { store, config }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Idempotency`].
    ///
    /// Dropped before it finished (the client went away, an outer timeout fired) once its request
    /// has claimed its key, it is not cancelled: what is left (the handler, storing or releasing
    /// the claim) runs on in a task of its own, so a handler is never stopped halfway and a claim
    /// is always completed or released. Dropped earlier (reading the body, claiming, waiting for
    /// an in-flight duplicate), it is cancelled like any future.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

type BoxFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        // A request the layer does not protect: the inner service's own future, unboxed.
        Passthrough { #[pin] future: F },
        // A rejection decided before any I/O.
        Ready { response: Option<Response<B>> },
        // The protected path.
        Protected { future: BoxFuture<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    fn protected(future: BoxFuture<B, E>) -> Self {
        Self {
            kind: Kind::Protected { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future.poll(cx),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Protected { future } => future.as_mut().poll(cx),
        }
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// What the layer does with a request, given what its key source found.
enum KeyDecision {
    Protect(IdempotencyKey),
    PassThrough,
    Reject(Rejection),
}

impl KeyDecision {
    /// The one key policy, for keys read from the head and from the body alike.
    fn of(config: &Config, found: Result<Option<IdempotencyKey>, KeyError>) -> Self {
        match found {
            Ok(Some(key)) if key.as_str().len() < config.min_key_len => {
                Self::Reject(Rejection::key_too_short(config.min_key_len))
            }
            Ok(Some(key)) => Self::Protect(key),
            Ok(None) if !config.require_key => Self::PassThrough,
            Ok(None) => Self::Reject(Rejection::missing_key(config.key_source.describe())),
            Err(err) => Self::Reject(Rejection::invalid_key(err)),
        }
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body + From<Bytes> + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        // A request passed through is handed to the service that was driven to readiness at
        // once: no clone.
        if config.skip_safe_methods && is_safe(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        let route = scope::RouteName::of(&parts);
        // Made only when something could see it: a subscriber taking `DEBUG`, or a `log` logger
        // at `DEBUG` (through `tracing`'s `log` feature, with no subscriber): a span that goes
        // nowhere still costs its making and recording (BENCHMARKS.md).
        let span = if trace::debug_on() || log::max_level() >= log::LevelFilter::Debug {
            tracing::debug_span!(
                "idempotency",
                method = %parts.method,
                route = route.as_str(),
                outcome = tracing::field::Empty,
            )
        } else {
            Span::none()
        };
        // Header keys are checked before the body is read; body keys once it is.
        let key = match config.key_source.extract_from_head(&parts) {
            None => None,
            Some(found) => match KeyDecision::of(config, found) {
                KeyDecision::Protect(key) => Some(key),
                KeyDecision::PassThrough => {
                    let req = Request::from_parts(parts, body);
                    return ResponseFuture::passthrough(self.inner.call(req));
                }
                KeyDecision::Reject(rejection) => return self.ready(&span, rejection),
            },
        };
        if content_length(&parts.headers).is_some_and(|len| len > config.max_request_body as u64) {
            return self.ready(&span, Rejection::too_large(config.max_request_body));
        }
        // The protected path calls the service later, after the claim: take the one that was
        // driven to readiness, leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        // A disabled span (no subscriber, or `DEBUG` filtered out, as in most production
        // setups) is not entered and left on every poll.
        ResponseFuture::protected(if span.is_disabled() {
            boxed(|| flow::run(inner, shared, route, key, parts, body))
        } else {
            boxed(|| flow::run(inner, shared, route, key, parts, body).instrument(span))
        })
    }
}

impl<S, St> Idempotency<S, St> {
    /// A rejection decided before any I/O, outside the request's span (which is not entered
    /// yet).
    fn ready<F, B: From<Bytes>, E>(
        &self,
        span: &Span,
        rejection: Rejection,
    ) -> ResponseFuture<F, B, E> {
        let response = span.in_scope(|| trace::rejected(&self.shared.config, &rejection));
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
