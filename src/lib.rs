//! Idempotency keys for Axum and Tower: run a non-idempotent handler (a payment, a webhook
//! receiver) **once per key**, and replay its response to every retry.
//!
//! Webhooks and API calls are delivered at least once. A sender whose request timed out sends it
//! again with the same key; without protection an `ORDER_PAID` webhook decrements stock twice.
//! [`IdempotencyLayer`] sits in front of a route and makes the retry harmless:
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! async fn order_paid(body: String) -> &'static str {
//!     // Decrement stock, charge a card: runs once per Idempotency-Key.
//!     "ok"
//! }
//!
//! let app: Router = Router::new()
//!     .route("/webhooks/order-paid", post(order_paid))
//!     .route_layer(IdempotencyLayer::new(MemoryStore::new()));
//! ```
//!
//! In production, share the entries between instances with Redis:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_idempotency::{IdempotencyLayer, RedisStore};
//!
//! let store = RedisStore::new(redis::Client::open("redis://127.0.0.1:6379/")?).await?;
//! let layer = IdempotencyLayer::new(store).record_ttl(Duration::from_secs(72 * 3600));
//! # let _ = layer; Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! | request | answer |
//! |---|---|
//! | safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) | passed through untouched |
//! | no key | `400` (or passed through with [`require_key(false)`](IdempotencyLayer::require_key)) |
//! | malformed key, header repeated, two key headers disagree | `400` |
//! | key shorter than [`min_key_len`](IdempotencyLayer::min_key_len) (off by default) | `400`, store not touched |
//! | body over [`max_request_body`](IdempotencyLayer::max_request_body) | `413` |
//! | first request with a key | handler runs once; response stored if status < 500 |
//! | same key, same request, completed | stored status, headers and body, plus `Idempotent-Replayed: true` |
//! | same key, same request, still running | `409` with `Retry-After` (remaining lease) |
//! | same key, different method, path, query or body ([configurable](IdempotencyLayer::fingerprint_with)) | `422` |
//! | response carrying a [`StorePolicy`] | first caller gets it whole; a replay gets what the policy kept |
//! | store unreachable or slower than [`store_timeout`](IdempotencyLayer::store_timeout), or a new key and a full [`MemoryStore`] | `503` with `Retry-After` (or run unprotected with [`fail_open`](IdempotencyLayer::fail_open)) |
//! | stored record unreadable | `500`, handler not run |
//! | handler panics | `500`, key released so a retry runs again |
//! | handler answers 5xx | answer passed on, key released so a retry runs again |
//! | router answers `405`, or with axum `404` for no matched route | answer passed on, key released |
//!
//! Every answer the layer makes itself is `application/problem+json` (RFC 9457); see
//! [`Rejection`] and [`IdempotencyLayer::rejection_with`]. For an API whose clients are
//! Stripe's SDKs (or modelled on them), [`Rejection::to_stripe_response`] answers as Stripe
//! does: a reused key is a `400` `idempotency_error`, which those SDKs raise as their
//! `IdempotencyError`.
//!
//! The key is read from `Idempotency-Key`, else `X-Idempotency-Key`
//! ([configurable](IdempotencyLayer::key_headers)), bare (`abc`) or as an RFC 8941 string
//! (`"abc"`): 1 to 255 characters of visible ASCII. Keys are scoped by route (axum 0.8's
//! matched route with [`Router::route_layer`](https://docs.rs/axum/0.8/axum/struct.Router.html#method.route_layer),
//! else the path; see [Supported versions](#supported-versions)) and optionally by caller ([`scope_with`](IdempotencyLayer::scope_with)).
//!
//! # Security
//!
//! An idempotency key is a bearer secret for its replays: whoever presents it, within its scope,
//! gets the stored response. Scope keys by caller with
//! [`scope_with`](IdempotencyLayer::scope_with), refuse short keys with
//! [`min_key_len`](IdempotencyLayer::min_key_len) (a low-entropy key lets others read your
//! responses, as `draft-ietf-httpapi-idempotency-key-header` warns), and let a handler whose
//! answer holds a one-time secret keep less of it with [`StorePolicy`].
//!
//! # Webhooks
//!
//! Presets read a webhook sender's own delivery id and suit its retry behaviour:
//! [`IdempotencyLayer::standard_webhooks`] (also Svix), [`IdempotencyLayer::stripe_webhooks`],
//! [`IdempotencyLayer::github_webhooks`], [`IdempotencyLayer::shopify_webhooks`] and
//! [`IdempotencyLayer::generic_webhooks`]. They wait for an in-flight duplicate
//! ([`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight)) and replay the original, since
//! a sender treats a `409` as a failure to retry. Verify the sender's signature in a layer that
//! wraps this one, so unsigned requests never claim a delivery id.
//!
//! ```
//! # #[cfg(feature = "json")] {
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! let app: Router = Router::new()
//!     .route("/webhooks/stripe", post(|| async { "ok" }))
//!     .route_layer(IdempotencyLayer::stripe_webhooks(MemoryStore::new()));
//! # }
//! ```
//!
//! # Sending
//!
//! The other end of the wire is in [`client`] (feature `client`): a sender must send one key per
//! logical operation and the same key on every retry of it. [`client::IdempotentClientLayer`]
//! does so for any Tower HTTP client (hyper-util's `Client`), and with the `reqwest` feature
//! [`client::IdempotencyMiddleware`] for `reqwest-middleware`.
//!
//! # How it works
//!
//! The first request claims its key in the store in one atomic step, recording a random owner
//! token and the request fingerprint, with a short lease ([`lease_ttl`](IdempotencyLayer::lease_ttl),
//! 30 s). While the handler runs, the owner renews the lease every third of it, so a slow handler
//! is never run twice and an instance that crashed frees the key once its lease lapses. A client
//! that disconnects does not cancel a handler halfway: once the request holds its claim, what is
//! left (the handler, storing the response) runs on in a task of its own.
//! When it answers, the response is stored under the key for
//! [`record_ttl`](IdempotencyLayer::record_ttl) (24 h) — only if the claim is still the owner's
//! (fencing), so an attempt that lost its lease never overwrites another's record.
//!
//! A first delivery costs two store round trips (claim, complete), a replay or a conflict one.
//!
//! # What it guarantees, and what it cannot
//!
//! - While a key is claimed or its record lives, no other request with that key runs the
//!   handler, across every instance sharing the store; every stored response is replayed byte
//!   for byte.
//! - The layer cannot make a side effect and the stored response one atomic step. If the process
//!   dies after the side effect and before the response is stored, the lease lapses and a retry
//!   runs the handler again. For side effects in your own database, write the
//!   [`IdempotencyKey`] (the handler can extract it) in the same transaction and check it there;
//!   for calls to another API, forward the key so that API deduplicates too.
//! - A response the store cannot take is tried again for up to half the lease
//!   ([`lease_ttl`](IdempotencyLayer::lease_ttl)), the lease renewed meanwhile; a store unable to
//!   take it for longer leaves the claim to lapse, and a retry after that runs again.
//! - Redis replication is asynchronous: a failover that loses an unreplicated write can lose a
//!   claim or a record, and a retry then runs again. So do a restart without persistence and
//!   eviction (`allkeys-*`, `volatile-*` policies): keep persistence on and use `noeviction`.
//! - Handlers whose client left run on; on shutdown, wait for them with
//!   [`IdempotencyLayer::detached_work`].
//! - [`fail_open`](IdempotencyLayer::fail_open) trades all of this for availability while the
//!   store is down.
//!
//! # Operating
//!
//! [`IdempotencyLayer::inspect`] reports what the store holds for a key (absent, running,
//! completed) without claiming it, and [`IdempotencyLayer::forget`] deletes a completed key so
//! that its next request runs the handler again; a [`KeyQuery`] names the key by route,
//! caller and key, as the layer scopes it. With the `encryption` feature,
//! `IdempotencyLayer::encrypt_with` keeps stored headers and bodies encrypted, bound to their key.
//!
//! # Feature flags
//!
//! The defaults are `axum`, `redis` and `json`. An application that keeps its records in a
//! [`MemoryStore`] only leaves Redis out of its build with
//! `tower-idempotency = { version = "0.2", default-features = false, features = ["axum"] }`.
//!
//! - `redis` (default): [`RedisStore`].
//! - `axum` (default): the [`IdempotencyKey`] extractor and scoping by axum's matched route
//!   (axum 0.8).
//! - `cluster`: `RedisStore::cluster`, for Redis Cluster.
//! - `cache`: [`LocalCache`], an in-process cache of completed records for hot replays.
//! - `metrics`: counters and histograms through the `metrics` facade; names in [`metrics`].
//! - `json` (default): [`KeySource::json_field`] and [`IdempotencyLayer::stripe_webhooks`], keys
//!   read from a JSON body (Stripe events).
//! - `postgres`: [`PgStore`], the store on Postgres (through `sqlx`; bring your own TLS
//!   feature of `sqlx` if your database needs it).
//! - `encryption`: [`KeyRing`] and [`IdempotencyLayer::encrypt_with`], stored headers and
//!   bodies encrypted (XChaCha20-Poly1305) and bound to their key.
//! - `conformance`: [`conformance`] and [`store_conformance_tests!`], the kit that checks a store
//!   against the [`IdempotencyStore`] contract.
//! - `client`: the sender's side, [`client::IdempotentClientLayer`], for any Tower HTTP client:
//!   a key per operation, retries with the same key and body.
//! - `reqwest`: the same for `reqwest` (0.13, through `reqwest-middleware` 0.5),
//!   [`client::IdempotencyMiddleware`]; no TLS backend is chosen for you.
//!
//! # Supported versions
//!
//! **axum 0.8** (feature `axum`), `http` 1, Tower 0.4 and 0.5 (`tower-layer` and
//! `tower-service` 0.3), tokio 1, redis-rs 1 (feature `redis`), reqwest 0.13 and
//! reqwest-middleware 0.5 (feature `reqwest`), Rust 1.88.
//!
//! An application on another axum version (0.7, say) still compiles with this crate, which
//! then builds axum 0.8 as a second copy the application's router never meets: keys are scoped
//! by the raw request path instead of the matched route (the layer logs a warning saying so,
//! once per process), and a handler taking [`IdempotencyKey`] fails to compile with an opaque
//! `Handler<_, _>` error. `cargo tree -i axum` shows whether two versions are built. There,
//! build this crate without its `axum` feature and take the key as `Extension<IdempotencyKey>`.
//!
//! # Tracing
//!
//! Each protected request gets an `idempotency` span with `method`, `route` and `outcome`
//! (`acquired`, `replayed`, `in_flight`, `mismatch`, `rejected`, `store_error`, `fail_open`), and
//! debug events with the store and handler timings. Keys and bodies are never logged.
//!
//! The span is at `DEBUG` level, as tower-http's `TraceLayer` spans are: with a subscriber
//! that records `INFO` and above, a span per request would cost more than the rest of the
//! layer's work (BENCHMARKS.md has the numbers). Turn it on with `RUST_LOG=tower_idempotency=debug` (or an equivalent filter); the
//! warnings and errors the layer logs (store unavailable, lease lost) are at their own levels
//! whatever the filter does to the span. Outcome counts are also available as metrics.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
#[cfg(feature = "cache")]
mod cache;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod clock;
mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
mod detached;
mod encryption;
#[cfg(feature = "axum")]
mod extract;
mod fingerprint;
mod key;
mod layer;
pub mod metrics;
mod operator;
mod presets;
mod record;
mod rejection;
mod service;
mod source;
pub mod store;
mod store_policy;
mod varint;

/// The error type of bodies and store backends.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(feature = "cache")]
pub use cache::LocalCache;
pub use detached::DetachedWork;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub use encryption::{InvalidKey, KeyRing};
#[cfg(feature = "axum")]
pub use extract::MissingKeyExtension;
pub use fingerprint::{Fingerprint, FingerprintSpec};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::IdempotencyLayer;
pub use operator::{KeyQuery, KeyState};
pub use record::{CompletedRecord, DecodeError};
pub use rejection::{Rejection, RejectionKind};
pub use service::{IDEMPOTENT_REPLAYED, Idempotency, ResponseFuture};
pub use source::KeySource;
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::{PgStore, PgToken, PgTx};
#[cfg(feature = "redis")]
pub use store::redis::{Fencing, RedisStore, RedisToken};
pub use store::{Attempt, Claim, Fenced, IdempotencyStore, Lookup, StoreError};
pub use store_policy::StorePolicy;
