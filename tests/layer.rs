//! Router-level behaviour of the layer, run against both stores.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, IdempotencyStore};

use common::backend::{Backend, send};

both_stores!(
    first_delivery_runs_once_and_replays_identically,
    both_header_names_and_quoted_keys_are_the_same_key,
    invalid_keys_are_rejected_without_touching_the_store,
    missing_key_is_rejected_or_passed_through,
    safe_methods_pass_through,
    oversized_bodies_are_rejected_without_touching_the_store,
    reused_key_with_different_payload_is_422,
    duplicate_in_flight_gets_409_with_retry_after,
    concurrent_duplicates_run_once,
    lease_shorter_than_handler_still_runs_once,
    abandoned_claim_blocks_until_lease_lapses,
    handler_panic_releases_the_key,
    server_errors_are_not_stored,
    store_predicate_is_configurable,
    oversized_response_is_sent_once_and_never_rerun,
    record_expires_after_ttl,
    callers_are_isolated_by_scope,
    routes_are_isolated_by_scope,
    set_cookie_and_hop_by_hop_headers_are_not_replayed,
    client_disconnect_does_not_cancel_or_rerun,
    handler_receives_the_key,
    wait_mode_replays_the_original_when_it_finishes,
    wait_mode_falls_back_to_409_after_its_bound,
    wait_mode_runs_the_handler_when_the_original_fails,
    wait_mode_bounds_concurrent_waiters,
    status_only_mode_replays_the_status_alone,
    huge_ttls_are_clamped_not_fatal,
);

/// Answers the router makes itself are not the handler's result and consume no key: axum's
/// `405` for a method the route lacks (inside `Router::route_layer`), and its fallback's `404`
/// for a path no route matches (inside `Router::layer`). A handler's own `404` is stored.
#[tokio::test]
async fn router_answers_do_not_consume_keys() {
    use tower::ServiceExt;
    use tower_idempotency::MemoryStore;

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move || async move { format!("run {}", runs.fetch_add(1, Ordering::SeqCst) + 1) }
    };
    let request = |method: &str, path: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("idempotency-key", key)
            .body(Body::from("x"))
            .unwrap()
    };

    let store = MemoryStore::new();
    let app = Router::new()
        .route("/pay", post(handler.clone()))
        .route(
            "/orders/{id}/refund",
            post(|| async { (StatusCode::NOT_FOUND, "no such order") }),
        )
        .route_layer(IdempotencyLayer::new(store.clone()));
    for _ in 0..2 {
        let put = app
            .clone()
            .oneshot(request("PUT", "/pay", "k"))
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(store.is_empty(), "the 405 left an entry");
    }
    let post_ = app
        .clone()
        .oneshot(request("POST", "/pay", "k"))
        .await
        .unwrap();
    assert_eq!(
        post_.status(),
        StatusCode::OK,
        "the key was consumed by the 405"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    for replayed in [false, true] {
        let refund = app
            .clone()
            .oneshot(request("POST", "/orders/1/refund", "r"))
            .await
            .unwrap();
        assert_eq!(refund.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            refund.headers().contains_key("idempotent-replayed"),
            replayed,
            "a handler's own 404 is stored and replayed"
        );
    }

    let store = MemoryStore::new();
    let app = Router::new()
        .route("/pay", post(handler))
        .layer(IdempotencyLayer::new(store.clone()));
    let nowhere = app
        .clone()
        .oneshot(request("POST", "/nowhere", "n"))
        .await
        .unwrap();
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    assert!(store.is_empty(), "the fallback's 404 left an entry");
    let post_ = app
        .clone()
        .oneshot(request("POST", "/pay", "n"))
        .await
        .unwrap();
    assert_eq!(post_.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Handlers that count their executions.
#[derive(Clone, Default)]
struct Counters {
    runs: Arc<AtomicUsize>,
}

impl Counters {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, counters: &Counters) -> Router {
    let runs = counters.runs.clone();
    let echo = {
        let runs = runs.clone();
        move |headers: HeaderMap, body: Bytes| {
            let runs = runs.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(ms) = headers.get("x-sleep-ms") {
                    let ms: u64 = ms.to_str().unwrap().parse().unwrap();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let status = headers.get("x-status").map_or(StatusCode::CREATED, |s| {
                    s.to_str().unwrap().parse().unwrap()
                });
                let size = headers
                    .get("x-response-size")
                    .map(|s| s.to_str().unwrap().parse::<usize>().unwrap());
                let body = match size {
                    Some(size) => Body::from(vec![b'x'; size]),
                    None => Body::from(format!("run {n}: {}", String::from_utf8_lossy(&body))),
                };
                let mut response = (status, body).into_response();
                let h = response.headers_mut();
                h.append("x-multi", HeaderValue::from_static("one"));
                h.append("x-multi", HeaderValue::from_static("two"));
                h.insert(
                    header::SET_COOKIE,
                    HeaderValue::from_static("session=secret"),
                );
                h.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
                h.insert("x-private", HeaderValue::from_static("hop"));
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response
            }
        }
    };
    let panics = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if runs.load(Ordering::SeqCst) > 0 {
                    panic!("handler panic for the test");
                }
                "unreachable"
            }
        }
    };
    let order = {
        let runs = runs.clone();
        move |Path(id): Path<String>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("order {id}")
            }
        }
    };
    let whoami = {
        let runs = runs.clone();
        move |key: IdempotencyKey| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                format!("key={}", key.as_str())
            }
        }
    };
    Router::new()
        .route("/echo", post(echo).get(|| async { "safe" }))
        .route("/panic", post(panics))
        .route("/orders/{id}", post(order))
        .route("/whoami", post(whoami))
        .route_layer(layer)
}

