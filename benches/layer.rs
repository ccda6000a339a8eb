//! The layer's own cost per request, in process (no sockets, no Redis): an axum router called
//! with `oneshot`, with and without the layer.
//!
//! - `plain`: the handler alone;
//! - `null_store`: the layer over a store that answers at once and keeps nothing, so the time
//!   above `plain` is the layer's request path by itself (key parsing, scope and fingerprint
//!   digests, body buffering, the handler task, response buffering and record building);
//! - `memory/first`, `memory/replay`: the layer over [`MemoryStore`], every request with a new
//!   key, or every request with the same one.
//!
//! Run with `cargo bench --bench layer`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[path = "support/null_store.rs"]
mod null_store;
use null_store::NullStore;

const REQUEST_BODY: &[u8] =
    br#"{"order":"ord_8c1f2e","amount":4200,"currency":"eur","customer":"cus_42"}"#;

fn app() -> Router {
    let response = Bytes::from(vec![b'x'; 100]);
    Router::new().route(
        "/pay",
        post(move |_body: Bytes| {
            let response = response.clone();
            async move {
                (
                    StatusCode::CREATED,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    response,
                )
                    .into_response()
            }
        }),
    )
}

fn request(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::from(REQUEST_BODY))
        .expect("request")
}

async fn call(router: &Router, key: &str) -> Response {
    let response = router
        .clone()
        .oneshot(request(key))
        .await
        .expect("infallible");
    assert!(response.status().is_success(), "{}", response.status());
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, Body::from(body))
}

/// Times `iters` sequential requests on a fresh router from `make`; keys are unique unless
/// `key` is given.
fn run(
    rt: &tokio::runtime::Runtime,
    make: impl Fn() -> Router,
    key: Option<&str>,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        // As `axum::serve` does: finalized once, not per request (see benches/instructions.rs).
        let router = make().with_state(());
        if let Some(key) = key {
            call(&router, key).await;
        }
        let mut unique = String::new();
        let start = Instant::now();
        for i in 0..iters {
            let key = match key {
                Some(key) => key,
                None => {
                    unique.clear();
                    unique.push_str("key-");
                    unique.push_str(&i.to_string());
                    &unique
                }
            };
            std::hint::black_box(call(&router, key).await);
        }
        start.elapsed()
    })
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("layer");
    group.bench_function("plain", |b| {
        b.iter_custom(|iters| run(&rt, app, None, iters))
    });
    group.bench_function("null_store", |b| {
        b.iter_custom(|iters| {
            run(
                &rt,
                || app().route_layer(IdempotencyLayer::new(NullStore)),
                None,
                iters,
            )
        })
    });
    group.bench_function("memory/first", |b| {
        b.iter_custom(|iters| {
            run(
                &rt,
                || app().route_layer(IdempotencyLayer::new(MemoryStore::new())),
                None,
                iters,
            )
        })
    });
    group.bench_function("memory/replay", |b| {
        b.iter_custom(|iters| {
            run(
                &rt,
                || app().route_layer(IdempotencyLayer::new(MemoryStore::new())),
                Some("the-same-key"),
                iters,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
