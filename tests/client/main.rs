//! Both clients (the Tower layer on hyper-util's client, and the `reqwest` middleware) against
//! this crate's own server layer, through a faulty TCP proxy: every logical request runs once on
//! the server and the client gets the original answer.

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

use proxy::{Fault, FaultyProxy};
use server::Server;

/// The clients under test.
#[derive(Clone, Copy, Debug)]
enum Sender {
    Hyper,
    #[cfg(feature = "reqwest")]
    Reqwest,
}

const SENDERS: &[Sender] = &[
    Sender::Hyper,
    #[cfg(feature = "reqwest")]
    Sender::Reqwest,
];

/// A final answer, with what the client layer reported about it.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Bytes,
    outcome: ClientOutcome,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What a client returned instead of an answer.
#[derive(Debug)]
enum Failure {
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
fn quick() -> IdempotentClientLayer {
    IdempotentClientLayer::new()
        .initial_backoff(Duration::from_millis(5))
        .max_backoff(Duration::from_millis(20))
        .max_retry_after(Duration::from_millis(50))
        .max_elapsed(Duration::from_secs(10))
}

/// Sends one logical request with `sender`, the client layer configured by `layer`; each
/// attempt on a new connection (no idle connections kept), so that the proxy's script of
/// faults is a script of attempts.
async fn send(
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

async fn post(
    sender: Sender,
    layer: IdempotentClientLayer,
    url: &str,
    body: &str,
) -> Result<Answer, Failure> {
    send(sender, layer, Method::POST, url, body, None).await
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn lost_responses_and_resets_run_each_request_once_and_return_the_original_answer() {
    use Fault::*;
    // (faults of the attempts, whether the final answer is a replay)
    let scripts: &[(&[Fault], bool)] = &[
        (&[Pass], false),
        (&[DropResponse, Pass], true),
        (&[ResetAfterForward, Pass], true),
        (&[ResetBeforeForward, Pass], false),
        (
            &[ResetBeforeForward, DropResponse, ResetAfterForward, Pass],
            true,
        ),
    ];
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let mut keys = Vec::new();
        for (i, (faults, replayed)) in scripts.iter().enumerate() {
            let order = format!("o-{i}");
            proxy.script(faults.iter().copied());
            let body = format!(r#"{{"order":"{order}"}}"#);
            let answer = post(sender, quick(), &proxy.url("/orders"), &body)
                .await
                .unwrap_or_else(|e| panic!("{sender:?} {faults:?}: {e:?}"));
            let what = format!("{sender:?} {faults:?}");
            assert_eq!(answer.status, 200, "{what}");
            assert_eq!(server.seen.runs_of(&order), 1, "{what}: runs");
            assert_eq!(answer.json()["order"], order.as_str(), "{what}");
            // The original answer: the run number of the one execution, replayed or not.
            assert_eq!(
                answer.json()["run"].as_u64(),
                server.seen.run_of(&order).map(|r| r as u64),
                "{what}"
            );
            assert_eq!(answer.outcome.attempts() as usize, faults.len(), "{what}");
            assert_eq!(answer.outcome.replayed(), *replayed, "{what}");
            let key = answer.outcome.key().expect("a POST is sent with a key");
            assert_eq!(
                server.seen.keys().last(),
                Some(&key.as_str().to_owned()),
                "{what}"
            );
            keys.push(key.clone());
        }
        assert_eq!(server.seen.runs(), scripts.len(), "{sender:?}");
        assert_eq!(
            proxy.connections(),
            scripts.iter().map(|s| s.0.len()).sum::<usize>()
        );
        keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        keys.dedup();
        assert_eq!(
            keys.len(),
            scripts.len(),
            "{sender:?}: one key per logical request"
        );
    }
}

#[tokio::test]
async fn a_delayed_response_times_out_and_the_retry_gets_the_replay() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        proxy.script([Fault::Delay(Duration::from_millis(800))]);
        let layer = quick().attempt_timeout(Duration::from_millis(150));
        let answer = post(sender, layer, &proxy.url("/orders"), r#"{"order":"late"}"#)
            .await
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!(answer.status, 200, "{sender:?}");
        assert!(
            answer.outcome.attempts() >= 2,
            "{sender:?}: {:?}",
            answer.outcome
        );
        assert!(answer.outcome.replayed(), "{sender:?}");
        assert_eq!(server.seen.runs_of("late"), 1, "{sender:?}");
        assert_eq!(answer.json()["run"], 1, "{sender:?}");
    }
}

#[tokio::test]
async fn a_409_in_flight_is_waited_for_and_the_replay_returned() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let url = proxy.url("/slow");
        let key = IdempotencyKey::new_v4();
        let body = r#"{"order":"slow"}"#;
        let spawn = |key: IdempotencyKey| {
            let url = url.clone();
            tokio::spawn(
                async move { send(sender, quick(), Method::POST, &url, body, Some(key)).await },
            )
        };
        let first = spawn(key.clone());
        until("the first request runs", || {
            server
                .seen
                .slow_started
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1
        })
        .await;
        // The same operation sent again while the first still runs: the server answers 409
        // with Retry-After until the first completes.
        let second = spawn(key);
        until("a 409", || {
            server
                .seen
                .conflicts
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 1
        })
        .await;
        server.seen.gate.0.add_permits(1);
        let first = first
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        let second = second
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!((first.status, second.status), (200, 200), "{sender:?}");
        assert_eq!(first.outcome.attempts(), 1, "{sender:?}");
        assert!(!first.outcome.replayed(), "{sender:?}");
        assert!(
            second.outcome.attempts() >= 2,
            "{sender:?}: {:?}",
            second.outcome
        );
        assert!(second.outcome.replayed(), "{sender:?}");
        assert_eq!(second.body, first.body, "{sender:?}: the original answer");
        assert_eq!(server.seen.runs(), 1, "{sender:?}");
    }
}

