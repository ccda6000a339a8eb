//! The client layer: its settings, each a setter with its default.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;

use super::service::IdempotentClient;
use crate::key::IdempotencyKey;

/// A function that makes a fresh key.
type KeyGenerator = dyn Fn() -> IdempotencyKey + Send + Sync;

/// The settings of [`IdempotentClientLayer`], shared by every request.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) key_header: HeaderName,
    pub(crate) quote_key: bool,
    pub(crate) key_generator: Arc<KeyGenerator>,
    pub(crate) max_attempts: u32,
    pub(crate) max_elapsed: Duration,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) max_retry_after: Duration,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) max_replay_body: usize,
    pub(crate) retry_server_errors: bool,
    pub(crate) retry_safe_methods: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            key_header: HeaderName::from_static("idempotency-key"),
            quote_key: false,
            key_generator: Arc::new(IdempotencyKey::new_v4),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(10),
            attempt_timeout: None,
            max_replay_body: 1024 * 1024,
            retry_server_errors: true,
            retry_safe_methods: true,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("key_header", &self.key_header)
            .field("quote_key", &self.quote_key)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("max_replay_body", &self.max_replay_body)
            .field("retry_server_errors", &self.retry_server_errors)
            .field("retry_safe_methods", &self.retry_safe_methods)
            .finish_non_exhaustive()
    }
}

/// A [`Layer`] for HTTP clients that sends every non-safe request with an idempotency key and
/// retries it with the same key and body. See the [module documentation](super).
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::client::IdempotentClientLayer;
///
/// let layer = IdempotentClientLayer::new()
///     .max_attempts(3)
///     .max_elapsed(Duration::from_secs(20))
///     .attempt_timeout(Duration::from_secs(5));
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub struct IdempotentClientLayer {
    settings: Arc<Settings>,
}

impl IdempotentClientLayer {
    /// A layer with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    fn settings_mut(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    #[cfg(any(feature = "reqwest", test))]
    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.clone()
    }

    /// Sets the header the key is sent in. A request that already carries this header keeps it.
    ///
    /// Defaults to `Idempotency-Key`.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.settings_mut().key_header = name;
        self
    }

    /// Whether keys are sent as RFC 8941 strings (`Idempotency-Key: "8e03…"`), as the IETF
    /// draft writes them, or bare (`Idempotency-Key: 8e03…`), as Stripe and most servers take
    /// them. This crate's server layer reads both. A key holding a `"` is always quoted.
    ///
    /// Defaults to `false` (bare).
    pub fn quote_key(mut self, quote: bool) -> Self {
        self.settings_mut().quote_key = quote;
        self
    }

    /// Sets the function that makes a fresh key for a request that has none.
    ///
    /// Defaults to [`IdempotencyKey::new_v4`], a random UUID.
    pub fn key_with<F>(mut self, generate: F) -> Self
    where
        F: Fn() -> IdempotencyKey + Send + Sync + 'static,
    {
        self.settings_mut().key_generator = Arc::new(generate);
        self
    }

    /// Sets how many times one request is sent at most, the first time included. `1` turns
    /// retries off (keys are still sent).
    ///
    /// Values below 1 count as 1. Defaults to 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings_mut().max_attempts = attempts.max(1);
        self
    }

    /// Sets the time budget of one request, from its first attempt: no retry is started after
    /// a wait that would end later than this. An attempt under way is not cut short by it (see
    /// [`attempt_timeout`](Self::attempt_timeout)).
    ///
    /// Defaults to 60 seconds.
    pub fn max_elapsed(mut self, budget: Duration) -> Self {
        self.settings_mut().max_elapsed = budget;
        self
    }

    /// Sets the back-off before the first retry; it doubles with each retry up to
    /// [`max_backoff`](Self::max_backoff). Each wait is drawn at random between zero and that
    /// bound (full jitter), so that clients that failed together come back apart.
    ///
    /// Defaults to 100 milliseconds.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.settings_mut().initial_backoff = backoff;
        self
    }

    /// Sets the largest back-off bound.
    ///
    /// Defaults to 10 seconds.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.settings_mut().max_backoff = backoff;
        self
    }

    /// Sets the longest wait taken from a server's `Retry-After` (in seconds or as an HTTP
    /// date); a longer one is cut to this. A server answering `409` for a request still running
    /// gives the time its lease has left, an upper bound: waiting less finds the answer sooner.
    /// A wait that would end after [`max_elapsed`](Self::max_elapsed) is not taken: the answer
    /// that asked for it is returned.
    ///
    /// Defaults to 10 seconds.
    pub fn max_retry_after(mut self, wait: Duration) -> Self {
        self.settings_mut().max_retry_after = wait;
        self
    }

    /// Sets how long one attempt may wait for the response head; then it fails with
    /// [`AttemptTimedOut`](super::AttemptTimedOut), which is retried like a connection error
    /// (the request may have reached the server). Reading the response body is not covered.
    ///
    /// Defaults to none: the inner client's own timeouts apply (`reqwest`'s
    /// `ClientBuilder::timeout`; hyper's client has none).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().attempt_timeout = Some(timeout);
        self
    }

    /// Sets the largest request body, in bytes, kept to be sent again. A larger body, or one
    /// whose length is not known in advance (a stream), is sent once and not retried: a
    /// failure is returned to the caller, who can send it again itself, under a key of its own
    /// choosing so that both sends carry the same one.
    ///
    /// Defaults to 1 MiB.
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.settings_mut().max_replay_body = bytes;
        self
    }

    /// Whether `5xx` answers other than `503` are retried (`501` and `505` never are). `503`,
    /// `429`, and `409` for a request still in flight are retried either way.
    ///
    /// Defaults to `true`.
    pub fn retry_server_errors(mut self, retry: bool) -> Self {
        self.settings_mut().retry_server_errors = retry;
        self
    }

    /// Whether requests with a safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`), sent without a
    /// key, are retried too.
    ///
    /// Defaults to `true`.
    pub fn retry_safe_methods(mut self, retry: bool) -> Self {
        self.settings_mut().retry_safe_methods = retry;
        self
    }
}

impl<S> Layer<S> for IdempotentClientLayer {
    type Service = IdempotentClient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentClient::new(inner, self.settings.clone())
    }
}
