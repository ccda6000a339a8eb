//! Webhook presets against requests shaped like each provider's documented deliveries, on both
//! stores: first delivery, duplicate, in-flight duplicate (wait mode).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore};

use common::{TestRedis, unique_prefix};

type Preset<St> = fn(St) -> IdempotencyLayer<St>;

/// A delivery as the provider sends it: headers and a body, for a given delivery/event id.
type Delivery = fn(&str) -> Request<Body>;

fn standard_webhooks(id: &str) -> Request<Body> {
    let body = r#"{"type":"invoice.paid","timestamp":"2026-11-24T10:00:00Z","data":{"invoice_id":"inv_1","amount":1000}}"#;
    Request::post("/hook")
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", "1795000000")
        .header(
            "webhook-signature",
            "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
        )
        .body(Body::from(body))
        .unwrap()
}

fn svix(id: &str) -> Request<Body> {
    let body = r#"{"type":"user.created","data":{"id":"user_1"}}"#;
    Request::post("/hook")
        .header("content-type", "application/json")
        .header("svix-id", id)
        .header("svix-timestamp", "1795000000")
        .header(
            "svix-signature",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        )
        .body(Body::from(body))
        .unwrap()
}

fn stripe(id: &str) -> Request<Body> {
    let body = format!(
        r#"{{"id":"{id}","object":"event","api_version":"2024-06-20","created":1795000000,"data":{{"object":{{"id":"ch_3Mtw","object":"charge","amount":2000,"currency":"usd","status":"succeeded"}}}},"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},"type":"charge.succeeded"}}"#
    );
    Request::post("/hook")
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "stripe-signature",
            "t=1795000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
        )
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .body(Body::from(body))
        .unwrap()
}

fn github(id: &str) -> Request<Body> {
    let body = r#"{"action":"opened","issue":{"number":1347,"title":"Found a bug"},"repository":{"full_name":"octocat/Hello-World"}}"#;
    Request::post("/hook")
        .header("content-type", "application/json")
        .header("user-agent", "GitHub-Hookshot/044aadd")
        .header("x-github-event", "issues")
        .header("x-github-delivery", id)
        .header("x-github-hook-id", "292430182")
        .header(
            "x-hub-signature-256",
            "sha256=d57c68ca6f92289e6987922ff26938930f6e66a2d161ef06abdf1859230aa23c",
        )
        .body(Body::from(body))
        .unwrap()
}

fn shopify(id: &str) -> Request<Body> {
    let body = r#"{"id":820982911946154508,"email":"jon@example.com","total_price":"199.00","line_items":[{"sku":"SKU123","quantity":2}]}"#;
    Request::post("/hook")
        .header("content-type", "application/json")
        .header("x-shopify-topic", "orders/create")
        .header(
            "x-shopify-hmac-sha256",
            "XWmrwMey6OsLMeiZKwP4FppHH3cmAiiJJAweH5Jo4bM=",
        )
        .header("x-shopify-shop-domain", "example.myshopify.com")
        .header("x-shopify-api-version", "2026-10")
        .header("x-shopify-webhook-id", format!("wh-{id}"))
        .header("x-shopify-event-id", id)
        .header("x-shopify-triggered-at", "2026-11-24T10:00:00.000000Z")
        .body(Body::from(body))
        .unwrap()
}

fn generic(id: &str) -> Request<Body> {
    Request::post("/hook")
        .header("content-type", "application/json")
        .header("x-idempotency-key", id)
        .body(Body::from(r#"{"event":"ORDER_PAID","order_id":"o-1"}"#))
        .unwrap()
}

fn receiver<St: IdempotencyStore>(layer: IdempotencyLayer<St>, runs: &Arc<AtomicUsize>) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Some(ms) = headers.get("x-test-sleep-ms") {
                        let ms = ms.to_str().unwrap().parse().unwrap();
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    format!("processed #{n} ({} bytes)", body.len())
                }
            }),
        )
        .route_layer(layer)
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, bool, String) {
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

fn slow(mut req: Request<Body>, ms: u64) -> Request<Body> {
    req.headers_mut()
        .insert("x-test-sleep-ms", ms.to_string().parse().unwrap());
    req
}

/// First delivery, a retry after completion, and a retry while the first is still running
/// (the preset's wait mode turns it into a replay instead of a 409).
async fn exercise<St: IdempotencyStore>(store: St, preset: Preset<St>, delivery: Delivery) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = receiver(preset(store), &runs);

    let (status, replayed, body) = send(&app, delivery("delivery-1")).await;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{body}");
    let (status, replayed, again) = send(&app, delivery("delivery-1")).await;
    assert_eq!((status, replayed), (StatusCode::OK, true));
    assert_eq!(again, body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A different delivery id is a different event.
    let (status, replayed, _) = send(&app, delivery("delivery-2")).await;
    assert_eq!((status, replayed), (StatusCode::OK, false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // In flight: the duplicate waits for the original and replays it.
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, slow(delivery("delivery-3"), 500)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, replayed, dup_body) = send(&app, slow(delivery("delivery-3"), 500)).await;
    let (first_status, _, first_body) = first.await.unwrap();
    assert_eq!(first_status, StatusCode::OK);
    assert_eq!((status, replayed), (StatusCode::OK, true), "{dup_body}");
    assert_eq!(dup_body, first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

macro_rules! presets {
    ($($name:ident: $preset:ident, $delivery:ident;)*) => {
        mod memory_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    exercise(MemoryStore::new(), IdempotencyLayer::$preset, $delivery).await;
                }
            )*
        }
        mod redis_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let redis = TestRedis::get();
                    let store = RedisStore::new(redis.client())
                        .await
                        .unwrap()
                        .key_prefix(unique_prefix(stringify!($name)));
                    exercise(store, IdempotencyLayer::$preset, $delivery).await;
                }
            )*
        }
    };
}

