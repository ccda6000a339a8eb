//! With no `tracing` subscriber, `tracing`'s `log` feature (on in this build through axum's
//! default `tower-log`) turns the layer's span into `log` records: a `log` logger at `DEBUG`
//! still sees the request's span, and never its key or body. In a binary of its own: the logger
//! is process-wide, and any `tracing` subscriber set in the process would turn the records off.

use std::sync::Mutex;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Debug
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = format!("{} {}", record.target(), record.args());
            self.0.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

static LOGGER: Capture = Capture(Mutex::new(Vec::new()));

#[tokio::test]
async fn a_log_logger_at_debug_sees_the_span_without_a_subscriber() {
    log::set_logger(&LOGGER).expect("the only logger in this binary");
    log::set_max_level(log::LevelFilter::Debug);
    assert!(
        !tracing::dispatcher::has_been_set(),
        "no tracing subscriber may be set in this binary"
    );

    let app = Router::new()
        .route("/pay", post(|body: String| async move { body }))
        .route_layer(IdempotencyLayer::new(MemoryStore::new()));
    let req = Request::post("/pay")
        .header("idempotency-key", "log-secret-key-1")
        .body(Body::from("log-secret-body"))
        .unwrap();
    let response = app.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let text = LOGGER.0.lock().unwrap().join("\n");
    assert!(
        text.contains("idempotency; method=POST route=\"/pay\""),
        "the request's span is not in the log:\n{text}"
    );
    assert!(
        !text.contains("log-secret-key"),
        "a key was logged:\n{text}"
    );
    assert!(
        !text.contains("log-secret-body"),
        "a body was logged:\n{text}"
    );
}