fn post_req(path: &str, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut req = Request::post(path);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Body::from(body)).unwrap()
}

async fn first_delivery_runs_once_and_replays_identically<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let first = send(&app, post_req("/echo", Some("k-1"), "hello")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: hello");
    assert!(!first.replayed());
    // The first response keeps its headers (the record borrows them while it is stored).
    let multi: Vec<_> = first.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(first.headers[header::CONTENT_TYPE], "text/plain");
    for _ in 0..3 {
        let again = send(&app, post_req("/echo", Some("k-1"), "hello")).await;
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body);
        assert!(again.replayed());
        let multi: Vec<_> = again.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert_eq!(again.headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(
            again.headers[header::CONTENT_LENGTH],
            first.headers[header::CONTENT_LENGTH]
        );
    }
    assert_eq!(counters.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

async fn both_header_names_and_quoted_keys_are_the_same_key<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let first = send(&app, post_req("/echo", Some("\"k-2\""), "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let req = Request::post("/echo")
        .header("x-idempotency-key", "k-2")
        .body(Body::from("x"))
        .unwrap();
    let again = send(&app, req).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(counters.runs(), 1);
}

async fn invalid_keys_are_rejected_without_touching_the_store<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let long = "k".repeat(256);
    let bad: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("idempotency-key", b"")],
        vec![("idempotency-key", long.as_bytes())],
        vec![("idempotency-key", b"has space")],
        vec![("idempotency-key", b"tab\there")],
        vec![("idempotency-key", b"caf\xc3\xa9")],
        vec![("idempotency-key", b"\"unterminated")],
        vec![("idempotency-key", b"\"k\";param=1")],
        vec![("idempotency-key", b"a\"b")],
        vec![("idempotency-key", b"k"), ("idempotency-key", b"k")],
        vec![("idempotency-key", b"k1"), ("x-idempotency-key", b"k2")],
    ];
    for headers in bad {
        let mut req = Request::post("/echo");
        for (name, value) in &headers {
            req = req.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        let reply = send(&app, req.body(Body::from("x")).unwrap()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{headers:?}");
        let problem = reply.problem();
        assert!(
            problem["type"].as_str().unwrap().ends_with("InvalidKey"),
            "{problem}"
        );
    }
    assert_eq!(counters.runs(), 0);
    assert_eq!((b.entries)(), 0, "store touched by invalid keys");
}

async fn missing_key_is_rejected_or_passed_through<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let strict = app(IdempotencyLayer::new(b.store.clone()), &counters);
    let reply = send(&strict, post_req("/echo", None, "x")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("idempotency-key")
    );
    assert_eq!(counters.runs(), 0);

    let lenient = app(IdempotencyLayer::new(b.store).require_key(false), &counters);
    for n in 1..=2 {
        let reply = send(&lenient, post_req("/echo", None, "x")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(counters.runs(), n);
    }
    assert_eq!((b.entries)(), 0);
}

async fn safe_methods_pass_through<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let req = Request::get("/echo")
        .header("idempotency-key", "bad key")
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "safe");
    assert_eq!((b.entries)(), 0);
}

