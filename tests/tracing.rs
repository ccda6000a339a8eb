//! The layer's tracing: one span per protected request with its outcome (at DEBUG); no keys or
//! bodies; warnings and errors name their route.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use common::stub::Stub;

/// Records every span field and event field as `name=value` lines.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={}", field.name(), value));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut line = Line(format!("new {}", attrs.metadata().name()));
        attrs.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut line = Line("record".into());
        values.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = Line("event".into());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
}

#[tokio::test]
async fn spans_carry_outcomes_and_never_keys_or_bodies() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));

    let app = Router::new()
        .route(
            "/pay",
            post(|body: String| async move { body.len().to_string() }),
        )
        .route_layer(IdempotencyLayer::new(MemoryStore::new()));
    let send = |key: Option<&str>, body: &'static str| {
        let mut req = Request::post("/pay");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        app.clone().oneshot(req.body(Body::from(body)).unwrap())
    };
    let key = "super-secret-key-123";
    send(Some(key), "secret-body-one").await.unwrap();
    send(Some(key), "secret-body-one").await.unwrap();
    send(Some(key), "secret-body-two").await.unwrap();
    send(None, "secret-body-one").await.unwrap();

    let lines = capture.0.lock().unwrap().clone();
    let text = lines.join("\n");
    let outcomes: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("record outcome="))
        .collect();
    assert_eq!(
        outcomes,
        ["acquired", "replayed", "mismatch", "rejected"],
        "{text}"
    );
    assert!(
        text.contains("new idempotency method=POST route=/pay"),
        "{text}"
    );
    assert!(!text.contains("secret-key"), "a key was logged:\n{text}");
    assert!(!text.contains("secret-body"), "a body was logged:\n{text}");
    // Durations, with their unit (`claim=126.4µs`), not bare floats.
    for phase in ["claim=", "handler="] {
        let value = text
            .split(phase)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {phase} in:\n{text}"));
        assert!(
            value.ends_with("µs") || value.ends_with("ms") || value.ends_with("ns"),
            "{phase}{value}"
        );
        assert!(
            value
                .trim_end_matches(char::is_alphabetic)
                .trim_end_matches('µ')
                .parse::<f64>()
                .is_ok(),
            "{phase}{value}"
        );
    }
}

/// With the usual production filter (INFO), the per-request span is off, and the layer's errors
/// still say which route they are about.
#[tokio::test]
async fn at_info_no_span_and_errors_name_their_route() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(capture.clone().with_filter(LevelFilter::INFO)),
    );
    let app = Router::new()
        .route("/orders/{id}/pay", post(|| async { "paid" }))
        .route_layer(IdempotencyLayer::new(Stub::down()));
    let req = Request::post("/orders/42/pay")
        .header("idempotency-key", "k-1")
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    let text = capture.0.lock().unwrap().join("\n");
    assert!(!text.contains("new idempotency"), "span at INFO:\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with("event")
            && l.contains("route=/orders/{id}/pay")
            && l.contains("connection refused")),
        "{text}"
    );
}