presets! {
    standard_webhooks_preset: standard_webhooks, standard_webhooks;
    svix_headers_through_the_standard_preset: standard_webhooks, svix;
    stripe_preset: stripe_webhooks, stripe;
    github_preset: github_webhooks, github;
    shopify_preset: shopify_webhooks, shopify;
    generic_preset: generic_webhooks, generic;
}

#[tokio::test]
async fn shopify_retries_are_recognised_by_event_id() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = receiver(
        IdempotencyLayer::shopify_webhooks(MemoryStore::new()),
        &runs,
    );
    send(&app, shopify("evt-9")).await;
    // Same event, another delivery id (a second subscription, or a redelivery).
    let mut again = shopify("evt-9");
    again
        .headers_mut()
        .insert("x-shopify-webhook-id", "another".parse().unwrap());
    let (_, replayed, _) = send(&app, again).await;
    assert!(replayed);
    // An older API version without the event id: the webhook id is the key.
    let mut legacy = shopify("evt-10");
    legacy.headers_mut().remove("x-shopify-event-id");
    send(&app, legacy).await;
    let mut legacy = shopify("evt-10");
    legacy.headers_mut().remove("x-shopify-event-id");
    let (_, replayed, _) = send(&app, legacy).await;
    assert!(replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stripe_event_without_id_or_not_json_is_rejected() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = receiver(IdempotencyLayer::stripe_webhooks(MemoryStore::new()), &runs);
    let no_id = Request::post("/hook")
        .body(Body::from(r#"{"object":"event"}"#))
        .unwrap();
    let (status, _, body) = send(&app, no_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("`id`"), "{body}");
    let not_json = Request::post("/hook").body(Body::from("id=evt_1")).unwrap();
    assert_eq!(send(&app, not_json).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn presets_do_not_share_ids_across_providers() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let github_app = receiver(IdempotencyLayer::github_webhooks(store.clone()), &runs);
    let generic_app = receiver(IdempotencyLayer::generic_webhooks(store), &runs);
    let id = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
    let (_, replayed_a, _) = send(&github_app, github(id)).await;
    let (_, replayed_b, _) = send(&generic_app, generic(id)).await;
    assert!(!replayed_a && !replayed_b);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The seed's ORDER_PAID scenario through the Standard Webhooks preset: a sender that retries
/// (sequentially and concurrently) decrements stock once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_paid_through_standard_webhooks_decrements_stock_once() {
    let redis = TestRedis::get();
    let store = RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(unique_prefix("order_paid"));
    let stock = Arc::new(Mutex::new(HashMap::from([("SKU123", 100i64)])));
    let app = Router::new()
        .route(
            "/webhooks/order-paid",
            post({
                let stock = stock.clone();
                move |body: String| {
                    let stock = stock.clone();
                    async move {
                        let order: serde_json::Value = serde_json::from_str(&body).unwrap();
                        let qty = order["data"]["qty"].as_i64().unwrap();
                        // Slow downstream work before the stock changes.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let mut stock = stock.lock().unwrap();
                        let left = stock.get_mut("SKU123").unwrap();
                        *left -= qty;
                        format!("{{\"SKU123\":{left}}}")
                    }
                }
            }),
        )
        .route_layer(IdempotencyLayer::standard_webhooks(store));
    let delivery = || {
        Request::post("/webhooks/order-paid")
            .header("webhook-id", "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")
            .header("webhook-timestamp", "1795000000")
            .header("webhook-signature", "v1,unused-in-this-test")
            .body(Body::from(
                r#"{"type":"ORDER_PAID","data":{"order_id":"o-1","sku":"SKU123","qty":2}}"#,
            ))
            .unwrap()
    };
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = app.clone();
        let req = delivery();
        tasks.push(tokio::spawn(async move { send(&app, req).await }));
    }
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "{\"SKU123\":98}");
    }
    let (_, replayed, body) = send(&app, delivery()).await;
    assert!(replayed);
    assert_eq!(body, "{\"SKU123\":98}");
    assert_eq!(stock.lock().unwrap()["SKU123"], 98);
}
