//! The local cache of completed records: replays without store round trips, bounded by the
//! record's expiry, never caching running claims.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, LocalCache, MemoryStore, RedisStore};

use common::stub::{Op, Stub};
use common::{TestRedis, unique_prefix};

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, runs: &Arc<AtomicUsize>) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/pay",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if body == "slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    format!("run {n}")
                }
            }),
        )
        .route_layer(layer)
}

async fn send(app: &Router, key: &str, body: &'static str) -> (StatusCode, bool, String) {
    let req = Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn replays_from_cache_without_store_round_trips<St: IdempotencyStore>(store: St) {
    let store = Stub::new(store);
    let runs = Arc::new(AtomicUsize::new(0));
    let cache = LocalCache::new(100, 1 << 20);
    let app = app(
        IdempotencyLayer::new(store.clone()).local_cache(cache.clone()),
        &runs,
    );
    assert_eq!(
        send(&app, "hot", "x").await,
        (StatusCode::OK, false, "run 1".into())
    );
    for _ in 0..20 {
        assert_eq!(
            send(&app, "hot", "x").await,
            (StatusCode::OK, true, "run 1".into())
        );
    }
    assert_eq!(store.calls(Op::Claim), 1, "replays went to the store");
    // A different payload under the cached key is still refused, from the cache.
    assert_eq!(
        send(&app, "hot", "y").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(store.calls(Op::Claim), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The first response and the cached replay both carry the handler's headers.
    for replayed in [false, true] {
        let req = Request::post("/pay")
            .header("idempotency-key", "headers")
            .body(Body::from("x"))
            .unwrap();
        let response = app.clone().oneshot(req).await.unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}

#[tokio::test]
async fn memory_replays_from_cache_without_store_round_trips() {
    replays_from_cache_without_store_round_trips(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replays_from_cache_without_store_round_trips() {
    let redis = TestRedis::get();
    let store = RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(unique_prefix("cache"));
    replays_from_cache_without_store_round_trips(store).await;
}

/// A replay served by the store (completed on another instance) fills the cache too.
#[tokio::test]
async fn records_completed_elsewhere_are_cached_on_first_replay() {
    let store = MemoryStore::new();
    let counted = Stub::new(store.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let other = app(IdempotencyLayer::new(store), &runs);
    let cached = app(
        IdempotencyLayer::new(counted.clone()).local_cache(LocalCache::new(100, 1 << 20)),
        &runs,
    );
    send(&other, "elsewhere", "x").await;
    for _ in 0..5 {
        assert!(send(&cached, "elsewhere", "x").await.1);
    }
    assert_eq!(counted.calls(Op::Claim), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cached_entries_never_outlive_the_record() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(
        IdempotencyLayer::new(MemoryStore::new())
            .record_ttl(Duration::from_millis(300))
            .local_cache(LocalCache::new(100, 1 << 20)),
        &runs,
    );
    send(&app, "short", "x").await;
    assert!(send(&app, "short", "x").await.1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        send(&app, "short", "x").await,
        (StatusCode::OK, false, "run 2".into())
    );
}

#[tokio::test]
async fn running_claims_are_never_cached() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(
        IdempotencyLayer::new(MemoryStore::new()).local_cache(LocalCache::new(100, 1 << 20)),
        &runs,
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, "busy", "slow").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(send(&app, "busy", "slow").await.0, StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert!(send(&app, "busy", "slow").await.1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The documented trade-off: a record deleted by hand in Redis is still replayed by an instance
/// that cached it (until the record's original expiry); an instance without the cache runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_records_are_still_replayed_from_the_cache() {
    let redis = TestRedis::get();
    let prefix = unique_prefix("cache_delete");
    let store = RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(prefix.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let cached = app(
        IdempotencyLayer::new(store.clone()).local_cache(LocalCache::new(100, 1 << 20)),
        &runs,
    );
    let uncached = app(IdempotencyLayer::new(store), &runs);
    send(&cached, "gone", "x").await;
    let mut conn = redis.client().get_connection().unwrap();
    for key in redis.keys(&prefix) {
        let _: () = redis::cmd("DEL").arg(key).query(&mut conn).unwrap();
    }
    assert_eq!(
        send(&cached, "gone", "x").await,
        (StatusCode::OK, true, "run 1".into())
    );
    assert_eq!(
        send(&uncached, "gone", "x").await,
        (StatusCode::OK, false, "run 2".into())
    );
}