#[tokio::test]
async fn client_errors_surface_at_once() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let key = IdempotencyKey::new("order-9").unwrap();
        let url = proxy.url("/orders");
        let first = send(
            sender,
            quick(),
            Method::POST,
            &url,
            r#"{"order":"a"}"#,
            Some(key.clone()),
        )
        .await
        .unwrap();
        assert_eq!(first.status, 200);
        // (what, path, body, caller's key, status)
        let cases: &[(&str, &str, &str, Option<&IdempotencyKey>, u16)] = &[
            (
                "key reused with another body",
                "/orders",
                r#"{"order":"b"}"#,
                Some(&key),
                422,
            ),
            ("body not JSON", "/orders", "not json", None, 400),
            ("no such route", "/nowhere", "{}", None, 404),
        ];
        for (what, path, body, key, status) in cases {
            let before = proxy.connections();
            let answer = send(
                sender,
                quick(),
                Method::POST,
                &proxy.url(path),
                body,
                key.cloned(),
            )
            .await
            .unwrap_or_else(|e| panic!("{sender:?} {what}: {e:?}"));
            assert_eq!(answer.status, *status, "{sender:?} {what}");
            assert_eq!(answer.outcome.attempts(), 1, "{sender:?} {what}");
            assert_eq!(proxy.connections() - before, 1, "{sender:?} {what}");
        }
        assert_eq!(server.seen.runs(), 1, "{sender:?}");
    }
}

#[tokio::test]
async fn a_server_that_keeps_failing_ends_after_the_bound() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;

        // Every connection reset: the last transport error, after exactly three attempts.
        proxy.then(Fault::ResetBeforeForward);
        let failure = post(
            sender,
            quick().max_attempts(3),
            &proxy.url("/orders"),
            r#"{"order":"x"}"#,
        )
        .await
        .expect_err("every attempt was reset");
        assert!(failure.is_transport(), "{sender:?}: {failure:?}");
        assert_eq!(proxy.connections(), 3, "{sender:?}");
        assert_eq!(server.seen.runs(), 0, "{sender:?}");

        // Every answer a 500: the last one, after three runs, all with the same key.
        proxy.then(Fault::Pass);
        let answer = post(
            sender,
            quick().max_attempts(3),
            &proxy.url("/fail"),
            r#"{"order":"f"}"#,
        )
        .await
        .unwrap_or_else(|e| panic!("{sender:?}: {e:?}"));
        assert_eq!(answer.status, 500, "{sender:?}");
        assert_eq!(answer.outcome.attempts(), 3, "{sender:?}");
        assert_eq!(answer.json()["run"], 3, "{sender:?}: the last answer");
        let key = answer.outcome.key().unwrap().as_str().to_owned();
        assert_eq!(server.seen.keys(), vec![key; 3], "{sender:?}");

        // With retries of 5xx turned off, one attempt.
        let answer = post(
            sender,
            quick().retry_server_errors(false),
            &proxy.url("/fail"),
            r#"{"order":"g"}"#,
        )
        .await
        .unwrap();
        assert_eq!(
            (answer.status, answer.outcome.attempts()),
            (500, 1),
            "{sender:?}"
        );
    }
}

