//! The cost of encryption at rest (feature `encryption`), in process: an axum router called
//! with `oneshot` over a `MemoryStore`, with and without `encrypt_with`, for a first delivery
//! (a new key each request: the record is sealed) and a replay (the same key: the record is
//! opened), with 100 B and 10 KiB response bodies.
//!
//! Run with `cargo bench --features encryption --bench encryption`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, KeyRing, MemoryStore};

const REQUEST_BODY: &[u8] =
    br#"{"order":"ord_8c1f2e","amount":4200,"currency":"eur","customer":"cus_42"}"#;

fn app(response_len: usize, encrypted: bool) -> Router {
    let response = Bytes::from(vec![b'x'; response_len]);
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let layer = if encrypted {
        layer.encrypt_with(KeyRing::new(1, [7; 32]))
    } else {
        layer
    };
    Router::new()
        .route(
            "/pay",
            post(move |_body: Bytes| {
                let response = response.clone();
                async move {
                    (
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
        .route_layer(layer)
        .with_state(())
}

async fn call(router: &Router, key: &str) -> Bytes {
    let request = Request::post("/pay")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::from(REQUEST_BODY))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert!(response.status().is_success(), "{}", response.status());
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

/// Times `iters` sequential requests; every key new, or all the same one (`replay`).
fn run(rt: &tokio::runtime::Runtime, router: &Router, replay: bool, iters: u64) -> Duration {
    rt.block_on(async {
        call(router, "the-same-key").await;
        let mut key = String::from("the-same-key");
        let start = Instant::now();
        for i in 0..iters {
            if !replay {
                key.clear();
                key.push_str("key-");
                key.push_str(&i.to_string());
            }
            std::hint::black_box(call(router, &key).await);
        }
        start.elapsed()
    })
}

fn encryption(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("encryption");
    for (size, len) in [("100B", 100), ("10KiB", 10 * 1024)] {
        for encrypted in [false, true] {
            let mode = if encrypted { "encrypted" } else { "plain" };
            for replay in [false, true] {
                let path = if replay { "replay" } else { "first" };
                group.bench_function(format!("{path}/{size}/{mode}"), |b| {
                    // A fresh store per sample batch, so first deliveries do not pile up.
                    b.iter_custom(|iters| run(&rt, &app(len, encrypted), replay, iters))
                });
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = encryption
}
criterion_main!(benches);
