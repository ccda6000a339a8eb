//! The service: the request path from key to replay.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, Method, Request, Response, header, request};
use http_body::Body;
use tower_service::Service;
use tracing::{Instrument, Span};

use crate::body::{ReadError, read_to_bytes};
use crate::detached::DetachedWork;
use crate::fingerprint::{Fingerprint, digest_fields};
use crate::key::{IdempotencyKey, KeyError};
use crate::layer::Config;
use crate::metrics::{self, Stopwatch};
use crate::record::{CompletedRecord, storable_headers, unix_ms};
use crate::rejection::{Rejection, RejectionKind};
use crate::store::{Claim, IdempotencyStore, Lock, StoreError};

/// The header added to every replayed response.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

const REPLAYED_NAME: HeaderName = HeaderName::from_static(IDEMPOTENT_REPLAYED);

/// How long to tell clients to wait when the store is unavailable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
struct Shared<St> {
    store: St,
    config: Arc<Config>,
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

/// What the request's tracing span records as `outcome`.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Acquired,
    Replayed,
    InFlight,
    Mismatch,
    Rejected,
    StoreError,
    FailOpen,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::FailOpen => "fail_open",
        }
    }
}

fn record_outcome(outcome: Outcome) {
    if debug_on() {
        Span::current().record("outcome", outcome.as_str());
    }
    metrics::outcome(outcome.as_str());
}

/// Whether anything may take `DEBUG`, the level of the request's span. When nothing does (no
/// subscriber, or a filter below it, as in most production setups) there is no span of the
/// layer's to record on or to carry into the owner's part, and no `Span::current()` lookup is
/// made.
fn debug_on() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    tracing::Level::DEBUG <= STATIC_MAX_LEVEL && tracing::Level::DEBUG <= LevelFilter::current()
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
        let route = RouteName::of(&parts);
        // Made only when something could see it: a subscriber taking `DEBUG`, or a `log` logger
        // at `DEBUG` (through `tracing`'s `log` feature, with no subscriber). Otherwise making,
        // recording and dropping a span that goes nowhere costs as much as a hash table lookup.
        let span = if debug_on() || log::max_level() >= log::LevelFilter::Debug {
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
            Some(Ok(Some(key))) => Some(key),
            Some(Ok(None)) if !config.require_key => {
                let req = Request::from_parts(parts, body);
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Some(Ok(None)) => return self.ready(&span, missing_key(config)),
            Some(Err(err)) => return self.ready(&span, invalid_key(err)),
        };
        if content_length(&parts.headers).is_some_and(|len| len > config.max_request_body as u64) {
            return self.ready(&span, too_large(config.max_request_body));
        }
        // The protected path calls the service later, after the claim: take the one that was
        // driven to readiness, leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let ctx = Ctx {
            shared: self.shared.clone(),
            scoped: ScopedKey::default(),
            route,
        };
        // A disabled span (no subscriber, or `DEBUG` filtered out, as in most production
        // setups) is not entered and left on every poll.
        ResponseFuture::protected(if span.is_disabled() {
            boxed(|| run(inner, ctx, key, parts, body))
        } else {
            boxed(|| run(inner, ctx, key, parts, body).instrument(span))
        })
    }
}

fn missing_key(config: &Config) -> Rejection {
    let detail = format!(
        "send a unique idempotency key in {}",
        config.key_source.describe()
    );
    Rejection::new(RejectionKind::MissingKey, detail)
}

fn key_reused() -> Rejection {
    let detail = "this idempotency key was already used for a different request \
                  (method, path or body differ); use a new key for a new request";
    Rejection::new(RejectionKind::KeyReused, detail)
}

fn invalid_key(err: KeyError) -> Rejection {
    Rejection::new(RejectionKind::InvalidKey(err), err.to_string())
}