#[tokio::test]
async fn a_key_of_the_callers_own_lets_a_restarted_process_finish_the_operation() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let url = proxy.url("/orders");
        let body = r#"{"order":"o-77"}"#;
        // The key is kept with the order, so it outlives the process that first sent it.
        let key = IdempotencyKey::new("order-77:paid").unwrap();

        // Every response lost: the sender gives up (and, say, its process dies).
        proxy.then(Fault::DropResponse);
        let failure = send(
            sender,
            quick().max_attempts(2),
            Method::POST,
            &url,
            body,
            Some(key.clone()),
        )
        .await
        .expect_err("every response was lost");
        assert!(failure.is_transport(), "{sender:?}: {failure:?}");

        // A new process, a new client: same key, same body.
        proxy.then(Fault::Pass);
        let answer = send(sender, quick(), Method::POST, &url, body, Some(key.clone()))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{sender:?}");
        assert!(answer.outcome.replayed(), "{sender:?}");
        assert_eq!(answer.outcome.key(), Some(&key), "{sender:?}");
        assert_eq!(server.seen.runs_of("o-77"), 1, "{sender:?}");
        assert_eq!(
            server.seen.keys(),
            vec!["order-77:paid".to_owned()],
            "{sender:?}"
        );
    }
}

#[tokio::test]
async fn safe_methods_are_retried_without_a_key() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        let url = proxy.url("/stock");
        proxy.script([Fault::ResetBeforeForward]);
        let answer = send(sender, quick(), Method::GET, &url, "", None)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{sender:?}");
        assert_eq!(answer.outcome.attempts(), 2, "{sender:?}");
        assert_eq!(answer.outcome.key(), None, "{sender:?}");
        let seen = &server.seen;
        assert_eq!(
            seen.gets.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{sender:?}"
        );
        assert_eq!(
            seen.gets_with_key.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{sender:?}"
        );

        // Not retried once turned off.
        proxy.script([Fault::ResetBeforeForward]);
        let before = proxy.connections();
        let layer = quick().retry_safe_methods(false);
        send(sender, layer, Method::GET, &url, "", None)
            .await
            .expect_err("sent once");
        assert_eq!(proxy.connections() - before, 1, "{sender:?}");
    }
}

#[tokio::test]
async fn a_body_too_large_to_keep_is_sent_once() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let proxy = FaultyProxy::start(server.addr).await;
        proxy.script([Fault::DropResponse]);
        let layer = quick().max_replay_body(8);
        let failure = post(sender, layer, &proxy.url("/orders"), r#"{"order":"big"}"#)
            .await
            .expect_err("not retried");
        assert!(failure.is_transport(), "{sender:?}: {failure:?}");
        assert_eq!(proxy.connections(), 1, "{sender:?}");
        assert_eq!(
            server.seen.runs_of("big"),
            1,
            "{sender:?}: it was sent, once"
        );
    }
}

#[tokio::test]
async fn a_streaming_body_is_sent_once() {
    let server = Server::start().await;
    let proxy = FaultyProxy::start(server.addr).await;
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<axum::body::Body>();
    let client = ServiceBuilder::new().layer(quick()).service(client);
    let stream = |order: &'static str| {
        let chunks = [r#"{"order":"#, order, "}"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c)));
        axum::body::Body::from_stream(futures_util::stream::iter(chunks))
    };
    let request = |body| {
        http::Request::post(proxy.url("/orders"))
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };

    proxy.script([Fault::DropResponse]);
    let err = client
        .clone()
        .oneshot(request(stream(r#""s1""#)))
        .await
        .expect_err("not retried");
    assert!(
        err.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some(),
        "{err:?}"
    );
    assert_eq!(proxy.connections(), 1);
    assert_eq!(server.seen.runs_of("s1"), 1);

    // Its key is sent all the same.
    let res = client.oneshot(request(stream(r#""s2""#))).await.unwrap();
    let outcome = res.extensions().get::<ClientOutcome>().unwrap();
    assert_eq!((res.status().as_u16(), outcome.attempts()), (200, 1));
    assert_eq!(
        server.seen.keys().last().map(String::as_str),
        outcome.key().map(|k| k.as_str())
    );
}

#[tokio::test]
async fn keys_reach_the_server_in_any_configured_header_and_quoting() {
    for &sender in SENDERS {
        let server = Server::start().await;
        let cases = [
            ("idempotency-key", false),
            ("idempotency-key", true),
            ("x-idempotency-key", false),
            ("x-idempotency-key", true),
        ];
        for (i, (header, quote)) in cases.into_iter().enumerate() {
            let layer = quick()
                .key_header(http::HeaderName::from_static(header))
                .quote_key(quote)
                .key_with(move || IdempotencyKey::new(format!("gen-{i}")).unwrap());
            let url = format!("http://{}/orders", server.addr);
            let answer = post(sender, layer, &url, &format!(r#"{{"order":"{i}"}}"#))
                .await
                .unwrap();
            assert_eq!(answer.status, 200, "{sender:?} {header} {quote}");
            let want = format!("gen-{i}");
            assert_eq!(
                answer.outcome.key().map(|k| k.as_str()),
                Some(want.as_str())
            );
            assert_eq!(
                server.seen.keys().last(),
                Some(&want),
                "{sender:?} {header} {quote}"
            );
        }
    }
}
