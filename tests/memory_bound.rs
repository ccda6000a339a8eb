//! A full `MemoryStore` behind the layer: new keys get `503`, held keys are answered as usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// A route whose handler counts its runs and answers with the run's number.
fn app(layer: IdempotencyLayer<MemoryStore>, runs: &Arc<AtomicUsize>) -> Router {
    let runs = runs.clone();
    let handler = move || {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        async move { (StatusCode::CREATED, format!("run {n}")) }
    };
    Router::new()
        .route("/pay", post(handler))
        .route_layer(layer)
}

async fn send(app: &Router, key: &str) -> Response {
    let request = Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap();
    app.clone().oneshot(request).await.unwrap()
}

async fn body(response: Response) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_with_503_and_still_replays() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(
        IdempotencyLayer::new(MemoryStore::new().max_entries(2)),
        &runs,
    );
    for key in ["first", "second"] {
        assert_eq!(send(&app, key).await.status(), StatusCode::CREATED);
    }

    let refused = send(&app, "third").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert!(refused.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the handler did not run");

    let replay = send(&app, "first").await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body(replay).await, "run 1");
    // Refused again: nothing was freed.
    let refused = send(&app, "third").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fail_open_runs_a_new_key_unprotected_when_the_store_is_full() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new().max_entries(1);
    let app = app(IdempotencyLayer::new(store.clone()).fail_open(true), &runs);
    assert_eq!(send(&app, "first").await.status(), StatusCode::CREATED);
    let unprotected = send(&app, "second").await;
    assert_eq!(unprotected.status(), StatusCode::CREATED);
    assert_eq!(body(unprotected).await, "run 2");
    // Nothing stored for it: the store still holds the first key alone.
    assert_eq!(store.len(), 1);
    assert_eq!(body(send(&app, "first").await).await, "run 1");
}
