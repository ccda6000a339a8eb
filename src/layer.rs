//! The layer: its settings, each a setter with its default.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Response, request, response};
use tokio::sync::Semaphore;
use tower_layer::Layer;

use crate::config::{Config, MAX_TTL};
use crate::detached::DetachedWork;
use crate::fingerprint::FingerprintSpec;
use crate::rejection::Rejection;
use crate::service::Idempotency;
use crate::source::KeySource;

/// A [`Layer`] that makes the services it wraps idempotent, with entries kept in `St`.
///
/// See the [crate documentation](crate) for the behaviour. Every setter documents its default.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new())
///     .record_ttl(Duration::from_secs(7 * 24 * 60 * 60))
///     .lease_ttl(Duration::from_secs(10))
///     .scope_with(|parts| {
///         parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_owned)
///     });
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct IdempotencyLayer<St> {
    store: St,
    pub(crate) config: Arc<Config>,
}

impl<St> IdempotencyLayer<St> {
    /// A layer with the default settings, keeping its entries in `store`.
    pub fn new(store: St) -> Self {
        Self {
            store,
            config: Arc::new(Config::default()),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The work this layer (and every clone of it) leaves running on its own: handlers whose
    /// client went away, and claims released in the background. Wait for it on shutdown; see
    /// [`DetachedWork`].
    pub fn detached_work(&self) -> DetachedWork {
        self.config.detached.clone()
    }

    /// Sets the headers the key is read from, in order. A request carrying several of them with
    /// different keys is rejected (`400`).
    ///
    /// Defaults to `Idempotency-Key`, then `X-Idempotency-Key`.
    pub fn key_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().key_source = KeySource::headers(names);
        self
    }

    /// Sets where the key is read from: headers, a JSON body field, or a function of the
    /// request. See [`KeySource`].
    ///
    /// Defaults to `Idempotency-Key`, then `X-Idempotency-Key`.
    pub fn key_source(mut self, source: KeySource) -> Self {
        self.config().key_source = source;
        self
    }

    /// Refuses keys (from any [`KeySource`]) shorter than `len` characters with `400`
    /// ([`KeyError::TooShort`](crate::KeyError::TooShort)) before the store is touched. A key
    /// is a bearer secret for its replays: a guessable one lets others read your responses
    /// (see [Security](crate#security)). A UUID has 36 characters.
    ///
    /// Defaults to 0: any key of 1 to 255 characters.
    pub fn min_key_len(mut self, len: usize) -> Self {
        self.config().min_key_len = len;
        self
    }

    /// Adds a fixed name to the scope of every key, so that layers with different namespaces
    /// never share keys even on the same route and store (two webhook providers, say).
    ///
    /// Defaults to none; the webhook presets set the provider's name.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config().namespace = Some(namespace.into().into());
        self
    }

    /// Whether a request without a key is rejected (`400`, `true`) or passed to the service
    /// untouched, without any protection (`false`).
    ///
    /// Defaults to `true`.
    pub fn require_key(mut self, required: bool) -> Self {
        self.config().require_key = required;
        self
    }

    /// Whether requests with a safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) pass through
    /// untouched. Set to `false` to protect every method.
    ///
    /// Defaults to `true`.
    pub fn skip_safe_methods(mut self, skip: bool) -> Self {
        self.config().skip_safe_methods = skip;
        self
    }

