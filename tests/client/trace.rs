//! One `idempotent_request` span per logical request, its attempts as events inside it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tower::ServiceExt;
use tower_idempotency::client::IdempotentClientLayer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::waits::Scripted;

/// Every new span, span record and event, as `what name field=value ...` lines; an event names
/// the span it is in.
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

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut line = Line(format!("new {}", attrs.metadata().name()));
        attrs.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let name = ctx.span(id).map_or("?", |s| s.name());
        let mut line = Line(format!("record {name}"));
        values.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let span = ctx.event_span(event).map_or("none", |s| s.name());
        let mut line = Line(format!("event {span}"));
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
}

#[tokio::test(start_paused = true)]
async fn one_span_per_request_with_its_attempts() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let scripted = Scripted::new(&[(503, Some("1")), (500, None), (200, None)]);
    let layer = IdempotentClientLayer::new().initial_backoff(Duration::from_millis(10));
    let client = tower::ServiceBuilder::new()
        .layer(layer)
        .service(scripted.service());
    let req = Request::post("http://stub/orders?token=secret")
        .body(Full::<Bytes>::from("order"))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let key = scripted.seen.lock().unwrap()[0].0.clone().unwrap();

    let lines = capture.0.lock().unwrap().clone();
    let spans: Vec<_> = lines.iter().filter(|l| l.starts_with("new ")).collect();
    assert_eq!(spans.len(), 1, "{lines:#?}");
    let span = spans[0];
    assert!(span.starts_with("new idempotent_request"), "{span}");
    assert!(span.contains(" method=POST"), "{span}");
    assert!(span.contains(" uri=http://stub/orders"), "{span}");
    assert!(!span.contains("secret"), "the query is left out: {span}");
    assert!(
        lines.contains(&format!("record idempotent_request key={key}")),
        "{lines:#?}"
    );
    let sending = lines
        .iter()
        .filter(|l| l.starts_with("event idempotent_request") && l.contains("sending"))
        .count();
    assert_eq!(sending, 3, "{lines:#?}");
    let retries = lines
        .iter()
        .filter(|l| l.starts_with("event idempotent_request") && l.contains("retrying"))
        .count();
    assert_eq!(retries, 2, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("record idempotent_request") && l.contains("attempts=3")),
        "{lines:#?}"
    );
}
