//! What is retried and what is not: client errors, safe methods, bodies that cannot be sent
//! twice; and where the key goes.

use bytes::Bytes;
use http::Method;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyKey;
use tower_idempotency::client::ClientOutcome;

use crate::proxy::{Fault, FaultyProxy};
use crate::server::Server;
use crate::{SENDERS, post, quick, send};

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
