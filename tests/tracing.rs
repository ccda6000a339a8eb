//! The layer's tracing: one span per protected request with its outcome; no keys or bodies.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::post;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

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
    assert!(text.contains("claim_ms="), "{text}");
    assert!(text.contains("handler_ms="), "{text}");
}
