//! The sender's side (feature `client`): send every non-safe request with an idempotency key,
//! and retry it with **the same key and the same body** until an answer is final.
//!
//! A receiver behind [`IdempotencyLayer`](crate::IdempotencyLayer) runs a request once per key.
//! That protects only a sender that keeps its half of the contract: one key per logical
//! operation, the same key on every retry of it. A fresh key per retry turns every retry into
//! a new operation. This module keeps that half for any Tower HTTP client, and (feature
//! `reqwest`) for `reqwest` through `reqwest-middleware`.
//!
//! With hyper-util's client:
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_idempotency::client::{ClientOutcome, IdempotentClientLayer};
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut client = ServiceBuilder::new().layer(IdempotentClientLayer::new()).service(client);
//!
//! let req = http::Request::post("http://127.0.0.1:3000/webhooks/order-paid")
//!     .body(Full::from(r#"{"order_id":"o-1","items":[{"sku":"SKU123","qty":1}]}"#))?;
//! let res = client.ready().await?.call(req).await?;
//! let outcome = res.extensions().get::<ClientOutcome>().expect("set on every response");
//! println!("{} attempt(s), replayed: {}", outcome.attempts(), outcome.replayed());
//! # Ok(()) }
//! ```
//!
//! With `reqwest` (feature `reqwest`):
//!
//! ```
//! # #[cfg(feature = "reqwest")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower_idempotency::client::IdempotencyMiddleware;
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotencyMiddleware::new())
//!     .build();
//! let res = client.post("http://127.0.0.1:3000/webhooks/order-paid").body("{}").send().await?;
//! # let _ = res; Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! | request or answer | what the client does |
//! |---|---|
//! | a non-safe method (`POST`, `PUT`, `PATCH`, `DELETE`, …) without a key | a fresh key ([`IdempotencyKey::new_v4`], [configurable](IdempotentClientLayer::key_with)) in `Idempotency-Key` ([configurable](IdempotentClientLayer::key_header), [RFC 8941 quoting](IdempotentClientLayer::quote_key) optional) |
//! | a key header set by the caller | kept as it is |
//! | an [`IdempotencyKey`] in the request's extensions | sent as the key |
//! | a safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) | sent without a key, retried all the same ([configurable](IdempotentClientLayer::retry_safe_methods)) |
//! | connection error, reset, timeout, response lost | retried: the request may or may not have reached the server, and the key makes a resend harmless |
//! | `409` (a request with the key is still running), `429`, `503` | retried, after `Retry-After` when given (seconds or HTTP date, capped by [`max_retry_after`](IdempotentClientLayer::max_retry_after)) |
//! | other `5xx` | retried ([configurable](IdempotentClientLayer::retry_server_errors)), except `501` and `505` |
//! | a replay (`Idempotent-Replayed: true`), whatever its status | final |
//! | `400`, `401`, `403`, `404`, `422` and every other `4xx` | final, at once |
//! | a body of unknown length (a stream) or over [`max_replay_body`](IdempotentClientLayer::max_replay_body) | sent once, never retried |
//!
//! Waits between attempts grow exponentially with full jitter (a random wait between zero and
//! 100 ms, 200 ms, 400 ms, … up to 10 s), and stop at 5 attempts or when the next wait would end
//! more than 60 s after the first attempt, whichever comes first; then the last answer or error
//! is the request's. Every bound is a setter of [`IdempotentClientLayer`].
//!
//! The final response carries a [`ClientOutcome`] in its extensions: the key, the number of
//! attempts, and whether the answer was a replay.
//!
//! # Keys that outlive the process
//!
//! A generated key lives as long as the request: if the process dies between two attempts, the
//! operation's key is gone with it. To retry an operation after a restart, choose its key
//! yourself, keep it with the operation (an order id, a row in the outbox that sends it), and
//! give it to the request:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower_idempotency::IdempotencyKey;
//!
//! let key = IdempotencyKey::new("order-1234:paid").expect("visible ASCII, 1 to 255 characters");
//! let req = http::Request::post("http://127.0.0.1:3000/webhooks/order-paid")
//!     .extension(key) // with reqwest-middleware: `.with_extension(key)`
//!     .body(Full::<Bytes>::from("{}"))
//!     .unwrap();
//! ```
//!
//! # Bodies
//!
//! A request body is kept to be sent again when its length is known in advance and at most
//! [`max_replay_body`](IdempotentClientLayer::max_replay_body) (1 MiB): with the Tower layer, a
//! body whose `size_hint` is exact (`Full<Bytes>`, `String`, `axum::body::Body::from(bytes)`);
//! with `reqwest`, a body made from bytes or a string. The Tower layer takes any body type that
//! converts `From<Bytes>`, to make each attempt's copy.
//!
//! # Tracing
//!
//! Each logical request gets an `idempotent_request` span (at `DEBUG`) with `method`, `uri`
//! (without its query), `key`, and once done `attempts`, `status` and `replayed`; each attempt,
//! each retry and its wait, and the reason for stopping are `DEBUG` events inside it.

mod attempts;
mod backoff;
mod body;
mod key;
mod layer;
mod outcome;
mod policy;
#[cfg(feature = "reqwest")]
mod reqwest;
mod service;

pub use layer::IdempotentClientLayer;
pub use outcome::{AttemptTimedOut, ClientOutcome};
#[cfg(feature = "reqwest")]
pub use reqwest::IdempotencyMiddleware;
pub use service::{IdempotentClient, ResponseFuture};

#[cfg(doc)]
use crate::IdempotencyKey;
