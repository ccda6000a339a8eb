//! Metrics of the idempotency layer in Prometheus' text format.
//!
//! ```sh
//! cargo run --example prometheus --features metrics,cache
//! ```
//!
//! Installs the Prometheus recorder from `metrics-exporter-prometheus`, sends a few requests
//! through a router (a first delivery, replays served by the local cache, a reused key, a
//! request without a key) and prints what a `/metrics` endpoint would serve. In a service, expose
//! `handle.render()` on a route of its own, or enable the exporter's HTTP listener.

#![allow(clippy::print_stdout)] // printing the metrics is the point of this example

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusBuilder;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, LocalCache, MemoryStore};

#[tokio::main]
async fn main() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("install the Prometheus recorder");

    let metrics = handle.clone();
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .route_layer(
            IdempotencyLayer::new(MemoryStore::new())
                .record_ttl(Duration::from_secs(3600))
                .local_cache(LocalCache::new(10_000, 64 << 20)),
        )
        .route("/metrics", get(move || async move { metrics.render() }));

    let requests = [
        (Some("order-1"), "10 EUR"),
        (Some("order-1"), "10 EUR"),
        (Some("order-1"), "10 EUR"),
        (Some("order-1"), "99 EUR"),
        (None, "10 EUR"),
    ];
    for (key, body) in requests {
        let mut req = Request::post("/pay");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let response = app
            .clone()
            .oneshot(req.body(Body::from(body)).expect("valid request"))
            .await
            .expect("infallible");
        eprintln!(
            "POST /pay key={key:?} body={body:?} -> {}",
            response.status()
        );
    }

    let response = app
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .expect("valid request"),
        )
        .await
        .expect("infallible");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("metrics body");
    print!("{}", String::from_utf8_lossy(&body));
}
