//! With the `axum` feature, a request that reaches the layer without axum 0.8's `MatchedPath`
//! (an application on another axum version, or a plain Tower service) is scoped by its raw
//! path, and the layer says so once per process. In a binary of its own: the warning's "once"
//! is process-wide.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use axum::routing::post;
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// The messages of the `WARN` events.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl<S: Subscriber> Layer<S> for Warnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
}

impl Warnings {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn post_with_key(path: &str, key: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .body(Body::from("10 EUR"))
        .unwrap()
}

#[tokio::test]
async fn scoping_by_path_is_warned_about_once() {
    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));

    // axum 0.8 with `route_layer`: the matched route, no warning.
    let app = Router::new()
        .route("/orders/{id}/pay", post(|| async { "paid" }))
        .route_layer(IdempotencyLayer::new(MemoryStore::new()));
    let response = app
        .oneshot(post_with_key("/orders/1/pay", "a"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // axum 0.8 with `Router::layer`: a request no route matched reaches the layer without a
    // matched route by design; the router's 404 is not the handler's answer, no warning.
    let app = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let response = app.oneshot(post_with_key("/nowhere", "b")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(warnings.taken(), Vec::<String>::new());

    // A plain Tower service: scoped by path, which the layer warns about once, for the first
    // answer of a handler, however many follow.
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        });
    for key in ["c", "d", "d", "e"] {
        let request = Request::post("/plain/pay")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"10 EUR")))
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let warned = warnings.taken();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    for words in [
        "scoped by the raw request path",
        "MatchedPath",
        "Router::route_layer",
        "axum 0.8",
        "path=\"/plain/pay\"",
    ] {
        assert!(warned[0].contains(words), "{words:?} not in {}", warned[0]);
    }
}