impl<S, St> Idempotency<S, St> {
    fn ready<F, B: From<Bytes>, E>(
        &self,
        span: &Span,
        rejection: Rejection,
    ) -> ResponseFuture<F, B, E> {
        span.record("outcome", Outcome::Rejected.as_str());
        metrics::outcome(Outcome::Rejected.as_str());
        span.in_scope(|| tracing::debug!(status = %rejection.status(), %rejection, "rejected"));
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(render(&self.shared.config, &rejection)),
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

fn too_large(limit: usize) -> Rejection {
    Rejection::new(
        RejectionKind::PayloadTooLarge,
        format!("the request body is larger than {limit} bytes"),
    )
}

/// Renders a rejection with the configured renderer.
fn render<B: From<Bytes>>(config: &Config, rejection: &Rejection) -> Response<B> {
    let response = match &config.rejection {
        Some(f) => f(rejection),
        None => rejection.to_response(),
    };
    response.map(B::from)
}

/// The key the store sees: 32 hex characters of BLAKE3 over the route, the namespace, the caller
/// scope (after a marker saying whether there is one) and the idempotency key, laid out as
/// `digest_fields` describes. Fixed-size, so a store key never grows with the input, and free of
/// the raw key.
fn scoped_key(
    parts: &request::Parts,
    route: &RouteName,
    config: &Config,
    key: &IdempotencyKey,
) -> ScopedKey {
    let route = route.as_str().as_bytes();
    let namespace = config.namespace.as_deref().unwrap_or("").as_bytes();
    let caller = config.scope.as_ref().and_then(|f| f(parts));
    let digest = match &caller {
        Some(caller) => digest_fields(&[
            route,
            namespace,
            b"\x01",
            caller.as_bytes(),
            key.as_str().as_bytes(),
        ]),
        None => digest_fields(&[route, namespace, b"\x00", key.as_str().as_bytes()]),
    };
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(&digest.as_bytes()[..16]) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    ScopedKey(hex)
}

/// The key the store sees: 128 bits of the scope's digest in 32 lowercase hex digits, kept
/// inline (no allocation per request).
#[derive(Clone, Copy, Default)]
struct ScopedKey([u8; 32]);

impl ScopedKey {
    fn as_str(&self) -> &str {
        // Only ever hex digits (or, before the key is known, zeros): valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What the protected path needs besides the inner service, shared by the handler task and the
/// lease renewal.
struct Ctx<St> {
    shared: Arc<Shared<St>>,
    /// The scoped key the store sees.
    scoped: ScopedKey,
    /// The route, for the warnings and errors the layer logs.
    route: RouteName,
}

/// The route of a protected request, named in the layer's warnings and errors: the span that
/// also carries it is at `DEBUG` level, which production filters usually leave off. Cloning it
/// costs a reference count.
#[derive(Clone)]
enum RouteName {
    #[cfg(feature = "axum")]
    Matched(axum::extract::MatchedPath),
    Path(http::Uri),
}

impl RouteName {
    /// The route part of the scope: the matched route where the router provides it, else the
    /// path.
    fn of(parts: &request::Parts) -> Self {
        #[cfg(feature = "axum")]
        if let Some(matched) = parts.extensions.get::<axum::extract::MatchedPath>() {
            return Self::Matched(matched.clone());
        }
        Self::Path(parts.uri.clone())
    }

    fn as_str(&self) -> &str {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(matched) => matched.as_str(),
            Self::Path(uri) => uri.path(),
        }
    }

    /// Whether `status` is a router's answer rather than the handler's result, which must not
    /// consume the key: `405` (axum's method router answers it for a method the route lacks,
    /// inside `Router::route_layer`), and with axum, `404` for a request no route matched (the
    /// router's fallback, inside `Router::layer`).
    fn answered_by_router(&self, status: http::StatusCode) -> bool {
        match self {
            _ if status == http::StatusCode::METHOD_NOT_ALLOWED => true,
            #[cfg(feature = "axum")]
            Self::Path(_) => status == http::StatusCode::NOT_FOUND,
            _ => false,
        }
    }
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

    /// Claims the key for `lock`. A claim whose outcome is unknown (the store failed or timed
    /// out, or this future was dropped while the claim was on the wire) may still have been
    /// applied: it is released in the background, so the key is not left claimed by an attempt
    /// that gave up.
    async fn claim(&self, lock: &Lock, watch: &mut Stopwatch) -> Result<Claim, StoreError> {
        let mut unknown = ReleaseOnDrop {
            ctx: self,
            lock,
            armed: true,
        };
        let lease = self.shared.config.lock_ttl;
        let claim = self
            .timed(
                "claim",
                watch,
                self.shared.store.claim(self.scoped.as_str(), lock, lease),
            )
            .await;
        unknown.armed = matches!(claim, Err(StoreError::Backend(_) | StoreError::Timeout));
        claim
    }

    /// Releases `lock`'s claim in a task of its own (tracked in the layer's
    /// [`DetachedWork`](crate::DetachedWork)), trying again until the store answers or the lease
    /// would have lapsed anyway.
    fn release_in_background(&self, lock: Lock) {
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
                    ctx.shared.store.release(ctx.scoped.as_str(), &lock)
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
    async fn with_retries<T, F, Fut>(
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
                Err(StoreError::Backend(_) | StoreError::Timeout)
                    if tokio::time::Instant::now() + delay < deadline =>
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
    async fn wait_in_flight(
        &self,
        lock: &Lock,
        first: Result<Claim, StoreError>,
        watch: &mut Stopwatch,
    ) -> Result<Claim, StoreError> {
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
            claim = self.claim(lock, watch).await;
            if !matches!(claim, Ok(Claim::InFlight { fingerprint, .. }) if fingerprint == *lock.fingerprint())
            {
                return claim;
            }
        }
    }

    fn reject<B: From<Bytes>>(&self, rejection: Rejection) -> Response<B> {
        record_outcome(Outcome::Rejected);
        tracing::debug!(status = %rejection.status(), %rejection, "rejected");
        render(&self.shared.config, &rejection)
    }

    /// Renews the lease every third of its length. Never returns; stops renewing (and waits
    /// forever) once the lease is lost.
    async fn renew_forever(&self, lock: &Lock) {
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
                    self.shared.store.renew(self.scoped.as_str(), lock, lease),
                )
                .await
            {
                Ok(true) => {
                    metrics::count(metrics::RENEWALS);
                    tracing::trace!("lease renewed");
                }
                Ok(false) => {
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
    ///
    /// When the response's headers are stored as they are (the usual case), the record borrows
    /// them from `parts` and gives them back once the store has them: no copy.
    async fn complete(
        &self,
        lock: &Lock,
        parts: &mut http::response::Parts,
        body: &Bytes,
        watch: &mut Stopwatch,
    ) {
        let ttl = self.shared.config.record_ttl;
        // Built in a block of its own: a local moved into the record would otherwise keep its
        // room in this future across the store's `await`.
        let (mut record, lent) = {
            let status_only = self.shared.config.status_only;
            let omitted = status_only || body.len() > self.shared.config.max_response_body;
            let (mut headers, lent) = if status_only {
                (http::HeaderMap::new(), false)
            } else {
                match storable_headers(&parts.headers, &self.shared.config.excluded_headers) {
                    Some(filtered) => (filtered, false),
                    // Its `Content-Length` is removed below; the client's response keeps it.
                    None if omitted => (parts.headers.clone(), false),
                    None => (std::mem::take(&mut parts.headers), true),
                }
            };
            if omitted && !status_only {
                headers.remove(header::CONTENT_LENGTH);
                tracing::warn!(
                    route = %self.route,
                    size = body.len(),
                    limit = self.shared.config.max_response_body,
                    "response larger than the limit: stored without its body"
                );
            }
            let record = CompletedRecord::new(
                *lock.fingerprint(),
                parts.status,
                headers,
                if omitted { Bytes::new() } else { body.clone() },
                omitted,
            );
            let expiry = unix_ms().saturating_add(ttl.as_millis() as u64);
            (record.with_expiry(expiry), lent)
        };
        let store = &self.shared.store;
        let mut stored = self
            .timed(
                "complete",
                watch,
                store.complete(self.scoped.as_str(), lock, &record, ttl),
            )
            .await;
        if matches!(stored, Err(StoreError::Backend(_) | StoreError::Timeout)) {
            // Boxed: rare, and its future would make every first delivery's future larger.
            stored = Box::pin(self.complete_again(lock, &record, stored)).await;
        }
        #[cfg(feature = "cache")]
        let cache = self
            .shared
            .config
            .cache
            .as_ref()
            .filter(|_| matches!(stored, Ok(true)));
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
            Ok(true) =>
            {
                #[cfg(feature = "cache")]
                if let Some(cache) = cache {
                    cache.insert(self.scoped.as_str(), record);
                }
            }
            Ok(false) => {
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
    }

    /// Tries again to store a response whose first try failed: while the store fails, for at
    /// most half the lease, renewing the lease before each try so that it cannot lapse
    /// meanwhile. Ends when the record is stored, the lease is proven lost, or the bound is
    /// reached.
    async fn complete_again(
        &self,
        lock: &Lock,
        record: &CompletedRecord,
        first: Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        if let Err(err) = &first {
            tracing::warn!(route = %self.route, error = %err, "could not store the response; trying again");
        }
        let lease = self.shared.config.lock_ttl;
        let ttl = self.shared.config.record_ttl;
        let store = &self.shared.store;
        let key = self.scoped.as_str();
        let mut tries = 0;
        self.with_retries("complete", lease / 2, || {
            tries += 1;
            metrics::count(metrics::COMPLETE_RETRIES);
            async move {
                // The lease first: a renewal that finds the key no longer running is not final
                // (a complete whose reply was lost may have applied), the complete decides.
                let mut watch = Stopwatch::start();
                let _ = self
                    .timed("renew", &mut watch, store.renew(key, lock, lease))
                    .await;
                store.complete(key, lock, record, ttl).await
            }
        })
        .await
        .inspect(|stored| {
            if *stored {
                tracing::info!(route = %self.route, tries, "response stored after trying again");
            }
        })
    }

    /// Releases the claim; `watch` was lapped when the handler finished. If the store fails,
    /// the release goes on in the background.
    async fn release(&self, lock: &Lock, watch: &mut Stopwatch) {
        let released = self
            .timed(
                "release",
                watch,
                self.shared.store.release(self.scoped.as_str(), lock),
            )
            .await;
        if let Err(err) = released {
            tracing::warn!(
                route = %self.route,
                error = %err,
                "could not release the key; trying again in the background"
            );
            self.release_in_background(lock.clone());
        }
    }
}

/// Releases a claim in the background when dropped armed: see [`Ctx::claim`].
struct ReleaseOnDrop<'a, St: IdempotencyStore> {
    ctx: &'a Ctx<St>,
    lock: &'a Lock,
    armed: bool,
}

impl<St: IdempotencyStore> Drop for ReleaseOnDrop<'_, St> {
    fn drop(&mut self) {
        if self.armed {
            self.ctx.release_in_background(self.lock.clone());
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

/// The protected path: buffer and fingerprint the body, claim, then run, replay or refuse.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` keeps its arguments twice in its future"
)]
fn run<S, St, ReqBody, ResBody>(
    mut inner: S,
    mut ctx: Ctx<St>,
    key: Option<IdempotencyKey>,
    mut parts: request::Parts,
    body: ReqBody,
) -> impl Future<Output = Result<Response<ResBody>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
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
    // An async block rather than an `async fn`: the arguments are moved into the future once,
    // instead of being kept both as arguments and as the locals they are moved into.
    async move {
        let started = debug_clock();
        let limit = ctx.shared.config.max_request_body;
        let body = match read_to_bytes(body, limit).await {
            Ok(body) => body,
            Err(ReadError::TooLarge) => return Ok(ctx.reject(too_large(limit))),
            Err(ReadError::Failed(err)) => {
                let detail = format!("the request body could not be read: {err}");
                return Ok(ctx.reject(Rejection::new(RejectionKind::BodyUnreadable, detail)));
            }
        };
        let key = match key.map_or_else(
            || ctx.shared.config.key_source.extract(&parts, &body),
            |k| Ok(Some(k)),
        ) {
            Ok(Some(key)) => key,
            Ok(None) if !ctx.shared.config.require_key => {
                // Boxed, as in fail-open below: rare paths, whose handler future would
                // otherwise make every request's future larger.
                let req = Request::from_parts(parts, ReqBody::from(body));
                return Box::pin(inner.call(req)).await;
            }
            Ok(None) => return Ok(ctx.reject(missing_key(&ctx.shared.config))),
            Err(err) => return Ok(ctx.reject(invalid_key(err))),
        };
        ctx.scoped = scoped_key(&parts, &ctx.route, &ctx.shared.config, &key);
        let fingerprint = Fingerprint::of(&parts.method, &parts.uri, &body);
        let lock = Lock::new(fingerprint);

        #[cfg(feature = "cache")]
        if let Some(cache) = &ctx.shared.config.cache {
            match cache.get(ctx.scoped.as_str()) {
                Some(record) => {
                    metrics::count(metrics::CACHE_HITS);
                    if record.fingerprint == fingerprint {
                        record_outcome(Outcome::Replayed);
                        return Ok(replay(CompletedRecord::clone(&record)));
                    }
                    record_outcome(Outcome::Mismatch);
                    return Ok(render(&ctx.shared.config, &key_reused()));
                }
                None => metrics::count(metrics::CACHE_MISSES),
            }
        }

        // One clock for the claim, the handler and storing the response: each phase ends where the
        // next begins.
        let mut watch = Stopwatch::start();
        let mut claim = ctx.claim(&lock, &mut watch).await;
        if let Some(started) = started {
            tracing::debug!(claim_ms = millis_since(started), "claimed");
        }
        if matches!(&claim, Ok(Claim::InFlight { fingerprint: holder, .. }) if *holder == fingerprint)
            && !ctx.shared.config.wait_in_flight.is_zero()
        {
            // Boxed: waiting is rare, and its future would make every request's future larger.
            claim = Box::pin(ctx.wait_in_flight(&lock, claim, &mut watch)).await;
        }
        match claim {
            Ok(Claim::Acquired) => {
                record_outcome(Outcome::Acquired);
                parts.extensions.insert(key);
                let req = Request::from_parts(parts, ReqBody::from(body));
                // The owner's work runs in this task; if the client goes away it carries on in a
                // task of its own, so the handler is never cancelled halfway and the claim is always
                // completed or released.
                let span = if debug_on() {
                    Span::current()
                } else {
                    Span::none()
                };
                let detached = ctx.shared.config.detached.clone();
                if span.is_disabled() {
                    DetachOnDrop::new(detached, || own(inner, ctx, req, lock, watch)).await
                } else {
                    let owner = || own(inner, ctx, req, lock, watch).instrument(span);
                    DetachOnDrop::new(detached, owner).await
                }
            }
            Ok(Claim::Completed(record)) if record.fingerprint == fingerprint => {
                record_outcome(Outcome::Replayed);
                #[cfg(feature = "cache")]
                if let Some(cache) = &ctx.shared.config.cache {
                    cache.insert(ctx.scoped.as_str(), record.clone());
                }
                Ok(replay(record))
            }
            Ok(Claim::InFlight {
                fingerprint: holder,
                retry_after,
            }) if holder == fingerprint => {
                record_outcome(Outcome::InFlight);
                let detail = "a request with this idempotency key is still being processed; \
                              retry after the time given in Retry-After";
                let rejection =
                    Rejection::new(RejectionKind::InFlight, detail).with_retry_after(retry_after);
                Ok(render(&ctx.shared.config, &rejection))
            }
            Ok(Claim::Completed(_) | Claim::InFlight { .. }) => {
                record_outcome(Outcome::Mismatch);
                Ok(render(&ctx.shared.config, &key_reused()))
            }
            Err(StoreError::Corrupt(err)) => {
                tracing::error!(route = %ctx.route, error = %err, "unreadable idempotency record; handler not run");
                let detail = "the stored response for this idempotency key is unreadable; \
                              the request was not processed";
                let rejection = Rejection::new(RejectionKind::CorruptRecord, detail);
                record_outcome(Outcome::StoreError);
                Ok(render(&ctx.shared.config, &rejection))
            }
            Err(err) if ctx.shared.config.fail_open => {
                record_outcome(Outcome::FailOpen);
                tracing::warn!(route = %ctx.route, error = %err, "idempotency store unavailable; running the handler unprotected (fail-open)");
                parts.extensions.insert(key);
                let req = Request::from_parts(parts, ReqBody::from(body));
                Box::pin(inner.call(req)).await
            }
            Err(err) => {
                record_outcome(Outcome::StoreError);
                tracing::error!(route = %ctx.route, error = %err, "idempotency store unavailable; request refused");
                let detail = "the idempotency store is unavailable, so the request could not be \
                              processed safely; it was not processed";
                let rejection = Rejection::new(RejectionKind::StoreUnavailable, detail)
                    .with_retry_after(STORE_RETRY_AFTER);
                Ok(render(&ctx.shared.config, &rejection))
            }
        }
    }
}

/// Runs the handler that owns the claim, renewing the lease meanwhile, then completes or
/// releases the claim.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` keeps its arguments twice in its future"
)]
fn own<S, St, ReqBody, ResBody>(
    mut inner: S,
    ctx: Ctx<St>,
    req: Request<ReqBody>,
    lock: Lock,
    mut watch: Stopwatch,
) -> impl Future<Output = Result<Response<ResBody>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqBody: Send + 'static,
    ResBody: Body + From<Bytes> + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    // The handler's part boxed on its own. Built inside the async block below, it would keep the
    // request and the service as captures for the block's whole life, beside the handler's
    // future they are moved into; boxed here, the block captures a pointer, and its size stays
    // within what glibc's allocator serves from its per-thread cache (1,032 bytes) with
    // `MemoryStore`, instead of taking its slower path for every first delivery.
    let handler = boxed(|| {
        AssertUnwindSafe(async move {
            let response = inner.call(req).await?;
            let (parts, body) = response.into_parts();
            let body = read_to_bytes(body, usize::MAX).await;
            Ok::<_, S::Error>((parts, body))
        })
        .catch_unwind()
    });
    // An async block rather than an `async fn`: the arguments are moved into the future once,
    // instead of being kept both as arguments and as the locals they are moved into.
    async move {
        let debug_started = debug_clock();
        let outcome = {
            // Moved into this block, so its box is freed once the handler is done, before the
            // response is stored.
            let mut handler = handler;
            // The renewal starts once the handler has not answered at once, boxed: a handler
            // that answers at once arms no timer, and the renewal's state takes no room here.
            let mut renewal = None;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(outcome) = handler.as_mut().poll(cx) {
                    return Poll::Ready(outcome);
                }
                let renewal = renewal.get_or_insert_with(|| Box::pin(ctx.renew_forever(&lock)));
                // It never ends; polling it keeps its timer armed.
                let _ = renewal.as_mut().poll(cx);
                Poll::Pending
            })
            .await
        };
        metrics::handler(watch.lap());
        if let Some(started) = debug_started {
            tracing::debug!(handler_ms = millis_since(started), "handler finished");
        }
        let failed = "the request handler failed; the request may be retried";
        match outcome {
            Err(_panic) => {
                tracing::error!(route = %ctx.route, "handler panicked; claim released");
                ctx.release(&lock, &mut watch).await;
                Ok(ctx.reject(Rejection::new(RejectionKind::HandlerFailed, failed)))
            }
            Ok(Err(err)) => {
                ctx.release(&lock, &mut watch).await;
                Err(err)
            }
            Ok(Ok((parts, Err(err)))) => {
                let err = match err {
                    ReadError::Failed(err) => err,
                    ReadError::TooLarge => "the response body is larger than memory allows".into(),
                };
                tracing::error!(route = %ctx.route, status = %parts.status, error = %err, "response body failed; claim released");
                ctx.release(&lock, &mut watch).await;
                Ok(ctx.reject(Rejection::new(RejectionKind::HandlerFailed, failed)))
            }
            Ok(Ok((mut parts, Ok(body)))) => {
                if ctx.route.answered_by_router(parts.status) {
                    ctx.release(&lock, &mut watch).await;
                } else if (ctx.shared.config.store_response)(&parts) {
                    ctx.complete(&lock, &mut parts, &body, &mut watch).await;
                } else {
                    ctx.release(&lock, &mut watch).await;
                }
                Ok(Response::from_parts(parts, ResBody::from(body)))
            }
        }
    }
}

