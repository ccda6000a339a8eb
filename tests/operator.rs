//! Operator tools through the layer: `inspect` reports a key's state and `forget` lets a
//! completed key run again, computed from the same route, namespace, caller and key the layer
//! scopes requests by; on the memory, Redis and Postgres stores.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tokio::sync::Notify;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, KeyQuery, KeyState, StoreError};

use common::backend::{Backend, send};
use common::bounded;

const ROUTE: &str = "/orders/{id}/pay";
const BODY: &str = "paid: order 7, amount 10";

/// A layer scoped by the `x-tenant` header, in namespace `shop`.
fn layer<St: IdempotencyStore>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store)
        .namespace("shop")
        .scope_with(|parts| {
            let tenant = parts.headers.get("x-tenant")?;
            tenant.to_str().ok().map(str::to_owned)
        })
}

/// An app whose handler counts its runs and, while `gate` is set, waits for it to be notified.
fn app<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    runs: &Arc<AtomicUsize>,
    gate: Option<Arc<Notify>>,
) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            ROUTE,
            post(move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if let Some(gate) = gate {
                        gate.notified().await;
                    }
                    (StatusCode::CREATED, BODY)
                }
            }),
        )
        .route_layer(layer)
}

fn pay(key: &str) -> Request<Body> {
    Request::post("/orders/7/pay")
        .header("idempotency-key", key)
        .header("x-tenant", "acme")
        .body(Body::from("amount=10"))
        .unwrap()
}

fn query(key: &str) -> KeyQuery {
    KeyQuery::new(ROUTE, key).caller("acme")
}

/// What `inspect` reports once the request in flight has claimed the key (within 10 s).
async fn once_claimed<St: IdempotencyStore>(
    layer: &IdempotencyLayer<St>,
    query: &KeyQuery,
) -> KeyState {
    bounded(Duration::from_secs(10), "the key to be claimed", async {
        loop {
            match layer.inspect(query).await.unwrap() {
                KeyState::Absent => tokio::time::sleep(Duration::from_millis(1)).await,
                state => return state,
            }
        }
    })
    .await
}

/// Absent, then running with time left while the handler runs, then completed with the status,
/// body length and expiry; other scopes (caller, route, key) are absent. No lookup claims.
async fn inspect_reports_each_state<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let layer = layer(backend.store);
    let app = app(layer.clone(), &runs, Some(gate.clone()));
    assert_eq!(layer.inspect(&query("k")).await.unwrap(), KeyState::Absent);
    // Had the lookup claimed the key, the first request would now be refused.

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay("k")).await }
    });
    let running = once_claimed(&layer, &query("k")).await;
    match running {
        KeyState::Running { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(30));
        }
        other => panic!("expected Running, got {other:?}"),
    }
    gate.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);

    match layer.inspect(&query("k")).await.unwrap() {
        KeyState::Completed {
            status,
            body_len,
            stored_bytes,
            expires_at,
        } => {
            assert_eq!(status, StatusCode::CREATED);
            assert_eq!(body_len, BODY.len());
            assert!(stored_bytes > body_len);
            let left = expires_at.duration_since(SystemTime::now()).unwrap();
            assert!(left > Duration::from_secs(23 * 3600), "{left:?}");
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    for other in [
        KeyQuery::new(ROUTE, "k"),
        KeyQuery::new(ROUTE, "k").caller("globex"),
        KeyQuery::new("/orders/7/pay", "k").caller("acme"),
        query("k2"),
    ] {
        assert_eq!(
            layer.inspect(&other).await.unwrap(),
            KeyState::Absent,
            "{other:?}"
        );
    }
    // Another namespace is another scope.
    let other_namespace = layer.clone().namespace("billing");
    assert_eq!(
        other_namespace.inspect(&query("k")).await.unwrap(),
        KeyState::Absent
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A completed key is replayed until it is forgotten, and then runs again; a running key and
/// an absent one are not forgotten, and other keys keep their records.
async fn forget_lets_a_key_run_again<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = layer(backend.store);
    let plain = app(layer.clone(), &runs, None);
    assert!(!layer.forget(&query("k")).await.unwrap(), "absent");
    send(&plain, pay("k")).await;
    send(&plain, pay("other")).await;
    assert!(send(&plain, pay("k")).await.replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // The wrong caller forgets nothing.
    assert!(!layer.forget(&KeyQuery::new(ROUTE, "k")).await.unwrap());
    assert!(layer.forget(&query("k")).await.unwrap());
    assert_eq!(layer.inspect(&query("k")).await.unwrap(), KeyState::Absent);
    let again = send(&plain, pay("k")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed(), "a forgotten key runs again");
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert!(send(&plain, pay("k")).await.replayed());
    assert!(
        send(&plain, pay("other")).await.replayed(),
        "other keys keep their records"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // A running key is left to its holder.
    let gate = Arc::new(Notify::new());
    let gated = app(layer.clone(), &runs, Some(gate.clone()));
    let running = tokio::spawn({
        let gated = gated.clone();
        async move { send(&gated, pay("slow")).await }
    });
    once_claimed(&layer, &query("slow")).await;
    assert!(!layer.forget(&query("slow")).await.unwrap(), "running");
    assert_eq!(send(&gated, pay("slow")).await.status, StatusCode::CONFLICT);
    gate.notify_one();
    assert_eq!(running.await.unwrap().status, StatusCode::CREATED);
}

both_stores!(inspect_reports_each_state, forget_lets_a_key_run_again);

/// A store that does not implement the operator's operations answers `Unsupported`.
#[tokio::test]
async fn a_store_without_them_answers_unsupported() {
    let layer = layer(common::stub::Stub::memory());
    assert!(matches!(
        layer.inspect(&query("k")).await,
        Err(StoreError::Unsupported("lookup"))
    ));
    assert!(matches!(
        layer.forget(&query("k")).await,
        Err(StoreError::Unsupported("forget"))
    ));
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    fn backend(store: tower_idempotency::PgStore) -> Backend<tower_idempotency::PgStore> {
        Backend {
            store,
            entries: Box::new(|| unreachable!("not counted")),
            _redis: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_inspect_reports_each_state() {
        let (store, _schema) = common::postgres::store("operator_inspect").await;
        inspect_reports_each_state(backend(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_forget_lets_a_key_run_again() {
        let (store, _schema) = common::postgres::store("operator_forget").await;
        forget_lets_a_key_run_again(backend(store)).await;
    }
}