async fn oversized_bodies_are_rejected_without_touching_the_store<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let counters = Counters::default();
    let app = app(
        IdempotencyLayer::new(b.store).max_request_body(16),
        &counters,
    );
    // Declared too large: refused before the body is read.
    let req = Request::post("/echo")
        .header("idempotency-key", "big-1")
        .header(header::CONTENT_LENGTH, "17")
        .body(Body::from("a".repeat(17)))
        .unwrap();
    let reply = send(&app, req).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    reply.problem();
    // Streamed without a length: refused while reading.
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"0123456789")),
        Ok(Bytes::from_static(b"0123456789")),
    ];
    let req = Request::post("/echo")
        .header("idempotency-key", "big-2")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let reply = send(&app, req).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // At the limit: accepted.
    let reply = send(&app, post_req("/echo", Some("ok"), "0123456789abcdef")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

async fn reused_key_with_different_payload_is_422<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    // While running.
    let slow = Request::post("/echo")
        .header("idempotency-key", "reuse")
        .header("x-sleep-ms", "500")
        .body(Body::from("original"))
        .unwrap();
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reply = send(&app, post_req("/echo", Some("reuse"), "different")).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    reply.problem();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    // After completion: different body, and different path with the same route scope.
    let reply = send(&app, post_req("/echo", Some("reuse"), "different")).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reply = send(&app, post_req("/echo?x=1", Some("reuse"), "original")).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counters.runs(), 1);
}

async fn duplicate_in_flight_gets_409_with_retry_after<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(
        IdempotencyLayer::new(b.store).lease_ttl(Duration::from_secs(9)),
        &counters,
    );
    let slow = || {
        Request::post("/echo")
            .header("idempotency-key", "busy")
            .header("x-sleep-ms", "600")
            .body(Body::from("b"))
            .unwrap()
    };
    let first = tokio::spawn({
        let app = app.clone();
        let req = slow();
        async move { send(&app, req).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = send(&app, slow()).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    let retry: u64 = reply.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=9).contains(&retry), "Retry-After {retry}");
    reply.problem();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, slow()).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(counters.runs(), 1);
}

async fn concurrent_duplicates_run_once<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    // Several layer instances sharing the store (for Redis: separate connections too, see the
    // multi-instance test in tests/redis.rs).
    let apps: Vec<Router> = (0..3)
        .map(|_| app(IdempotencyLayer::new(b.store.clone()), &counters))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let app = apps[i % apps.len()].clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post("/echo")
                .header("idempotency-key", "storm")
                .header("x-sleep-ms", "200")
                .body(Body::from("same"))
                .unwrap();
            send(&app, req).await
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::CREATED => bodies.push(reply.body),
            StatusCode::CONFLICT => {}
            other => panic!("unexpected status {other}: {}", reply.text()),
        }
    }
    assert_eq!(counters.runs(), 1);
    assert!(!bodies.is_empty());
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

async fn lease_shorter_than_handler_still_runs_once<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(
        IdempotencyLayer::new(b.store).lease_ttl(Duration::from_millis(300)),
        &counters,
    );
    let req = || {
        Request::post("/echo")
            .header("idempotency-key", "slowpoke")
            .header("x-sleep-ms", "1200")
            .body(Body::from("s"))
            .unwrap()
    };
    let first = tokio::spawn({
        let app = app.clone();
        let req = req();
        async move { send(&app, req).await }
    });
    // Duplicates keep arriving long after the first lease would have lapsed without renewal.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reply = send(&app, req()).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    }
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert!(send(&app, req()).await.replayed());
    assert_eq!(counters.runs(), 1);
}