/// Allocates room for a future, then builds it there: built first and boxed after, as
/// `Box::pin(make())` does, the whole state machine (a kilobyte or more) is built on the stack
/// and copied into the box.
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Drives a future in the caller's task; if dropped before the future finished, spawns the rest
/// on the current runtime as the layer's [`DetachedWork`] instead of cancelling it (without a
/// runtime, nothing could drive it: it is dropped, and a claim it held lapses with its lease).
///
/// Compared with spawning up front, a request whose client stays (nearly all of them) costs no
/// task allocation and no hop to another worker thread.
struct DetachOnDrop<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    detached: DetachedWork,
}

impl<T: Send + 'static> DetachOnDrop<T> {
    fn new<F: Future<Output = T> + Send + 'static>(
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

/// The time now if debug events are on (they carry durations), else nothing: no clock read.
fn debug_clock() -> Option<Instant> {
    tracing::enabled!(tracing::Level::DEBUG).then(Instant::now)
}

fn millis_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

fn replay<B: From<Bytes>>(record: CompletedRecord) -> Response<B> {
    let mut response = Response::new(B::from(record.body));
    *response.status_mut() = record.status;
    *response.headers_mut() = record.headers;
    response
        .headers_mut()
        .insert(REPLAYED_NAME, HeaderValue::from_static("true"));
    response
}
