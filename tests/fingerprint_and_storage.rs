//! What is compared (`fingerprint_with`), what is kept (`StorePolicy`) and who may present a
//! key (`min_key_len`), through an axum router, on the memory store, Redis and Postgres.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::{Notify, Semaphore};
use tower_idempotency::{FingerprintSpec, IdempotencyLayer, IdempotencyStore, StorePolicy};

use common::backend::{Backend, Reply, send};

both_stores!(
    json_fields_accept_a_retry_whose_other_fields_changed,
    ignored_json_fields_may_change_but_the_rest_may_not,
    a_body_that_is_not_json_is_compared_whole,
    body_only_ignores_the_query,
    custom_fingerprint_compares_what_it_returns,
    the_default_fingerprint_still_refuses_a_changed_body,
    status_and_headers_replays_without_the_body,
    status_and_headers_as_a_response_part,
    processed_only_replays_the_status_alone,
    do_not_store_releases_the_key,
    explicit_full_is_the_default,
    in_flight_duplicates_get_409_then_what_the_policy_says,
    waiting_duplicates_get_what_the_policy_says,
    a_policy_never_keeps_more_than_the_settings,
    the_policy_extension_is_removed_before_answering,
    short_keys_are_refused_and_leave_no_trace,
    min_key_len_applies_to_keys_read_from_the_body,
);

#[cfg(feature = "postgres")]
mod postgres_store {
    use super::common::backend::Backend;

    macro_rules! on_postgres {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _schema) = super::common::postgres::store(stringify!($name)).await;
                    let backend = Backend {
                        store,
                        entries: Box::new(|| unreachable!("not counted on Postgres")),
                        _redis: None,
                    };
                    super::$name(backend).await;
                }
            )*
        };
    }

    on_postgres!(
        json_fields_accept_a_retry_whose_other_fields_changed,
        ignored_json_fields_may_change_but_the_rest_may_not,
        status_and_headers_replays_without_the_body,
        processed_only_replays_the_status_alone,
        do_not_store_releases_the_key,
        in_flight_duplicates_get_409_then_what_the_policy_says,
    );
}

/// The handler: counts its runs, answers `201` with an `x-run` header and a body naming the
/// run, applies the policy named by `x-policy`, and with `x-wait` waits for the gate.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    entered: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl Default for Handler {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            entered: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Handler {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Lets one waiting run answer.
    fn open(&self) {
        self.gate.add_permits(1);
    }
}

fn policy_named(name: &str) -> StorePolicy {
    match name {
        "full" => StorePolicy::Full,
        "status-and-headers" => StorePolicy::StatusAndHeaders,
        "processed-only" => StorePolicy::ProcessedOnly,
        "do-not-store" => StorePolicy::DoNotStore,
        other => panic!("unknown policy {other}"),
    }
}

async fn handle(State(h): State<Handler>, headers: HeaderMap, _body: Bytes) -> Response {
    let run = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if headers.contains_key("x-wait") {
        h.entered.notify_one();
        h.gate.acquire().await.expect("gate open").forget();
    }
    let status = match headers.get("x-status") {
        Some(s) => StatusCode::from_bytes(s.as_bytes()).unwrap(),
        None => StatusCode::CREATED,
    };
    let mut response = (
        status,
        [("x-run", run.to_string())],
        format!("secret-{run}"),
    )
        .into_response();
    if let Some(name) = headers.get("x-policy") {
        let policy = policy_named(name.to_str().unwrap());
        response.extensions_mut().insert(policy);
    }
    response
}

/// The same, with the policy returned as a response part.
async fn one_time_secret(State(h): State<Handler>) -> impl IntoResponse {
    let run = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        StorePolicy::StatusAndHeaders,
        [("x-run", run.to_string())],
        format!("secret-{run}"),
    )
}

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, h: &Handler) -> Router {
    Router::new()
        .route("/p", post(handle))
        .route("/secret", post(one_time_secret))
        .route_layer(layer)
        .with_state(h.clone())
}