/// An instance that crashed mid-handler (its runtime is gone, so nobody renews the lease):
/// duplicates get 409 until the lease lapses, then exactly one runs.
async fn abandoned_claim_blocks_until_lease_lapses<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let lease = Duration::from_millis(600);
    let crashed = app(
        IdempotencyLayer::new(b.store.clone()).lease_ttl(lease),
        &counters,
    );
    let survivor = app(IdempotencyLayer::new(b.store).lease_ttl(lease), &counters);
    let req = |sleep: &str| {
        Request::post("/echo")
            .header("idempotency-key", "orphan")
            .header("x-sleep-ms", sleep)
            .body(Body::from("o"))
            .unwrap()
    };
    // Run the doomed instance on a runtime of its own and drop that runtime mid-handler.
    let doomed = req("60000");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(150), send(&crashed, doomed)).await;
        });
        rt.shutdown_background();
    })
    .join()
    .unwrap();
    assert_eq!(counters.runs(), 1, "the doomed handler started");
    let reply = send(&survivor, req("0")).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let reply = send(&survivor, req("0")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(counters.runs(), 2);
    assert!(send(&survivor, req("0")).await.replayed());
    assert_eq!(counters.runs(), 2);
}

async fn handler_panic_releases_the_key<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    for n in 1..=2 {
        let reply = send(&app, post_req("/panic", Some("boom"), "")).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!reply.replayed());
        reply.problem();
        assert_eq!(counters.runs(), n, "a retry after a panic runs again");
    }
    assert_eq!((b.entries)(), 0);
}

async fn server_errors_are_not_stored<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let req = |status: &str| {
        Request::post("/echo")
            .header("idempotency-key", "flaky")
            .header("x-status", status)
            .body(Body::from("f"))
            .unwrap()
    };
    let reply = send(&app, req("503")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counters.runs(), 1);
    // The retry runs again and succeeds; a 4xx is stored and replayed.
    assert_eq!(send(&app, req("400")).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(counters.runs(), 2);
    let replay = send(&app, req("200")).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert!(replay.replayed());
    assert_eq!(counters.runs(), 2);
}

async fn store_predicate_is_configurable<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer =
        IdempotencyLayer::new(b.store).store_response_with(|parts| parts.status.is_success());
    let app = app(layer, &counters);
    let req = |status: &str| {
        Request::post("/echo")
            .header("idempotency-key", "only-2xx")
            .header("x-status", status)
            .body(Body::from("f"))
            .unwrap()
    };
    assert_eq!(send(&app, req("409")).await.status, StatusCode::CONFLICT);
    assert_eq!(send(&app, req("202")).await.status, StatusCode::ACCEPTED);
    let replay = send(&app, req("500")).await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert!(replay.replayed());
    assert_eq!(counters.runs(), 2);
}

async fn oversized_response_is_sent_once_and_never_rerun<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(
        IdempotencyLayer::new(b.store).max_response_body(1000),
        &counters,
    );
    let req = || {
        Request::post("/echo")
            .header("idempotency-key", "huge")
            .header("x-response-size", "5000")
            .body(Body::from("h"))
            .unwrap()
    };
    let first = send(&app, req()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        5000,
        "the first caller gets the whole body"
    );
    let replay = send(&app, req()).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert!(replay.body.is_empty(), "the body was too large to store");
    assert_eq!(replay.headers[header::CONTENT_TYPE], "text/plain");
    assert_eq!(counters.runs(), 1);
}

async fn record_expires_after_ttl<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(
        IdempotencyLayer::new(b.store).record_ttl(Duration::from_millis(400)),
        &counters,
    );
    assert_eq!(
        send(&app, post_req("/echo", Some("ttl"), "t")).await.text(),
        "run 1: t"
    );
    assert!(
        send(&app, post_req("/echo", Some("ttl"), "t"))
            .await
            .replayed()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reply = send(&app, post_req("/echo", Some("ttl"), "t")).await;
    assert!(!reply.replayed());
    assert_eq!(reply.text(), "run 2: t");
}

