//! Store failures, timeouts, several instances on one Redis, and the ways to mount the layer.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode, header};
use axum::routing::post;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore, RejectionKind,
};

use common::stub::{Fault, Op, Stub};
use common::{RedisServer, TestRedis, unique_prefix};

fn counting_router<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    runs: &Arc<AtomicUsize>,
) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/pay",
            post(move |body: Bytes| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    format!("paid #{n}: {}", String::from_utf8_lossy(&body))
                }
            }),
        )
        .route_layer(layer)
}

fn pay(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("10 EUR"))
        .unwrap()
}

async fn send<S>(svc: S, req: Request<Body>) -> (StatusCode, http::HeaderMap, String)
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let response = svc.oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_then_recovers() {
    let mut server = RedisServer::spawn();
    let client = redis::Client::open(server.url()).unwrap();
    let store = RedisStore::new(client)
        .await
        .unwrap()
        .key_prefix(unique_prefix("outage"));
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_router(
        IdempotencyLayer::new(store).store_timeout(Duration::from_millis(500)),
        &runs,
    );

    let (status, _, body) = send(app.clone(), pay("before")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "paid #1: 10 EUR"));

    server.stop();
    for key in ["during-1", "during-2", "before"] {
        let started = Instant::now();
        let (status, headers, body) = send(app.clone(), pay(key)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a request during the outage hung for {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no handler ran during the outage"
    );

    // A fresh, empty server on the same port: the layer reconnects by itself.
    server.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let (status, _, _) = send(app.clone(), pay("after")).await;
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, StatusCode::OK, "the layer did not recover");
    let (_, headers, body) = send(app.clone(), pay("after")).await;
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(body, "paid #2: 10 EUR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_the_handler_when_redis_is_down() {
    let mut server = RedisServer::spawn();
    let client = redis::Client::open(server.url()).unwrap();
    let store = RedisStore::new(client).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_router(
        IdempotencyLayer::new(store)
            .fail_open(true)
            .store_timeout(Duration::from_millis(500)),
        &runs,
    );
    server.stop();
    for n in 1..=2 {
        let (status, headers, _) = send(app.clone(), pay("open")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!headers.contains_key("idempotent-replayed"));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            n,
            "unprotected: every request runs"
        );
    }
}

#[tokio::test]
async fn store_timeout_bounds_every_request() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_router(
        IdempotencyLayer::new(Stub::memory().with(Op::Claim, Fault::Hang))
            .store_timeout(Duration::from_millis(200)),
        &runs,
    );
    let started = Instant::now();
    let (status, headers, _) = send(app, pay("stuck")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Several service instances, each with its own Redis connection, share one Redis: a storm of
/// duplicates across them runs each key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_redis_run_each_key_once() {
    let redis = TestRedis::get();
    let prefix = unique_prefix("instances");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for _ in 0..3 {
        let store = RedisStore::new(redis.client())
            .await
            .unwrap()
            .key_prefix(prefix.clone());
        apps.push(counting_router(IdempotencyLayer::new(store), &runs));
    }
    let keys = 40;
    let mut tasks = Vec::new();
    for key in 0..keys {
        for dup in 0..5 {
            let app = apps[(key + dup) % apps.len()].clone();
            tasks.push(tokio::spawn(async move {
                let (status, _, body) = send(app, pay(&format!("key-{key}"))).await;
                (key, status, body)
            }));
        }
    }
    let mut bodies: Vec<Option<String>> = vec![None; keys];
    for task in tasks {
        let (key, status, body) = task.await.unwrap();
        match status {
            StatusCode::OK => match &bodies[key] {
                Some(seen) => assert_eq!(*seen, body, "key {key} answered differently"),
                None => bodies[key] = Some(body),
            },
            StatusCode::CONFLICT => {}
            other => panic!("key {key}: unexpected {other} {body}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), keys);
    assert_eq!(redis.count_keys(&prefix), keys);
}

#[tokio::test]
async fn mounts_with_layer_method_router_and_plain_services() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move { format!("run {}", runs.fetch_add(1, Ordering::SeqCst) + 1) }
        }
    };

    // Router::layer: the scope falls back to the request path.
    let app = Router::new()
        .route("/a", post(handler.clone()))
        .layer(IdempotencyLayer::new(store.clone()));
    let req = || {
        Request::post("/a")
            .header("idempotency-key", "m")
            .body(Body::empty())
            .unwrap()
    };
    let (_, _, first) = send(app.clone(), req()).await;
    let (_, headers, again) = send(app, req()).await;
    assert_eq!((first.as_str(), again.as_str()), ("run 1", "run 1"));
    assert_eq!(headers["idempotent-replayed"], "true");

    // MethodRouter::layer.
    let app = Router::new().route(
        "/b",
        post(handler).layer(IdempotencyLayer::new(store.clone())),
    );
    let req = || {
        Request::post("/b")
            .header("idempotency-key", "m")
            .body(Body::empty())
            .unwrap()
    };
    let (_, _, first) = send(app.clone(), req()).await;
    let (_, _, again) = send(app, req()).await;
    assert_eq!((first.as_str(), again.as_str()), ("run 2", "run 2"));

    // A plain tower service, with a body type of its own (Full<Bytes>).
    let plain_runs = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .service_fn({
            let plain_runs = plain_runs.clone();
            move |req: Request<http_body_util::Full<Bytes>>| {
                let plain_runs = plain_runs.clone();
                async move {
                    plain_runs.fetch_add(1, Ordering::SeqCst);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(body)))
                }
            }
        });
    let req = || {
        Request::post("/plain")
            .header("idempotency-key", "p")
            .body(http_body_util::Full::new(Bytes::from_static(b"echo")))
            .unwrap()
    };
    for _ in 0..2 {
        let response = svc.clone().oneshot(req()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"echo");
    }
    assert_eq!(plain_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn rejections_can_be_rendered_by_the_user() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).rejection_with(|rejection| {
        let code = match rejection.kind() {
            RejectionKind::MissingKey => "missing",
            _ => "other",
        };
        Response::builder()
            .status(rejection.status())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(format!("{{\"code\":\"{code}\"}}")))
            .unwrap()
    });
    let app = counting_router(layer, &runs);
    let req = Request::post("/pay").body(Body::empty()).unwrap();
    let (status, headers, body) = send(app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(body, "{\"code\":\"missing\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_refused_not_replayed_or_rerun() {
    let redis = TestRedis::get();
    let prefix = unique_prefix("corrupt");
    let store = RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(prefix.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_router(IdempotencyLayer::new(store), &runs);
    let (status, _, _) = send(app.clone(), pay("c")).await;
    assert_eq!(status, StatusCode::OK);
    // Overwrite the stored record with garbage.
    let mut conn = redis.client().get_connection().unwrap();
    let keys = redis.keys(&prefix);
    assert_eq!(keys.len(), 1);
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg("garbage")
        .query(&mut conn)
        .unwrap();
    let (status, headers, body) = send(app, pay("c")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert!(body.contains("CorruptRecord"), "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