    /// Sets the lease of a running request: how long a key stays claimed if its owner stops
    /// renewing it (the instance crashed). The owner renews every third of it while the handler
    /// runs, so a slow handler keeps its lease however long it takes. Storing a response that
    /// the store fails to take is tried again for up to half of it, so keep it above the
    /// longest store outage you want a response to survive.
    ///
    /// Values are clamped to between 3 ms and 100 years.
    ///
    /// Defaults to 30 seconds.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config().lease_ttl = ttl.clamp(Duration::from_millis(3), MAX_TTL);
        self
    }

    /// The former name of [`lease_ttl`](Self::lease_ttl).
    #[deprecated(since = "0.2.0", note = "renamed to lease_ttl")]
    pub fn lock_ttl(self, ttl: Duration) -> Self {
        self.lease_ttl(ttl)
    }

    /// Sets how long a completed response is kept and replayed. After it, the key is new again.
    /// Choose at least the longest time a client (or webhook sender) may retry.
    ///
    /// Values are clamped to at most 100 years.
    ///
    /// Defaults to 24 hours.
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.config().record_ttl = ttl.min(MAX_TTL);
        self
    }

    /// Sets the largest request body, in bytes, the layer buffers (it must read the whole body
    /// to fingerprint it). A larger body is rejected with `413` before the store is touched.
    ///
    /// Defaults to 1 MiB.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config().max_request_body = bytes;
        self
    }

    /// Sets what of a request the fingerprint covers (a retry that differs in it gets `422`);
    /// see [`FingerprintSpec`]. Changing it makes retries of requests already stored under the
    /// old spec answer `422` until their records expire.
    ///
    /// Defaults to [`FingerprintSpec::request`]: method, path and query, and the whole body
    /// (the webhook presets keep it).
    pub fn fingerprint_with(mut self, spec: FingerprintSpec) -> Self {
        self.config().fingerprint = spec;
        self
    }

    /// Sets the largest response body, in bytes, that is stored for replay.
    ///
    /// A larger response is still sent in full to the first caller, and the key is still marked
    /// completed (the handler never runs twice), but only the status and headers are stored: a
    /// replay has the original status and headers and an empty body. The layer buffers the whole
    /// response in memory either way, so do not put it in front of streaming responses.
    ///
    /// Defaults to 1 MiB.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config().max_response_body = bytes;
        self
    }

    /// Stores only the status of completed requests, not their headers or body: a replay answers
    /// with the original status and an empty body. For webhook receivers that only need
    /// "already processed"; records shrink to a few dozen bytes.
    ///
    /// Defaults to `false`.
    pub fn status_only(mut self, enabled: bool) -> Self {
        self.config().status_only = enabled;
        self
    }

    /// Keeps completed records in an in-process cache as well, so replays of hot keys need no
    /// store round trip (feature `cache`). See [`LocalCache`](crate::LocalCache) for the bounds
    /// and the consistency trade-off.
    ///
    /// Defaults to no cache.
    #[cfg(feature = "cache")]
    pub fn local_cache(mut self, cache: crate::LocalCache) -> Self {
        self.config().cache = Some(cache);
        self
    }

    /// Encrypts the headers and body of every stored response with `ring`'s current key, bound
    /// to the record's scoped key, and decrypts them on replay (feature `encryption`). The
    /// status, the request fingerprint and the expiry stay in the clear. A record that does not
    /// decrypt (moved under another key, altered, sealed with a key no longer in the ring) is
    /// answered `500` and never replayed. See [`KeyRing`](crate::KeyRing) for keys, rotation
    /// and migrating from plaintext records. A [`local_cache`](Self::local_cache) keeps
    /// records decrypted, in process.
    ///
    /// Defaults to no encryption.
    #[cfg(feature = "encryption")]
    #[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
    pub fn encrypt_with(mut self, ring: crate::KeyRing) -> Self {
        self.config().encryption = Some(Arc::new(ring));
        self
    }

    /// Sets the time limit of every store operation. A claim that does not finish in time is
    /// treated as the store being unavailable (`503`, or fail-open); since the store may still
    /// apply it, it is released in the background once the store answers. Storing a response
    /// that times out is tried again (see [`lease_ttl`](Self::lease_ttl)).
    ///
    /// Defaults to 2 seconds.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config().store_timeout = timeout;
        self
    }

    /// Whether to run the handler **without protection** when the store is unavailable (`true`),
    /// logging a warning, instead of answering `503` (`false`). Fail-open trades the
    /// exactly-once guarantee for availability; leave it off for payments.
    ///
    /// Defaults to `false`.
    pub fn fail_open(mut self, enabled: bool) -> Self {
        self.config().fail_open = enabled;
        self
    }

    /// Sets the response headers that are not stored (nor replayed), in addition to the
    /// hop-by-hop headers, which never are.
    ///
    /// Defaults to `Set-Cookie`, so a session cookie issued to the first caller is not handed to
    /// whoever replays the key.
    pub fn exclude_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().excluded_headers = names.into_iter().collect();
        self
    }

    /// Sets which responses are stored and replayed. A response that is not stored releases the
    /// key, so a retry runs the handler again.
    ///
    /// Defaults to statuses below 500: a server error is worth retrying, a client error is not.
    pub fn store_response_with<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().store_response = Arc::new(predicate);
        self
    }

    /// Adds the caller to the scope of every key: `f` returns an identity (a tenant, an account,
    /// an API key id) from the request, so two callers using the same key never see each
    /// other's responses. Requests for which `f` returns `None` share one caller-less scope.
    ///
    /// Keys are always scoped by route as well: the matched route (with the `axum` feature, an
    /// application on axum 0.8 and
    /// [`Router::route_layer`](https://docs.rs/axum/0.8/axum/struct.Router.html#method.route_layer)),
    /// otherwise the request path (with the `axum` feature, the layer warns about it once).
    ///
    /// Defaults to no caller scope.
    pub fn scope_with<F>(mut self, f: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config().scope = Some(Arc::new(f));
        self
    }

    /// Makes a duplicate that arrives while the original is still running wait up to `max` for
    /// the original to finish, and then replay its response, instead of answering `409` at once.
    /// If the original releases the key (it failed), the waiting duplicate runs the handler
    /// itself. After `max`, the answer is `409` with `Retry-After` as usual.
    ///
    /// Waiting polls the store with exponential back-off (20 ms doubling to 500 ms): a few round
    /// trips per waiting request. Keep `max` below your clients' (or webhook senders') timeout.
    ///
    /// Defaults to zero: no waiting.
    pub fn wait_for_in_flight(mut self, max: Duration) -> Self {
        self.config().wait_in_flight = max;
        self
    }

    /// Sets how many requests may wait for in-flight duplicates at once; a duplicate beyond this
    /// answers `409` at once. Bounds the memory and store load of a duplicate storm. The limit is
    /// shared by the layer, its clones and every service they make (all routes a layer is
    /// applied to); calling this again gives the layer a limit of its own.
    ///
    /// Defaults to 1024.
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.config().waiters = Arc::new(Semaphore::new(max));
        self
    }

    /// Replaces the default problem+json rendering of rejections: `f` turns each
    /// [`Rejection`] into an [`http::Response`] whose body is anything that converts into
    /// [`Bytes`] (`Bytes`, `String`, `Vec<u8>`, `&'static str`).
    ///
    /// [`Rejection::to_stripe_response`] is a ready-made renderer for APIs whose clients are
    /// Stripe's SDKs or modelled on them: `.rejection_with(Rejection::to_stripe_response)`.
    ///
    /// With axum, `http` is `axum::http`: name the type `http::Response` (or
    /// `axum::http::Response`) rather than importing it, so that it does not clash with
    /// `axum::response::Response`, which `f` cannot return (its body may stream; a rejection's
    /// is whole). Keep [`Retry-After`](Rejection::retry_after_header) on the `409` and `503`.
    ///
    /// ```
    /// use http::header;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, Rejection, RejectionKind};
    ///
    /// fn render(rejection: &Rejection) -> http::Response<String> {
    ///     let code = match rejection.kind() {
    ///         RejectionKind::MissingKey | RejectionKind::InvalidKey(_) => "bad_idempotency_key",
    ///         RejectionKind::InFlight => "request_in_progress",
    ///         RejectionKind::KeyReused => "idempotency_key_reused",
    ///         _ => "idempotency_failure",
    ///     };
    ///     let body = serde_json::json!({ "code": code, "message": rejection.detail() });
    ///     let mut response = http::Response::builder()
    ///         .status(rejection.status())
    ///         .header(header::CONTENT_TYPE, "application/json");
    ///     if let Some(seconds) = rejection.retry_after_header() {
    ///         response = response.header(header::RETRY_AFTER, seconds);
    ///     }
    ///     response.body(body.to_string()).expect("a valid status and headers")
    /// }
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).rejection_with(render);
    /// // Or a closure; this one answers in plain text, with an `http::Response<bytes::Bytes>`.
    /// let plain = IdempotencyLayer::new(MemoryStore::new()).rejection_with(|rejection| {
    ///     http::Response::builder()
    ///         .status(rejection.status())
    ///         .body(bytes::Bytes::from(rejection.to_string()))
    ///         .expect("a valid status")
    /// });
    /// ```
    ///
    /// Defaults to [`Rejection::to_response`] (problem+json).
    pub fn rejection_with<F, B>(mut self, f: F) -> Self
    where
        F: Fn(&Rejection) -> Response<B> + Send + Sync + 'static,
        B: Into<Bytes>,
    {
        self.config().rejection = Some(Arc::new(move |rejection| f(rejection).map(Into::into)));
        self
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.store.clone(), self.config.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// What `layer` answers a duplicate in flight with.
    fn rendered(layer: &IdempotencyLayer<MemoryStore>) -> Response<Bytes> {
        layer
            .config
            .render::<Bytes>(&Rejection::in_flight(Duration::from_secs(3)))
    }

    fn builder(rejection: &Rejection) -> http::response::Builder {
        http::Response::builder().status(rejection.status())
    }

    #[test]
    #[allow(deprecated)]
    fn lock_ttl_is_the_old_name_of_lease_ttl() {
        let lease = Duration::from_millis(1234);
        let layer = IdempotencyLayer::new(MemoryStore::new()).lock_ttl(lease);
        assert_eq!(layer.config.lease_ttl, lease);
    }

    #[test]
    fn a_renderer_may_return_any_body_that_converts_into_bytes() {
        let layer = IdempotencyLayer::new(MemoryStore::new());
        let cases = [
            layer
                .clone()
                .rejection_with(|r| builder(r).body(String::from("string")).unwrap()),
            layer
                .clone()
                .rejection_with(|r| builder(r).body(b"vec".to_vec()).unwrap()),
            layer
                .clone()
                .rejection_with(|r| builder(r).body("static").unwrap()),
            layer
                .clone()
                .rejection_with(|r| builder(r).body(Bytes::from_static(b"bytes")).unwrap()),
        ];
        let bodies: Vec<Bytes> = cases.iter().map(|l| rendered(l).into_body()).collect();
        assert_eq!(bodies, ["string", "vec", "static", "bytes"]);
        assert_eq!(rendered(&cases[0]).status(), http::StatusCode::CONFLICT);

        // The renderers the crate provides fit as they are; without one, problem+json.
        let explicit = rendered(&layer.clone().rejection_with(Rejection::to_response));
        let default = rendered(&layer);
        assert_eq!(
            explicit.headers()[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(explicit.body(), default.body());
    }
}