fn req(key: &str, uri: &str, body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::post(uri).header("idempotency-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

/// Asserts `reply` is the handler's own first answer.
fn assert_ran(reply: &Reply, run: usize) {
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert!(!reply.replayed());
    assert_eq!(reply.text(), format!("secret-{run}"));
}

fn assert_key_reused(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    reply.problem();
}

// ---- What is compared ----

async fn json_fields_accept_a_retry_whose_other_fields_changed<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let h = Handler::default();
    let spec = FingerprintSpec::json_fields(["order.id", "amount"]);
    let app = app(IdempotencyLayer::new(b.store).fingerprint_with(spec), &h);
    let first = r#"{"order":{"id":"o1"},"amount":500,"sent_at":"2026-12-06T10:00:00Z"}"#;
    let retry = r#"{"sent_at":"2026-12-06T10:05:00Z","amount":500,"order":{"id":"o1"}}"#;
    assert_ran(&send(&app, req("k", "/p", first, &[])).await, 1);
    let replay = send(&app, req("k", "/p", retry, &[])).await;
    assert!(replay.replayed(), "a genuine retry: {}", replay.text());
    assert_eq!(replay.text(), "secret-1");
    let other = r#"{"order":{"id":"o1"},"amount":900,"sent_at":"2026-12-06T10:00:00Z"}"#;
    assert_key_reused(&send(&app, req("k", "/p", other, &[])).await);
    assert_eq!(h.runs(), 1);
}

async fn ignored_json_fields_may_change_but_the_rest_may_not<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let spec = FingerprintSpec::ignore_json_fields(["sent_at", "meta.trace_id"]);
    let app = app(IdempotencyLayer::new(b.store).fingerprint_with(spec), &h);
    let first = r#"{"sent_at":1,"meta":{"trace_id":"a","source":"web"},"amount":5}"#;
    let retry = r#"{"sent_at":2,"meta":{"trace_id":"b","source":"web"},"amount":5}"#;
    assert_ran(&send(&app, req("k", "/p", first, &[])).await, 1);
    let replay = send(&app, req("k", "/p", retry, &[])).await;
    assert!(replay.replayed(), "{}", replay.text());
    assert_eq!(replay.text(), "secret-1");
    let other = r#"{"sent_at":2,"meta":{"trace_id":"b","source":"app"},"amount":5}"#;
    assert_key_reused(&send(&app, req("k", "/p", other, &[])).await);
    assert_eq!(h.runs(), 1);
}

async fn a_body_that_is_not_json_is_compared_whole<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let spec = FingerprintSpec::json_fields(["id"]);
    let app = app(IdempotencyLayer::new(b.store).fingerprint_with(spec), &h);
    // Not refused for not being JSON: compared byte for byte.
    assert_ran(&send(&app, req("k", "/p", "id=1&t=1", &[])).await, 1);
    let replay = send(&app, req("k", "/p", "id=1&t=1", &[])).await;
    assert!(replay.replayed());
    assert_key_reused(&send(&app, req("k", "/p", "id=1&t=2", &[])).await);
    assert_eq!(h.runs(), 1);
}

async fn body_only_ignores_the_query<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let layer = IdempotencyLayer::new(b.store);
    let narrow = app(
        layer.clone().fingerprint_with(FingerprintSpec::body_only()),
        &h,
    );
    assert_ran(&send(&narrow, req("k", "/p?ts=1", "b", &[])).await, 1);
    let replay = send(&narrow, req("k", "/p?ts=2", "b", &[])).await;
    assert!(replay.replayed(), "{}", replay.text());
    assert_key_reused(&send(&narrow, req("k", "/p?ts=2", "c", &[])).await);
    // The default compares the query: the same pair of requests is a reused key.
    let default = app(layer, &h);
    assert_ran(&send(&default, req("d", "/p?ts=1", "b", &[])).await, 2);
    assert_key_reused(&send(&default, req("d", "/p?ts=2", "b", &[])).await);
    assert_eq!(h.runs(), 2);
}

async fn custom_fingerprint_compares_what_it_returns<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    // The `x-account` header and the body; the query is left out.
    let spec = FingerprintSpec::custom(|parts, body| {
        let account = parts
            .headers
            .get("x-account")
            .map(|v| v.as_bytes().to_vec());
        [account.unwrap_or_default().as_slice(), b"\n", body].concat()
    });
    let app = app(IdempotencyLayer::new(b.store).fingerprint_with(spec), &h);
    assert_ran(
        &send(&app, req("k", "/p?a=1", "b", &[("x-account", "acct_1")])).await,
        1,
    );
    let replay = send(&app, req("k", "/p?a=2", "b", &[("x-account", "acct_1")])).await;
    assert!(replay.replayed(), "{}", replay.text());
    let other = req("k", "/p?a=1", "b", &[("x-account", "acct_2")]);
    assert_key_reused(&send(&app, other).await);
    assert_eq!(h.runs(), 1);
}

