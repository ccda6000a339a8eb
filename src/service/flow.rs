//! The protected path, top to bottom: read and fingerprint the body, claim the key, then run
//! the handler (renewing the lease) and store or release its answer, replay a stored answer, or
//! refuse.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, request, response};
use http_body::Body;
use tower_service::Service;
use tracing::{Instrument, Span};

use super::detach::{DetachOnDrop, boxed};
use super::response::replay;
use super::scope::{RouteName, scoped_key};
use super::store_calls::Ctx;
use super::trace::{Outcome, debug_clock, debug_on, record_outcome, rejected, since};
use super::{KeyDecision, Shared};
use crate::BoxError;
use crate::body::{ReadError, read_to_bytes};
use crate::key::IdempotencyKey;
use crate::metrics::{self, Stopwatch};
#[cfg(feature = "cache")]
use crate::record::CompletedRecord;
use crate::rejection::Rejection;
use crate::store::{Attempt, Claim, IdempotencyStore, StoreError};
use crate::store_policy::StorePolicy;

/// The protected path: buffer and fingerprint the body, claim, then run, replay or refuse.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` keeps its arguments twice in its future"
)]
pub(super) fn run<S, St, ReqBody, ResBody>(
    mut inner: S,
    shared: Arc<Shared<St>>,
    route: RouteName,
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
        let config = &shared.config;
        let body = match read_to_bytes(body, config.max_request_body).await {
            Ok(body) => body,
            Err(ReadError::TooLarge) => {
                let rejection = Rejection::too_large(config.max_request_body);
                return Ok(rejected(config, &rejection));
            }
            Err(ReadError::Failed(err)) => {
                return Ok(rejected(config, &Rejection::body_unreadable(err)));
            }
        };
        let found = match key {
            Some(key) => Ok(Some(key)),
            None => config.key_source.extract(&parts, &body),
        };
        let key = match KeyDecision::of(config, found) {
            KeyDecision::Protect(key) => key,
            KeyDecision::PassThrough => {
                // Boxed, as in fail-open below: rare paths, whose handler future would
                // otherwise make every request's future larger.
                let req = Request::from_parts(parts, ReqBody::from(body));
                return Box::pin(inner.call(req)).await;
            }
            KeyDecision::Reject(rejection) => return Ok(rejected(config, &rejection)),
        };
        let scoped = scoped_key(&parts, &route, config, &key);
        let ctx = Ctx {
            scoped,
            route,
            shared: shared.clone(),
        };
        let fingerprint = config.fingerprint.fingerprint(&parts, &body);
        let attempt = Attempt::new(fingerprint);

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
                    return Ok(ctx.shared.config.render(&Rejection::key_reused()));
                }
                None => metrics::count(metrics::CACHE_MISSES),
            }
        }

        // One clock for the claim, the handler and storing the response: each phase ends where the
        // next begins.
        let mut watch = Stopwatch::start();
        let mut claim = ctx.claim(&attempt, &mut watch).await;
        if let Some(took) = since(started) {
            tracing::debug!(claim = ?took, "claimed");
        }
        if matches!(&claim, Ok(Claim::InFlight { fingerprint: holder, .. }) if *holder == fingerprint)
            && !ctx.shared.config.wait_in_flight.is_zero()
        {
            // Boxed: waiting is rare, and its future would make every request's future larger.
            claim = Box::pin(ctx.wait_in_flight(&attempt, claim, &mut watch)).await;
        }
        match claim {
            Ok(Claim::Acquired(mut token)) => {
                let prepared = if ctx.shared.store.commits_handler_writes(&token) {
                    // Boxed: only transactional stores take this step.
                    let prepare =
                        ctx.prepare(&attempt, &mut token, &mut parts.extensions, &mut watch);
                    Box::pin(prepare).await
                } else {
                    Ok(())
                };
                if let Err(err) = prepared {
                    record_outcome(Outcome::StoreError);
                    tracing::error!(route = %ctx.route, error = %err, "could not prepare the handler's unit of work; request refused");
                    return Ok(ctx.shared.config.render(&Rejection::store_unavailable()));
                }
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
                    DetachOnDrop::new(detached, || own(inner, ctx, req, attempt, token, watch))
                        .await
                } else {
                    let owner = || own(inner, ctx, req, attempt, token, watch).instrument(span);
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
                Ok(ctx.shared.config.render(&Rejection::in_flight(retry_after)))
            }
            Ok(Claim::Completed(_) | Claim::InFlight { .. }) => {
                record_outcome(Outcome::Mismatch);
                Ok(ctx.shared.config.render(&Rejection::key_reused()))
            }
            Err(StoreError::Corrupt(err)) => {
                tracing::error!(route = %ctx.route, error = %err, "unreadable idempotency record; handler not run");
                record_outcome(Outcome::StoreError);
                Ok(ctx.shared.config.render(&Rejection::corrupt_record()))
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
                Ok(ctx.shared.config.render(&Rejection::store_unavailable()))
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
pub(super) fn own<S, St, ReqBody, ResBody>(
    mut inner: S,
    ctx: Ctx<St>,
    req: Request<ReqBody>,
    attempt: Attempt,
    mut token: St::Token,
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
    // future they are moved into; boxed here, the block captures a pointer and stays small
    // (BENCHMARKS.md, "What changed": it pays).
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
        let started = debug_clock();
        let outcome = {
            // Moved into this block, so its box is freed once the handler is done, before the
            // response is stored.
            let mut handler = handler;
            // The renewal starts once the handler has not answered at once, boxed: a handler
            // that answers at once arms no timer, and the renewal's state takes no room here.
            // The token is lent to it (taken from `lent` once) until the handler is done.
            let mut renewal = None;
            let mut lent = Some(&mut token);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(outcome) = handler.as_mut().poll(cx) {
                    return Poll::Ready(outcome);
                }
                let renewal = renewal.get_or_insert_with(|| {
                    let token = lent.take().expect("lent once, with the renewal's start");
                    Box::pin(ctx.renew_forever(token))
                });
                // It never ends; polling it keeps its timer armed.
                let _ = renewal.as_mut().poll(cx);
                Poll::Pending
            })
            .await
        };
        metrics::handler(watch.lap());
        if let Some(took) = since(started) {
            tracing::debug!(handler = ?took, "handler finished");
        }
        // `outcome` is moved whole into `taken_apart`: a local only partly moved out of would keep
        // its room in this future beside the response while it is stored (BENCHMARKS.md,
        // "Instructions per request").
        let (mut parts, body) = match taken_apart(&ctx, outcome) {
            Ok(answer) => answer,
            Err(failed) => {
                ctx.release(&attempt, &mut watch).await;
                return match failed {
                    Some(err) => Err(err),
                    None => Ok(rejected(&ctx.shared.config, &Rejection::handler_failed())),
                };
            }
        };
        if ctx.route.answered_by_router(parts.status) {
            ctx.release(&attempt, &mut watch).await;
        } else {
            ctx.route.warn_if_scoped_by_path();
            if StorePolicy::stores(&parts) && (ctx.shared.config.store_response)(&parts) {
                let completed = ctx
                    .complete(&attempt, &mut token, &mut parts, &body, &mut watch)
                    .await;
                if let Err(rejection) = completed {
                    return Ok(rejected(&ctx.shared.config, &rejection));
                }
            } else {
                ctx.release(&attempt, &mut watch).await;
            }
        }
        parts.extensions.remove::<StorePolicy>();
        Ok(Response::from_parts(parts, ResBody::from(body)))
    }
}

/// What the handler's part of [`own`] ends with: the response head and its body read, the
/// service's error, or a panic.
type Handled<E> = std::thread::Result<Result<(response::Parts, Result<Bytes, ReadError>), E>>;

/// The handler's outcome taken apart: the response head and body to store, or why there is none
/// (logged here): the service's own error, to pass on, or `None` when the handler panicked or
/// its body failed, to answer `500`. Either way the claim is to be released.
fn taken_apart<St, E>(
    ctx: &Ctx<St>,
    outcome: Handled<E>,
) -> Result<(response::Parts, Bytes), Option<E>> {
    match outcome {
        Ok(Ok((parts, Ok(body)))) => Ok((parts, body)),
        Ok(Err(err)) => Err(Some(err)),
        Err(_panic) => {
            tracing::error!(route = %ctx.route, "handler panicked; claim released");
            Err(None)
        }
        Ok(Ok((parts, Err(err)))) => {
            let err: BoxError = match err {
                ReadError::Failed(err) => err,
                ReadError::TooLarge => "the response body is larger than memory allows".into(),
            };
            tracing::error!(route = %ctx.route, status = %parts.status, error = %err, "response body failed; claim released");
            Err(None)
        }
    }
}
