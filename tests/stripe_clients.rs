//! A Stripe-like `POST /v1/charges` built on the layer, with its rejections rendered as Stripe
//! answers them (`Rejection::to_stripe_response`): the statuses, error types and retry hints
//! Stripe's SDKs turn into `IdempotencyError`, `InvalidRequestError` and network retries.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::routing::post;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, Rejection};

use common::stub::Stub;

/// The handler's runs, and a gate that holds the runs whose body asks for it.
#[derive(Default)]
struct Charges {
    runs: AtomicUsize,
    entered: Notify,
    release: Notify,
}

fn api<St: IdempotencyStore>(store: St, charges: &Arc<Charges>) -> Router {
    let charges = charges.clone();
    Router::new()
        .route(
            "/v1/charges",
            post(move |body: Bytes| {
                let charges = charges.clone();
                async move {
                    let n = charges.runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if body.ends_with(b"&hold=true") {
                        charges.entered.notify_one();
                        charges.release.notified().await;
                    }
                    let charge = serde_json::json!({ "id": format!("ch_{n}"), "object": "charge" });
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        charge.to_string(),
                    )
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store).rejection_with(Rejection::to_stripe_response))
}

/// A charge as stripe-python sends it: form-encoded, the key in `Idempotency-Key`.
fn charge(key: Option<&str>, form: &'static str) -> Request<Body> {
    let mut request = Request::post("/v1/charges")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(form)).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, serde_json::Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&body)));
    (parts.status, parts.headers, json)
}

/// Asserts a Stripe error: its status, `error.type`, and `Stripe-Should-Retry`.
fn assert_stripe_error(
    (status, headers, json): &(StatusCode, HeaderMap, serde_json::Value),
    expected_status: StatusCode,
    error_type: &str,
    should_retry: &str,
) {
    assert_eq!(*status, expected_status, "{json}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(json["error"]["type"], error_type, "{json}");
    assert!(json["error"]["message"].is_string(), "{json}");
    assert_eq!(headers["stripe-should-retry"], should_retry, "{json}");
}

#[tokio::test]
async fn a_stripe_like_api_answers_as_stripe_does() {
    let charges = Arc::new(Charges::default());
    let app = api(MemoryStore::new(), &charges);
    let form = "amount=2000&currency=eur&source=tok_visa";

    let (status, headers, json) = send(&app, charge(Some("k-1"), form)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["id"], "ch_1");
    assert!(headers.get("idempotent-replayed").is_none());

    // The SDK's network retry: the stored charge, as Stripe replays it.
    let (status, headers, json) = send(&app, charge(Some("k-1"), form)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["id"], "ch_1");
    assert_eq!(headers["idempotent-replayed"], "true");

    // The key reused with other parameters: Stripe's 400 `idempotency_error` (not the 422
    // problem+json), which the SDKs raise as `IdempotencyError`.
    let reused = send(&app, charge(Some("k-1"), "amount=5000&currency=eur")).await;
    assert_stripe_error(
        &reused,
        StatusCode::BAD_REQUEST,
        "idempotency_error",
        "false",
    );
    assert!(reused.1.get(header::RETRY_AFTER).is_none());

    // No key: an invalid request, not worth retrying as it is.
    let missing = send(&app, charge(None, form)).await;
    assert_stripe_error(
        &missing,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "false",
    );
    assert_eq!(charges.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_duplicate_in_flight_is_a_409_the_sdks_retry() {
    let charges = Arc::new(Charges::default());
    let app = api(MemoryStore::new(), &charges);
    let form = "amount=2000&currency=eur&hold=true";

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, charge(Some("k-2"), form)).await }
    });
    charges.entered.notified().await;

    let in_flight = send(&app, charge(Some("k-2"), form)).await;
    assert_stripe_error(
        &in_flight,
        StatusCode::CONFLICT,
        "idempotency_error",
        "true",
    );
    assert_eq!(in_flight.2["error"]["code"], "idempotency_key_in_use");
    assert!(in_flight.1.contains_key(header::RETRY_AFTER));

    charges.release.notify_one();
    let (status, _, json) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["id"], "ch_1");

    // The SDK's retry after `Retry-After`: the original's charge.
    let (status, headers, json) = send(&app, charge(Some("k-2"), form)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["id"], "ch_1");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(charges.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_store_outage_is_a_503_api_error_to_retry() {
    let charges = Arc::new(Charges::default());
    let app = api(Stub::down(), &charges);
    let down = send(&app, charge(Some("k-3"), "amount=2000&currency=eur")).await;
    assert_stripe_error(&down, StatusCode::SERVICE_UNAVAILABLE, "api_error", "true");
    assert_eq!(down.1[header::RETRY_AFTER], "1");
    assert_eq!(charges.runs.load(Ordering::SeqCst), 0);
}