async fn the_default_fingerprint_still_refuses_a_changed_body<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    assert_ran(
        &send(&app, req("k", "/p", r#"{"id":1,"sent_at":1}"#, &[])).await,
        1,
    );
    assert_key_reused(&send(&app, req("k", "/p", r#"{"id":1,"sent_at":2}"#, &[])).await);
    assert_eq!(h.runs(), 1);
}

// ---- What is kept ----

async fn status_and_headers_replays_without_the_body<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    let policy = [("x-policy", "status-and-headers")];
    let first = send(&app, req("k", "/p", "b", &policy)).await;
    assert_ran(&first, 1);
    for _ in 0..2 {
        let replay = send(&app, req("k", "/p", "b", &policy)).await;
        assert_eq!(replay.status, StatusCode::CREATED);
        assert!(replay.replayed());
        assert_eq!(replay.headers["x-run"], "1", "headers are kept");
        assert!(
            replay.body.is_empty(),
            "the secret was replayed: {}",
            replay.text()
        );
        assert_ne!(
            replay
                .headers
                .get(header::CONTENT_LENGTH)
                .map(|v| v.as_bytes()),
            Some(&b"8"[..]),
            "the original length is not replayed"
        );
    }
    assert_eq!(h.runs(), 1);
}

async fn status_and_headers_as_a_response_part<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    assert_ran(&send(&app, req("k", "/secret", "", &[])).await, 1);
    let replay = send(&app, req("k", "/secret", "", &[])).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(replay.headers["x-run"], "1");
    assert!(replay.body.is_empty(), "{}", replay.text());
    assert_eq!(h.runs(), 1);
}

async fn processed_only_replays_the_status_alone<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    let policy = [("x-policy", "processed-only")];
    let first = send(&app, req("k", "/p", "b", &policy)).await;
    assert_ran(&first, 1);
    assert_eq!(
        first.headers["x-run"], "1",
        "the first caller gets everything"
    );
    let replay = send(&app, req("k", "/p", "b", &policy)).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert!(
        !replay.headers.contains_key("x-run"),
        "headers are not kept"
    );
    assert!(replay.body.is_empty(), "{}", replay.text());
    // Still a key: a different request with it is refused.
    assert_key_reused(&send(&app, req("k", "/p", "other", &policy)).await);
    assert_eq!(h.runs(), 1);
}

async fn do_not_store_releases_the_key<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    let policy = [("x-policy", "do-not-store")];
    assert_ran(&send(&app, req("k", "/p", "b", &policy)).await, 1);
    // The retry runs the handler again, and may even carry another body: nothing was kept.
    assert_ran(&send(&app, req("k", "/p", "b", &policy)).await, 2);
    assert_ran(&send(&app, req("k", "/p", "other", &[])).await, 3);
    let replay = send(&app, req("k", "/p", "other", &[])).await;
    assert!(replay.replayed(), "the default policy stores again");
    assert_eq!(replay.text(), "secret-3");
    assert_eq!(h.runs(), 3);
}

async fn explicit_full_is_the_default<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    let policy = [("x-policy", "full")];
    let first = send(&app, req("k", "/p", "b", &policy)).await;
    assert_ran(&first, 1);
    let replay = send(&app, req("k", "/p", "b", &policy)).await;
    assert!(replay.replayed());
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers["x-run"], "1");
    assert_eq!(h.runs(), 1);
}

async fn in_flight_duplicates_get_409_then_what_the_policy_says<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let h = Handler::default();
    let app = app(IdempotencyLayer::new(b.store), &h);
    let cases = [
        ("full", "secret-1"),
        ("status-and-headers", ""),
        ("processed-only", ""),
        ("do-not-store", "run again"),
    ];
    for (i, (policy, after)) in cases.into_iter().enumerate() {
        let key = format!("key-{policy}");
        let runs = h.runs();
        let first = tokio::spawn({
            let app = app.clone();
            let req = req(&key, "/p", "b", &[("x-policy", policy), ("x-wait", "1")]);
            async move { send(&app, req).await }
        });
        h.entered.notified().await;
        let duplicate = send(&app, req(&key, "/p", "b", &[("x-policy", policy)])).await;
        assert_eq!(
            duplicate.status,
            StatusCode::CONFLICT,
            "{policy}: {}",
            duplicate.text()
        );
        duplicate.problem();
        h.open();
        let first = first.await.unwrap();
        assert_ran(&first, runs + 1);
        let later = send(&app, req(&key, "/p", "b", &[("x-policy", policy)])).await;
        assert_eq!(later.status, StatusCode::CREATED, "{policy}");
        if after == "run again" {
            assert!(!later.replayed(), "{policy}");
            assert_eq!(later.text(), format!("secret-{}", runs + 2));
        } else {
            assert!(later.replayed(), "{policy}");
            let expected = after.replace("1", &(runs + 1).to_string());
            assert_eq!(later.text(), expected, "{policy} (case {i})");
        }
    }
    assert_eq!(h.runs(), 5, "each case ran once, do-not-store twice");
}

