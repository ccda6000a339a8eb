//! Both clients (the Tower layer on hyper-util's client, and the `reqwest` middleware) against
//! this crate's own server layer, through a faulty TCP proxy: every logical request runs once on
//! the server and the client gets the original answer.
mod answers;
mod faults;
mod proxy;
mod server;
mod trace;
mod waits;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyKey;
use tower_idempotency::client::{ClientOutcome, IdempotentClientLayer};

/// The clients under test.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sender {
    Hyper,
    #[cfg(feature = "reqwest")]
    Reqwest,
}

pub(crate) const SENDERS: &[Sender] = &[
    Sender::Hyper,
    #[cfg(feature = "reqwest")]
    Sender::Reqwest,
];

/// A final answer, with what the client layer reported about it.
#[derive(Debug)]
pub(crate) struct Answer {
    status: u16,
    body: Bytes,
    outcome: ClientOutcome,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What a client returned instead of an answer.
#[derive(Debug)]
pub(crate) enum Failure {
    Hyper(Box<dyn std::error::Error + Send + Sync>),
    #[cfg(feature = "reqwest")]
    Reqwest(reqwest_middleware::Error),
}

impl Failure {
    /// Whether the error is the HTTP client's own transport error (the connection failed or
    /// was lost), passed through unchanged.
    fn is_transport(&self) -> bool {
        match self {
            Self::Hyper(err) => err
                .downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some(),
            #[cfg(feature = "reqwest")]
            Self::Reqwest(reqwest_middleware::Error::Reqwest(err)) => {
                err.is_request() || err.is_connect()
            }
            #[cfg(feature = "reqwest")]
            Self::Reqwest(_) => false,
        }
    }
}

/// Short waits, so that the tests take milliseconds.
pub(crate) fn quick() -> IdempotentClientLayer {
    IdempotentClientLayer::new()
        .initial_backoff(Duration::from_millis(5))
        .max_backoff(Duration::from_millis(20))
        .max_retry_after(Duration::from_millis(50))
        .max_elapsed(Duration::from_secs(10))
}

/// Sends one logical request with `sender`, the client layer configured by `layer`; each
/// attempt on a new connection (no idle connections kept), so that the proxy's script of
/// faults is a script of attempts.
pub(crate) async fn send(
    sender: Sender,
    layer: IdempotentClientLayer,
    method: Method,
    url: &str,
    body: &str,
    key: Option<IdempotencyKey>,
) -> Result<Answer, Failure> {
    match sender {
        Sender::Hyper => {
            let client = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http::<Full<Bytes>>();
            let client = ServiceBuilder::new().layer(layer).service(client);
            let mut req = http::Request::builder()
                .method(method)
                .uri(url)
                .header("content-type", "application/json")
                .body(Full::from(body.to_owned()))
                .unwrap();
            if let Some(key) = key {
                req.extensions_mut().insert(key);
            }
            let res = client.oneshot(req).await.map_err(Failure::Hyper)?;
            let outcome = res.extensions().get::<ClientOutcome>().cloned();
            let status = res.status().as_u16();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Ok(Answer {
                status,
                body,
                outcome: outcome.expect("every response carries a ClientOutcome"),
            })
        }
        #[cfg(feature = "reqwest")]
        Sender::Reqwest => {
            use tower_idempotency::client::IdempotencyMiddleware;
            let inner = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let client = reqwest_middleware::ClientBuilder::new(inner)
                .with(IdempotencyMiddleware::from(layer))
                .build();
            let mut req = client
                .request(method, url)
                .header("content-type", "application/json")
                .body(body.to_owned());
            if let Some(key) = key {
                req = req.with_extension(key);
            }
            let res = req.send().await.map_err(Failure::Reqwest)?;
            let outcome = res.extensions().get::<ClientOutcome>().cloned();
            let status = res.status().as_u16();
            let body = res.bytes().await.unwrap();
            Ok(Answer {
                status,
                body,
                outcome: outcome.expect("every response carries a ClientOutcome"),
            })
        }
    }
}

pub(crate) async fn post(
    sender: Sender,
    layer: IdempotentClientLayer,
    url: &str,
    body: &str,
) -> Result<Answer, Failure> {
    send(sender, layer, Method::POST, url, body, None).await
}

/// Waits (bounded) until `done` holds.
pub(crate) async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
