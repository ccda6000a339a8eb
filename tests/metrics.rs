//! Metrics through the `metrics` facade: outcomes, store timings, renewals, cache hits, a full
//! `MemoryStore`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::post;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, LocalCache, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_timings_renewals_and_cache_hits_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |body: String| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if body == "slow" {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                "ok"
            }
        }
    };
    let app = Router::new().route("/m", post(handler)).route_layer(
        IdempotencyLayer::new(MemoryStore::new())
            .lease_ttl(Duration::from_millis(90))
            .local_cache(LocalCache::new(10, 1 << 20)),
    );
    let send = |key: Option<&str>, body: &'static str| {
        let mut req = Request::post("/m");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        app.clone().oneshot(req.body(Body::from(body)).unwrap())
    };
    send(Some("a"), "slow").await.unwrap(); // acquired, renewed while slow
    send(Some("a"), "slow").await.unwrap(); // replayed from the cache
    send(Some("a"), "other").await.unwrap(); // mismatch
    send(None, "x").await.unwrap(); // rejected

    let snapshot = snapshotter.snapshot().into_hashmap();
    let counter = |name: &str, label: Option<(&str, &str)>| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _)| {
                let key = key.key();
                key.name() == name
                    && label
                        .is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
            })
            .map(|(_, (_, _, value))| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let outcome = |o| counter("idempotency_requests_total", Some(("outcome", o)));
    assert_eq!(outcome("acquired"), 1);
    assert_eq!(outcome("replayed"), 1);
    assert_eq!(outcome("mismatch"), 1);
    assert_eq!(outcome("rejected"), 1);
    assert!(counter("idempotency_lease_renewals_total", None) >= 2);
    assert_eq!(counter("idempotency_cache_hits_total", None), 2);
    assert_eq!(counter("idempotency_cache_misses_total", None), 1);
    let histograms: Vec<(String, Vec<f64>)> = snapshot
        .iter()
        .filter_map(|(k, (_, _, v))| match v {
            DebugValue::Histogram(values) => {
                let labels: Vec<String> = k.key().labels().map(|l| l.value().to_owned()).collect();
                let name = format!("{}{labels:?}", k.key().name());
                Some((name, values.iter().map(|v| v.into_inner()).collect()))
            }
            _ => None,
        })
        .collect();
    let seconds = |name: &str| -> Vec<f64> {
        let found = histograms.iter().find(|(h, _)| h == name);
        found
            .unwrap_or_else(|| panic!("{name} missing from {histograms:?}"))
            .1
            .clone()
    };
    // Each phase is measured on its own: the claim and the complete do not include the 250 ms
    // the handler slept, and the handler's duration does.
    let handler = seconds("idempotency_handler_duration_seconds[]");
    assert_eq!(handler.len(), 1, "{handler:?}");
    assert!(handler[0] >= 0.25, "{handler:?}");
    for op in ["claim", "complete"] {
        let values = seconds(&format!("idempotency_store_duration_seconds[\"{op}\"]"));
        assert!(!values.is_empty());
        assert!(values.iter().all(|s| *s < 0.2), "{op}: {values:?}");
    }
    assert!(!seconds("idempotency_store_duration_seconds[\"renew\"]").is_empty());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(counter("idempotency_memory_store_full_total", None), 0);

    // A full MemoryStore: the second key is refused, and counted.
    let full = Router::new()
        .route("/full", post(|| async { "ok" }))
        .route_layer(IdempotencyLayer::new(MemoryStore::new().max_entries(1)));
    for key in ["f1", "f2"] {
        let req = Request::post("/full").header("idempotency-key", key);
        let req = req.body(Body::empty()).unwrap();
        full.clone().oneshot(req).await.unwrap();
    }
    let snapshot = snapshotter.snapshot().into_hashmap();
    let full_total = snapshot
        .iter()
        .find(|(key, _)| key.key().name() == "idempotency_memory_store_full_total")
        .map(|(_, (_, _, value))| value);
    assert_eq!(full_total, Some(&DebugValue::Counter(1)));
}