/// In wait mode (the webhook presets' default), a duplicate that arrives while the handler runs
/// waits, then gets what the policy kept; after `DoNotStore` it runs the handler itself.
async fn waiting_duplicates_get_what_the_policy_says<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let layer =
        IdempotencyLayer::new(b.store).wait_for_in_flight(std::time::Duration::from_secs(9));
    let app = app(layer, &h);
    for policy in ["processed-only", "do-not-store"] {
        let key = format!("key-{policy}");
        let runs = h.runs();
        let first = tokio::spawn({
            let app = app.clone();
            let req = req(&key, "/p", "b", &[("x-policy", policy), ("x-wait", "1")]);
            async move { send(&app, req).await }
        });
        h.entered.notified().await;
        let duplicate = tokio::spawn({
            let app = app.clone();
            let req = req(&key, "/p", "b", &[("x-policy", policy)]);
            async move { send(&app, req).await }
        });
        h.open();
        assert_ran(&first.await.unwrap(), runs + 1);
        let duplicate = duplicate.await.unwrap();
        assert_eq!(
            duplicate.status,
            StatusCode::CREATED,
            "{policy}: {}",
            duplicate.text()
        );
        if policy == "do-not-store" {
            assert!(!duplicate.replayed());
            assert_eq!(duplicate.text(), format!("secret-{}", runs + 2));
        } else {
            assert!(duplicate.replayed());
            assert!(duplicate.body.is_empty(), "{}", duplicate.text());
        }
    }
    assert_eq!(h.runs(), 3);
}

async fn a_policy_never_keeps_more_than_the_settings<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let layer = IdempotencyLayer::new(b.store);
    // A 5xx is not stored, whatever the policy asks.
    let app1 = app(layer.clone(), &h);
    let failing = [("x-policy", "processed-only"), ("x-status", "502")];
    for run in 1..=2 {
        let reply = send(&app1, req("k5", "/p", "b", &failing)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert!(!reply.replayed());
        assert_eq!(reply.text(), format!("secret-{run}"));
    }
    // `status_only` wins over keeping the headers.
    let app2 = app(layer.status_only(true), &h);
    let policy = [("x-policy", "status-and-headers")];
    assert_ran(&send(&app2, req("ks", "/p", "b", &policy)).await, 3);
    let replay = send(&app2, req("ks", "/p", "b", &policy)).await;
    assert!(replay.replayed());
    assert!(!replay.headers.contains_key("x-run"));
    assert!(replay.body.is_empty());
    assert_eq!(h.runs(), 3);
}

async fn the_policy_extension_is_removed_before_answering<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let probe = seen.clone();
    let app = app(IdempotencyLayer::new(b.store), &h).layer(axum::middleware::map_response(
        move |response: Response| {
            let probe = probe.clone();
            async move {
                if response.extensions().get::<StorePolicy>().is_some() {
                    probe.fetch_add(1, Ordering::SeqCst);
                }
                response
            }
        },
    ));
    for policy in [
        "full",
        "status-and-headers",
        "processed-only",
        "do-not-store",
    ] {
        let reply = send(&app, req(policy, "/p", "b", &[("x-policy", policy)])).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    assert_eq!(h.runs(), 4);
    assert_eq!(seen.load(Ordering::SeqCst), 0, "a policy left the layer");
}

// ---- Who can read it ----

async fn short_keys_are_refused_and_leave_no_trace<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let layer = IdempotencyLayer::new(b.store);
    let strict = app(layer.clone().min_key_len(16), &h);
    let reply = send(&strict, req("guessable", "/p", "b", &[])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let problem = reply.problem();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("16 characters"),
        "{problem}"
    );
    assert_eq!(h.runs(), 0);
    assert_eq!((b.entries)(), 0, "the refused key left an entry");
    // Long enough: protected as usual.
    let uuid = "0b8e6f52-4c1e-4f0a-9d55-1f8f3c2b7a10";
    assert_ran(&send(&strict, req(uuid, "/p", "b", &[])).await, 1);
    assert!(send(&strict, req(uuid, "/p", "b", &[])).await.replayed());
    // Off by default; and the refused key was never claimed: it runs now.
    let lax = app(layer, &h);
    assert_ran(&send(&lax, req("guessable", "/p", "b", &[])).await, 2);
    assert_ran(&send(&lax, req("x", "/p", "b", &[])).await, 3);
}

async fn min_key_len_applies_to_keys_read_from_the_body<St: IdempotencyStore>(b: Backend<St>) {
    let h = Handler::default();
    let app = app(
        IdempotencyLayer::stripe_webhooks(b.store).min_key_len(8),
        &h,
    );
    let event = |id: &str| {
        Request::post("/p")
            .body(Body::from(format!(
                r#"{{"id":"{id}","type":"charge.succeeded"}}"#
            )))
            .unwrap()
    };
    let reply = send(&app, event("evt_1")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    reply.problem();
    assert_eq!((b.entries)(), 0);
    assert_ran(&send(&app, event("evt_1NqZb2")).await, 1);
    assert!(send(&app, event("evt_1NqZb2")).await.replayed());
    assert_eq!(h.runs(), 1);
}