async fn callers_are_isolated_by_scope<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store).scope_with(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let app = app(layer, &counters);
    let req = |tenant: &str, body: &'static str| {
        Request::post("/echo")
            .header("idempotency-key", "shared")
            .header("x-tenant", tenant)
            .body(Body::from(body))
            .unwrap()
    };
    let a = send(&app, req("alice", "for alice")).await;
    let b2 = send(&app, req("bob", "for bob")).await;
    assert_eq!(a.text(), "run 1: for alice");
    assert_eq!(b2.text(), "run 2: for bob");
    assert_eq!(send(&app, req("alice", "for alice")).await.body, a.body);
    assert_eq!(send(&app, req("bob", "for bob")).await.body, b2.body);
    assert_eq!(counters.runs(), 2);
}

async fn routes_are_isolated_by_scope<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    assert_eq!(
        send(&app, post_req("/echo", Some("r"), "")).await.status,
        StatusCode::CREATED
    );
    // Another route with the same key is another operation.
    let reply = send(&app, post_req("/orders/1", Some("r"), "")).await;
    assert_eq!(reply.text(), "order 1");
    // Same matched route (/orders/{id}), other path: the key was used for another request.
    let reply = send(&app, post_req("/orders/2", Some("r"), "")).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counters.runs(), 2);
}

async fn set_cookie_and_hop_by_hop_headers_are_not_replayed<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let first = send(&app, post_req("/echo", Some("cookie"), "c")).await;
    assert_eq!(first.headers[header::SET_COOKIE], "session=secret");
    let replay = send(&app, post_req("/echo", Some("cookie"), "c")).await;
    assert!(replay.replayed());
    assert!(!replay.headers.contains_key(header::SET_COOKIE));
    assert!(!replay.headers.contains_key(header::CONNECTION));
    assert!(!replay.headers.contains_key("x-private"));
}

async fn client_disconnect_does_not_cancel_or_rerun<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let req = || {
        Request::post("/echo")
            .header("idempotency-key", "gone")
            .header("x-sleep-ms", "400")
            .body(Body::from("g"))
            .unwrap()
    };
    // The client gives up after 100 ms: its response future is dropped mid-handler.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), send(&app, req())).await;
    assert!(gave_up.is_err());
    // The handler finishes anyway and its response is stored.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = send(&app, req()).await;
    assert!(reply.replayed(), "status {} {}", reply.status, reply.text());
    assert_eq!(reply.text(), "run 1: g");
    assert_eq!(counters.runs(), 1);
}

async fn handler_receives_the_key<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store), &counters);
    let reply = send(&app, post_req("/whoami", Some("\"quoted-key\""), "")).await;
    assert_eq!(reply.text(), "key=quoted-key");
}

fn slow_req(key: &str, sleep_ms: u64, status: u16) -> Request<Body> {
    Request::post("/echo")
        .header("idempotency-key", key)
        .header("x-sleep-ms", sleep_ms.to_string())
        .header("x-status", status.to_string())
        .body(Body::from("w"))
        .unwrap()
}

async fn wait_mode_replays_the_original_when_it_finishes<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store).wait_for_in_flight(Duration::from_secs(5));
    let app = app(layer, &counters);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow_req("wait", 600, 201)).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    let duplicate = send(&app, slow_req("wait", 600, 201)).await;
    let waited = started.elapsed();
    let first = first.await.unwrap();
    assert_eq!(
        duplicate.status,
        StatusCode::CREATED,
        "{}",
        duplicate.text()
    );
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, first.body);
    assert!(
        waited >= Duration::from_millis(300),
        "waited only {waited:?}"
    );
    assert_eq!(counters.runs(), 1);
}

async fn wait_mode_falls_back_to_409_after_its_bound<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store).wait_for_in_flight(Duration::from_millis(300));
    let app = app(layer, &counters);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow_req("bounded", 1500, 201)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let duplicate = send(&app, slow_req("bounded", 1500, 201)).await;
    let waited = started.elapsed();
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert!(duplicate.headers.contains_key(header::RETRY_AFTER));
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1200),
        "waited {waited:?}"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);
}

async fn wait_mode_runs_the_handler_when_the_original_fails<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store).wait_for_in_flight(Duration::from_secs(5));
    let app = app(layer, &counters);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow_req("retry-me", 400, 503)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The duplicate waits; the original answers 503 and releases the key; the duplicate then
    // owns the key and runs the handler (which now succeeds).
    let duplicate = send(&app, slow_req("retry-me", 0, 201)).await;
    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        duplicate.status,
        StatusCode::CREATED,
        "{}",
        duplicate.text()
    );
    assert!(!duplicate.replayed());
    assert_eq!(counters.runs(), 2);
}

async fn wait_mode_bounds_concurrent_waiters<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store)
        .wait_for_in_flight(Duration::from_secs(5))
        .max_waiters(1);
    let app = app(layer, &counters);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow_req("crowd", 800, 201)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow_req("crowd", 800, 201)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The only waiting slot is taken: this one is answered at once.
    let started = std::time::Instant::now();
    let turned_away = send(&app, slow_req("crowd", 800, 201)).await;
    assert_eq!(turned_away.status, StatusCode::CONFLICT);
    assert!(started.elapsed() < Duration::from_millis(300));
    let waiter = waiter.await.unwrap();
    assert!(waiter.replayed(), "{}", waiter.text());
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);
}

async fn status_only_mode_replays_the_status_alone<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let app = app(IdempotencyLayer::new(b.store).status_only(true), &counters);
    let first = send(&app, post_req("/echo", Some("status"), "s")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run 1: s");
    let replay = send(&app, post_req("/echo", Some("status"), "s")).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert!(replay.body.is_empty());
    assert!(!replay.headers.contains_key("x-multi"));
    assert_eq!(counters.runs(), 1);
}

async fn huge_ttls_are_clamped_not_fatal<St: IdempotencyStore>(b: Backend<St>) {
    let counters = Counters::default();
    let layer = IdempotencyLayer::new(b.store)
        .record_ttl(Duration::MAX)
        .lease_ttl(Duration::MAX);
    let app = app(layer, &counters);
    let first = send(&app, post_req("/echo", Some("forever"), "f")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, post_req("/echo", Some("forever"), "f")).await;
    assert!(replay.replayed(), "{} {}", replay.status, replay.text());
    assert_eq!(counters.runs(), 1);
}

/// A service that counts how often it is cloned.
#[derive(Default)]
struct CountsClones {
    clones: Arc<AtomicUsize>,
}

impl Clone for CountsClones {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            clones: self.clones.clone(),
        }
    }
}

impl tower::Service<Request<Body>> for CountsClones {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(StatusCode::CREATED.into_response()))
    }
}

/// A request the layer lets through (a safe method, or no key where none is required) goes to the
/// service that was driven to readiness; only a protected request, whose handler runs after the
/// claim, takes it and leaves a clone behind.
#[tokio::test]
async fn only_protected_requests_clone_the_service() {
    use tower::{Layer, Service, ServiceExt};
    let inner = CountsClones::default();
    let clones = inner.clones.clone();
    let layer = IdempotencyLayer::new(tower_idempotency::MemoryStore::new()).require_key(false);
    let mut svc = layer.layer(inner);
    let get = Request::get("/pay").body(Body::empty()).unwrap();
    let keyless = Request::post("/pay").body(Body::from("x")).unwrap();
    let keyed = || {
        Request::post("/pay")
            .header("idempotency-key", "k-1")
            .body(Body::from("x"))
            .unwrap()
    };
    for req in [get, keyless] {
        let response = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    assert_eq!(clones.load(Ordering::SeqCst), 0, "passed through");
    let response = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(clones.load(Ordering::SeqCst), 1, "protected");
    let replay = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}
