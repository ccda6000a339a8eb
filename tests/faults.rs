//! Fault injection against a real, spawned `redis-server`: the server killed and restarted at
//! each step of a request (claim, handler, complete), paused, cut off or stalled behind a TCP
//! proxy; a lease lost to a stalled connection; handlers that fail while the store is
//! unreachable; a storm of duplicates over several instances; stored records corrupted.
//!
//! What the layer promises (README, "Guarantees and limits") and what these tests hold it to:
//!
//! - while a key's claim or record lives in the store, no other request runs its handler, and
//!   a stored response is replayed as stored;
//! - a request the store cannot serve gets `503` within the store timeout, never hangs, and
//!   does not run the handler (fail-closed); the layer reconnects by itself;
//! - completes, renewals and releases are fenced: an attempt that lost its claim never
//!   overwrites the entry of the attempt that took over.
//!
//! And what it does not promise, which the tests state as such: a store that loses a write (a
//! restarted server without persistence, a failover) loses the claim or record it held, so a
//! retry runs again; a response that could not be stored within half the lease (the layer
//! tries again until then) leaves the claim to lapse, and the retry after the lease runs again.
//!
//! Servers come in two kinds (see `common`): `RedisServer::spawn()` keeps nothing across a
//! restart, `RedisServer::spawn_durable()` fsyncs every write before answering it, so whatever
//! Redis acknowledged survives a SIGKILL. Every test that stops, pauses or cuts Redis owns its
//! server; the corrupted-record tests use `TestRedis` (`REDIS_URL` when set) under a unique key
//! prefix. No test flushes anything.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::BodyExt;
use tokio::sync::{RwLock, watch};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, IdempotencyStore, RedisStore};

use common::{ProxyMode, RedisServer, TcpProxy, TestRedis, bounded, unique_prefix};

/// The store timeout of the layers here, unless a test sets another.
const STORE_TIMEOUT: Duration = Duration::from_millis(400);

/// How long a request the store cannot serve may take to get its `503`: the store timeout plus
/// room for a loaded two-core machine running tests in parallel.
const FAST_503: Duration = Duration::from_millis(400 + 800);

/// Upper bound for the layer to find a restarted or reachable-again server by itself.
const RECOVERY: Duration = Duration::from_secs(15);

/// The storm holds this exclusively; the timing-sensitive tests hold it shared, so their time
/// bounds are not measured on a machine the storm saturates.
static CPU: RwLock<()> = RwLock::const_new(());

// ---------------------------------------------------------------------------------------------
// The application under test.
// ---------------------------------------------------------------------------------------------

/// A point in a handler where the test holds it until it says go.
struct Gate {
    entered: watch::Sender<usize>,
    open: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Self {
        Self {
            entered: watch::Sender::new(0),
            open: watch::Sender::new(false),
        }
    }

    /// Called by the handler: counts itself in and waits until the gate opens.
    async fn pass(&self) {
        self.entered.send_modify(|n| *n += 1);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
    }

    /// Waits until `n` handlers reached the gate.
    async fn entered(&self, n: usize) {
        let mut rx = self.entered.subscribe();
        bounded(
            Duration::from_secs(10),
            "handler reaching its gate",
            async {
                let _ = rx.wait_for(|count| *count >= n).await;
            },
        )
        .await;
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// The handler's side effects: executions per key, and the gates.
#[derive(Clone, Default)]
struct Shop {
    runs: Arc<Mutex<HashMap<String, usize>>>,
    gates: Arc<Mutex<HashMap<String, Arc<Gate>>>>,
}

impl Shop {
    fn runs(&self, key: &str) -> usize {
        self.runs.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn gate(&self, name: &str) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Gate::new()))
            .clone()
    }
}

/// `POST /pay`: counts the execution, then (by request headers) waits at a gate, panics,
/// answers with another status, or pads its answer to a larger size. Answers `run N of KEY: BODY`, so every execution is told apart.
fn shop_app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, shop: &Shop) -> Router {
    let shop = shop.clone();
    let pay = move |key: IdempotencyKey, headers: HeaderMap, body: Bytes| {
        let shop = shop.clone();
        async move {
            let n = {
                let mut runs = shop.runs.lock().unwrap();
                let n = runs.entry(key.as_str().to_owned()).or_insert(0);
                *n += 1;
                *n
            };
            if let Some(gate) = headers.get("x-gate") {
                shop.gate(gate.to_str().unwrap()).pass().await;
            }
            if headers.contains_key("x-panic") {
                panic!("handler panic for the test");
            }
            let status = headers
                .get("x-status")
                .map_or(StatusCode::OK, |s| s.to_str().unwrap().parse().unwrap());
            let mut text = format!(
                "run {n} of {}: {}",
                key.as_str(),
                String::from_utf8_lossy(&body)
            );
            if let Some(size) = headers.get("x-pad") {
                let size: usize = size.to_str().unwrap().parse().unwrap();
                text.push_str(&".".repeat(size));
            }
            (status, text).into_response()
        }
    };
    Router::new().route("/pay", post(pay)).route_layer(layer)
}

fn layer<St>(store: St, lease: Duration) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store)
        .lease_ttl(lease)
        .store_timeout(STORE_TIMEOUT)
}

fn pay(key: &str) -> Request<Body> {
    pay_with(key, &[])
}

fn pay_with(key: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::post("/pay").header("idempotency-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Body::from("10 EUR")).unwrap()
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    took: Duration,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn problem_type(&self) -> String {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{self:?}"
        );
        let json: serde_json::Value = serde_json::from_str(&self.text).unwrap();
        assert_eq!(json["status"], self.status.as_u16(), "{self:?}");
        json["type"].as_str().unwrap().to_owned()
    }

    /// Asserts a fail-closed answer: `503` problem+json with `Retry-After`, in time.
    fn assert_fast_503(&self, what: &str) {
        assert_eq!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {self:?}"
        );
        assert!(
            self.problem_type().ends_with("StoreUnavailable"),
            "{what}: {self:?}"
        );
        assert!(self.headers.contains_key(header::RETRY_AFTER), "{what}");
        assert!(
            self.took < FAST_503,
            "{what}: the 503 took {:?} (store timeout {STORE_TIMEOUT:?})",
            self.took
        );
    }

    /// Asserts a replay of `original`.
    fn assert_replay_of(&self, original: &str, what: &str) {
        assert_eq!(self.status, StatusCode::OK, "{what}: {self:?}");
        assert!(self.replayed(), "{what}: not a replay: {self:?}");
        assert_eq!(self.text, original, "{what}");
    }
}

async fn send<S>(app: &S, req: Request<Body>) -> Reply
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send,
    S::Future: Send,
{
    let started = Instant::now();
    let response = bounded(
        Duration::from_secs(20),
        "a request",
        app.clone().oneshot(req),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        text: String::from_utf8_lossy(&body).into_owned(),
        took,
    }
}

/// Sends fresh probe keys until one is served: the layer found the store again by itself.
async fn until_recovered(app: &Router, what: &str) {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let started = Instant::now();
    loop {
        let key = format!("probe-{}", PROBES.fetch_add(1, Ordering::Relaxed));
        let reply = send(app, pay(&key)).await;
        if reply.status == StatusCode::OK {
            return;
        }
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {reply:?}"
        );
        assert!(
            started.elapsed() < RECOVERY,
            "{what}: the layer did not recover within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries `key` like a client would until it gets an answer other than `409`/`503`; returns
/// the statuses seen before it and that answer.
async fn retry_until_served(app: &Router, key: &str) -> (Vec<StatusCode>, Reply) {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let reply = send(app, pay(key)).await;
        match reply.status {
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => seen.push(reply.status),
            _ => return (seen, reply),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{key}: still refused after {:?}: {seen:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Looking at Redis directly (never through the proxy).
// ---------------------------------------------------------------------------------------------

async fn direct(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    bounded(
        Duration::from_secs(5),
        "connect to redis",
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap()
}

/// Every entry under `prefix`, with its raw value.
async fn entries(url: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = direct(url).await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = Vec::new();
    for key in keys {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(value) = value {
            out.push((key, value));
        }
    }
    out
}

/// Running claims (`[version, 'R', ...]`) under `prefix`.
async fn running(url: &str, prefix: &str) -> Vec<String> {
    entries(url, prefix)
        .await
        .into_iter()
        .filter(|(_, v)| v.get(..2) == Some(&[1, b'R']))
        .map(|(k, _)| k)
        .collect()
}

async fn pause_writes(url: &str, ms: u64) {
    let mut conn = direct(url).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn redis_store(url: &str, prefix: &str) -> RedisStore {
    let client = redis::Client::open(url).unwrap();
    RedisStore::new(client)
        .await
        .expect("connect the store")
        .key_prefix(prefix)
}

// ---------------------------------------------------------------------------------------------
// Redis killed mid-claim, mid-handler, mid-complete.
// ---------------------------------------------------------------------------------------------

/// Redis dies while claims are in flight, in the two ways a claim can be in flight:
///
/// - `applied`: Redis executed the claim but its reply never arrived (the proxy holds replies).
///   The client gets `503`; the handler did not run; the claim of the attempt that gave up is
///   released in the background, so after the restart the first retry runs.
/// - `blocked`: the claim never executed (writes paused, then the server killed). `503`, and
///   after the restart the first retry runs.
///
/// Either way every key runs exactly once, and never during the outage.
async fn kill_mid_claim(durable: bool) {
    let _cpu = CPU.read().await;
    let mut server = if durable {
        RedisServer::spawn_durable()
    } else {
        RedisServer::spawn()
    };
    let url = server.url();
    let proxy = TcpProxy::start(server.port()).await;
    let prefix = unique_prefix("kill-mid-claim");
    let lease = Duration::from_secs(4);
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&proxy.url(), &prefix).await, lease),
        &shop,
    );

    // The claim executes, its reply is lost: the layer releases it in the background (the
    // release executes too, though its reply is lost as well).
    proxy.set(ProxyMode::StallReplies);
    send(&app, pay("applied"))
        .await
        .assert_fast_503("claim whose reply is lost");
    let released = Instant::now() + Duration::from_secs(5);
    while !running(&url, &prefix).await.is_empty() {
        assert!(
            Instant::now() < released,
            "the abandoned claim was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(ProxyMode::Pass);

    // The claim is stuck behind paused writes when the server dies.
    pause_writes(&url, 30_000).await;
    send(&app, pay("blocked"))
        .await
        .assert_fast_503("claim blocked in Redis");
    assert_eq!(
        running(&url, &prefix).await.len(),
        0,
        "the blocked claim did not run"
    );

    server.stop();
    for key in ["applied", "blocked", "other"] {
        send(&app, pay(key))
            .await
            .assert_fast_503("during the outage");
    }
    server.start();
    assert_eq!(
        running(&url, &prefix).await.len(),
        0,
        "no claim is left: one was released, the other never ran"
    );
    until_recovered(&app, "after the restart").await;

    let (refused, blocked) = retry_until_served(&app, "blocked").await;
    assert_eq!(blocked.status, StatusCode::OK, "{blocked:?}");
    assert_eq!(blocked.text, "run 1 of blocked: 10 EUR");
    assert!(
        refused.is_empty(),
        "nothing held the blocked key: {refused:?}"
    );

    let (refused, applied) = retry_until_served(&app, "applied").await;
    assert_eq!(applied.status, StatusCode::OK, "{applied:?}");
    assert_eq!(applied.text, "run 1 of applied: 10 EUR");
    assert!(
        refused.is_empty(),
        "the released claim holds nothing: {refused:?}"
    );

    for key in ["applied", "blocked"] {
        let replay = send(&app, pay(key)).await;
        replay.assert_replay_of(&format!("run 1 of {key}: 10 EUR"), key);
        assert_eq!(shop.runs(key), 1, "{key} ran more than once");
    }
    assert_eq!(shop.runs("other"), 0, "nothing ran during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_claim_durable_server() {
    kill_mid_claim(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_claim_ephemeral_server() {
    kill_mid_claim(false).await;
}

/// Redis is killed while two handlers run (one client waiting, one client gone) and restarted
/// with everything it acknowledged. Requests during the outage get a quick `503`, nothing runs
/// twice: after the restart the running claims are still there (renewed again by their owners),
/// duplicates get `409`, the handlers finish and store their responses, the record completed
/// before the kill is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_handler_durable_server_runs_nothing_twice() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn_durable();
    let url = server.url();
    let prefix = unique_prefix("kill-mid-handler");
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(5)),
        &shop,
    );

    let done = send(&app, pay("done")).await;
    assert_eq!(done.text, "run 1 of done: 10 EUR");

    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("held", &[("x-gate", "held")])).await }
    });
    shop.gate("held").entered(1).await;
    let gone = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("gone", &[("x-gate", "gone")])).await }
    });
    shop.gate("gone").entered(1).await;
    gone.abort(); // The client goes away mid-handler.

    server.stop();
    for key in ["held", "gone", "done", "new"] {
        send(&app, pay(key))
            .await
            .assert_fast_503("during the outage");
    }
    server.start();
    assert_eq!(
        running(&url, &prefix).await.len(),
        2,
        "both running claims survived the restart"
    );
    until_recovered(&app, "after the restart").await;

    let dup = send(&app, pay("held")).await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "{dup:?}");
    send(&app, pay("done"))
        .await
        .assert_replay_of("run 1 of done: 10 EUR", "record from before the kill");

    shop.gate("held").open();
    shop.gate("gone").open();
    let held = bounded(Duration::from_secs(10), "the held request", held)
        .await
        .unwrap();
    assert_eq!(held.status, StatusCode::OK, "{held:?}");
    assert_eq!(held.text, "run 1 of held: 10 EUR");

    for key in ["held", "gone", "done"] {
        let (_, replay) = retry_until_served(&app, key).await;
        replay.assert_replay_of(&format!("run 1 of {key}: 10 EUR"), key);
        assert_eq!(shop.runs(key), 1, "{key} ran more than once");
    }
    assert_eq!(shop.runs("new"), 0);
}

/// The same kill mid-handler, but the restarted server is empty: the claim was lost with it,
/// which the layer cannot see (the README's "a store that loses a write" limit). What each
/// client sees:
///
/// - a duplicate sent after the restart finds the key free and runs the handler again
///   (`run 2`), and its response is stored;
/// - the original handler then finishes; its client gets its own answer (`run 1`), but its
///   complete is fenced: it does not overwrite `run 2`'s record;
/// - every later retry is a replay of `run 2`; there is no third run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_handler_ephemeral_server_never_overwrites_the_newer_record() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("kill-mid-handler-ephemeral");
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(5)),
        &shop,
    );

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "first")])).await }
    });
    shop.gate("first").entered(1).await;

    server.stop();
    send(&app, pay("k"))
        .await
        .assert_fast_503("during the outage");
    server.start();
    until_recovered(&app, "after the restart").await;

    let second = send(&app, pay("k")).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(
        second.text, "run 2 of k: 10 EUR",
        "the claim was lost with the server"
    );

    shop.gate("first").open();
    let first = bounded(Duration::from_secs(10), "the first request", first)
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.text, "run 1 of k: 10 EUR");
    assert!(!first.replayed());

    for _ in 0..3 {
        send(&app, pay("k"))
            .await
            .assert_replay_of("run 2 of k: 10 EUR", "after the fenced complete");
    }
    assert_eq!(shop.runs("k"), 2);
}

/// Redis dies while the complete is blocked in it (writes paused) and comes back with what it
/// acknowledged within half the lease: the complete is tried again on the new connection and
/// stores the response; the retry replays it and the handler never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_complete_and_restart_within_half_the_lease_stores_the_response() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn_durable();
    let url = server.url();
    let prefix = unique_prefix("kill-mid-complete-retried");
    let shop = Shop::default();
    let lease = Duration::from_secs(8);
    let app = shop_app(layer(redis_store(&url, &prefix).await, lease), &shop);

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "k")])).await }
    });
    shop.gate("k").entered(1).await;
    pause_writes(&url, 30_000).await;
    shop.gate("k").open();
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.stop();
    server.start();
    let first = bounded(Duration::from_secs(10), "the first request", first)
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.text, "run 1 of k: 10 EUR");
    send(&app, pay("k"))
        .await
        .assert_replay_of("run 1 of k: 10 EUR", "after the restart");
    assert_eq!(shop.runs("k"), 1);
}

/// Redis dies while the complete is blocked in it (writes paused), and stays blocked for longer
/// than the layer tries to store a response (half the lease): the record was never written.
/// The client still gets the handler's answer, within that bound. After the restart the claim
/// is still there but nobody renews it: retries get `409` until its lease lapses, then the
/// handler runs once more (the "response could not be stored" limit), and that answer is what
/// is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_blocked_past_half_the_lease_reruns_once_after_the_lease() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn_durable();
    let url = server.url();
    let prefix = unique_prefix("kill-mid-complete-lost");
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(3)),
        &shop,
    );

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "k")])).await }
    });
    shop.gate("k").entered(1).await;
    pause_writes(&url, 30_000).await;
    let opened = Instant::now();
    shop.gate("k").open();
    let first = bounded(Duration::from_secs(10), "the first request", first)
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.text, "run 1 of k: 10 EUR");
    assert!(
        opened.elapsed() < Duration::from_millis(1_500) + FAST_503,
        "a complete that cannot finish delays the answer by half the lease at most: {:?}",
        opened.elapsed()
    );

    server.stop();
    server.start();
    assert_eq!(running(&url, &prefix).await.len(), 1, "the claim survived");
    until_recovered(&app, "after the restart").await;

    let (refused, again) = retry_until_served(&app, "k").await;
    assert!(
        refused.iter().all(|s| *s == StatusCode::CONFLICT),
        "{refused:?}"
    );
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.text, "run 2 of k: 10 EUR");
    send(&app, pay("k"))
        .await
        .assert_replay_of("run 2 of k: 10 EUR", "after the rerun");
    assert_eq!(shop.runs("k"), 2, "exactly one rerun after the lease");
}

/// Redis executes the complete but its reply is lost, then Redis is killed and restarted with
/// what it acknowledged: the record is there, replayed, and the handler never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_complete_after_it_applied_replays_the_record() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn_durable();
    let url = server.url();
    let proxy = TcpProxy::start(server.port()).await;
    let prefix = unique_prefix("kill-mid-complete-applied");
    let lease = Duration::from_secs(3);
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&proxy.url(), &prefix).await, lease),
        &shop,
    );
    // A first complete loads the fenced-replace script into Redis, so the complete below is
    // one EVALSHA that Redis can execute without a reply.
    assert_eq!(send(&app, pay("warm-up")).await.status, StatusCode::OK);

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "k")])).await }
    });
    shop.gate("k").entered(1).await;
    proxy.set(ProxyMode::StallReplies);
    shop.gate("k").open();
    let first = bounded(Duration::from_secs(10), "the first request", first)
        .await
        .unwrap();
    assert_eq!(first.text, "run 1 of k: 10 EUR");

    // Redis wrote the record (and fsynced it) even though the layer never heard back.
    let started = Instant::now();
    loop {
        let values = entries(&url, &prefix).await;
        if values.iter().any(|(_, v)| v.get(..2) == Some(&[1, b'D'])) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{values:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.stop();
    proxy.set(ProxyMode::Pass);
    send(&app, pay("k"))
        .await
        .assert_fast_503("during the outage");
    server.start();
    until_recovered(&app, "after the restart").await;

    let (_, replay) = retry_until_served(&app, "k").await;
    replay.assert_replay_of("run 1 of k: 10 EUR", "record acknowledged before the kill");
    let mut conn = direct(&url).await;
    for (key, _) in entries(&url, &prefix).await {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > lease.as_millis() as i64,
            "a record lives for the record TTL, not the lease: {ttl} ms"
        );
    }
    assert_eq!(shop.runs("k"), 1);
}

/// A response over `max_response_body` is stored as status and headers only. That record, too,
/// is what a restart keeps: after Redis is killed and restarted, the replay has the original
/// status and headers and an empty body, and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_response_record_survives_a_restart() {
    let _cpu = CPU.read().await;
    let mut server = RedisServer::spawn_durable();
    let prefix = unique_prefix("oversize-restart");
    let shop = Shop::default();
    let app = shop_app(
        layer(
            redis_store(&server.url(), &prefix).await,
            Duration::from_secs(5),
        )
        .max_response_body(1000),
        &shop,
    );
    let first = send(
        &app,
        pay_with("big", &[("x-pad", "5000"), ("x-status", "201")]),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.text.len(),
        "run 1 of big: 10 EUR".len() + 5000,
        "sent in full"
    );

    server.stop();
    send(&app, pay("big"))
        .await
        .assert_fast_503("during the outage");
    server.start();
    until_recovered(&app, "after the restart").await;

    let (_, replay) = retry_until_served(&app, "big").await;
    assert_eq!(replay.status, StatusCode::CREATED, "{replay:?}");
    assert!(replay.replayed(), "{replay:?}");
    assert!(replay.text.is_empty(), "the body was too large to store");
    assert_eq!(
        replay.headers[header::CONTENT_TYPE],
        first.headers[header::CONTENT_TYPE]
    );
    assert_eq!(shop.runs("big"), 1);
}

// ---------------------------------------------------------------------------------------------
// Redis paused; the connection cut or stalled.
// ---------------------------------------------------------------------------------------------

/// `CLIENT PAUSE ... ALL` for longer than the store timeout: every request during the pause
/// gets `503` in time (replays too: they need the store). The claims sent during the pause run
/// when it ends, for attempts that have given up: those keys answer `409` until their lease
/// lapses, then run once. A handler running across the pause keeps its key and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_longer_than_the_store_timeout() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("pause");
    let store = redis_store(&url, &prefix).await;
    let shop = Shop::default();
    // Claims made during the pause lapse after a short lease; the handler that runs across the
    // pause has a lease longer than the pause.
    let short = shop_app(layer(store.clone(), Duration::from_secs(1)), &shop);
    let long = shop_app(layer(store, Duration::from_secs(4)), &shop);

    let before = send(&short, pay("before")).await;
    assert_eq!(before.text, "run 1 of before: 10 EUR");
    let across = tokio::spawn({
        let long = long.clone();
        async move { send(&long, pay_with("across", &[("x-gate", "across")])).await }
    });
    shop.gate("across").entered(1).await;

    let pause = Duration::from_millis(2000);
    let mut conn = direct(&url).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause.as_millis() as u64)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let paused_at = Instant::now();
    let during: Vec<_> = ["p1", "p2", "p3", "before"]
        .into_iter()
        .map(|key| {
            let short = short.clone();
            tokio::spawn(async move { (key, send(&short, pay(key)).await) })
        })
        .collect();
    for task in during {
        let (key, reply) = task.await.unwrap();
        reply.assert_fast_503(key);
    }
    assert!(
        paused_at.elapsed() < pause,
        "the 503s came while Redis was still paused"
    );
    for key in ["p1", "p2", "p3"] {
        assert_eq!(shop.runs(key), 0, "{key} ran during the pause");
    }

    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed()) + Duration::from_millis(100))
        .await;
    shop.gate("across").open();
    let across = bounded(
        Duration::from_secs(10),
        "the request across the pause",
        across,
    )
    .await
    .unwrap();
    assert_eq!(across.text, "run 1 of across: 10 EUR");

    send(&short, pay("before"))
        .await
        .assert_replay_of("run 1 of before: 10 EUR", "after the pause");
    for key in ["p1", "p2", "p3"] {
        let (refused, reply) = retry_until_served(&short, key).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{key}: {reply:?} after {refused:?}"
        );
        assert_eq!(reply.text, format!("run 1 of {key}: 10 EUR"));
    }
    for key in ["p1", "p2", "p3", "across", "before"] {
        send(&short, pay(key))
            .await
            .assert_replay_of(&format!("run 1 of {key}: 10 EUR"), key);
        assert_eq!(shop.runs(key), 1, "{key}");
    }
}

/// The connection between the layer and Redis is cut (every connection closed, new ones
/// refused), then stalled (bytes held, nothing answers). Both times: `503` within the store
/// timeout, never a hang, no handler runs; when the network heals the layer recovers by itself,
/// replays what it stored before, and runs each key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_or_stalled_fails_closed_and_recovers() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let proxy = TcpProxy::start(server.port()).await;
    let prefix = unique_prefix("proxy");
    let shop = Shop::default();
    let app = shop_app(
        layer(
            redis_store(&proxy.url(), &prefix).await,
            Duration::from_secs(1),
        ),
        &shop,
    );
    let before = send(&app, pay("before")).await;
    assert_eq!(before.text, "run 1 of before: 10 EUR");

    for (mode, key) in [(ProxyMode::Refuse, "cut"), (ProxyMode::Stall, "stalled")] {
        proxy.set(mode);
        for key in [key, "before"] {
            send(&app, pay(key))
                .await
                .assert_fast_503(&format!("{mode:?}: {key}"));
        }
        // Several at once, too: none waits for another.
        let many: Vec<_> = (0..8)
            .map(|i| {
                let app = app.clone();
                tokio::spawn(async move { send(&app, pay(&format!("{key}-{i}"))).await })
            })
            .collect();
        for task in many {
            task.await.unwrap().assert_fast_503(&format!("{mode:?}"));
        }
        assert_eq!(shop.runs(key), 0, "{mode:?}: a handler ran");

        proxy.set(ProxyMode::Pass);
        until_recovered(&app, &format!("after {mode:?}")).await;
        send(&app, pay("before"))
            .await
            .assert_replay_of("run 1 of before: 10 EUR", &format!("after {mode:?}"));
        // A stalled claim may have reached Redis once the network healed: its key is held
        // until the lease lapses, then runs once.
        let (_, reply) = retry_until_served(&app, key).await;
        assert_eq!(reply.text, format!("run 1 of {key}: 10 EUR"), "{reply:?}");
    }
    for key in ["before", "cut", "stalled"] {
        assert_eq!(shop.runs(key), 1, "{key}");
    }
}

// ---------------------------------------------------------------------------------------------
// Lease lost.
// ---------------------------------------------------------------------------------------------

/// Instance A runs a handler while its connection to Redis stalls, so it cannot renew its lease,
/// and the lease lapses. Instance B (another connection) gets the same key, claims it and runs.
/// Then A's connection heals and A's handler finishes while B's is still running.
///
/// What each client sees:
///
/// - A's client gets A's own answer (`run 1`), unreplayed; A's complete is fenced and writes
///   nothing: Redis still holds B's running claim, and a duplicate gets `409`;
/// - B's client gets `run 2`, which is what Redis stores;
/// - every retry, through either instance, is a replay of `run 2`.
///
/// The handler ran twice: a lease that cannot be renewed ends the protection of that attempt,
/// which is why the lease is long by default and renewed every third of it. What fencing
/// guarantees is that the late attempt never replaces the record of the attempt that took over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_to_a_stalled_connection_is_fenced() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let proxy = TcpProxy::start(server.port()).await;
    let prefix = unique_prefix("lease-lost");
    let lease = Duration::from_millis(900);
    let shop = Shop::default();
    let app_a = shop_app(
        layer(redis_store(&proxy.url(), &prefix).await, lease)
            .store_timeout(Duration::from_millis(200)),
        &shop,
    );
    let app_b = shop_app(layer(redis_store(&url, &prefix).await, lease), &shop);

    let a = tokio::spawn({
        let app_a = app_a.clone();
        async move { send(&app_a, pay_with("k", &[("x-gate", "a")])).await }
    });
    shop.gate("a").entered(1).await;
    assert_eq!(running(&url, &prefix).await.len(), 1, "A holds the key");

    proxy.set(ProxyMode::Stall);
    let started = Instant::now();
    while !entries(&url, &prefix).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "A's lease did not lapse while its renewals were blocked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let b = tokio::spawn({
        let app_b = app_b.clone();
        async move { send(&app_b, pay_with("k", &[("x-gate", "b")])).await }
    });
    shop.gate("b").entered(1).await;
    assert_eq!(shop.runs("k"), 2, "B took over the lapsed key");
    // B's claim: its key and owner prefix (version, tag, owner token); B renews its deadline.
    let owner_of = |entries: Vec<(String, Vec<u8>)>| -> Vec<(String, Vec<u8>)> {
        entries
            .into_iter()
            .map(|(k, v)| (k, v.get(..18).unwrap_or(&v).to_vec()))
            .collect()
    };
    let b_claim = owner_of(entries(&url, &prefix).await);
    assert_eq!(b_claim.len(), 1);
    assert_eq!(b_claim[0].1.get(..2), Some(&[1, b'R'][..]));

    // A's connection heals: its held renewals reach Redis, then its handler finishes.
    proxy.set(ProxyMode::Pass);
    shop.gate("a").open();
    let a = bounded(Duration::from_secs(10), "A's request", a)
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(
        a.text, "run 1 of k: 10 EUR",
        "A's client gets A's own answer"
    );
    assert!(!a.replayed());
    assert_eq!(
        owner_of(entries(&url, &prefix).await),
        b_claim,
        "A's fenced complete (and renewals) left B's claim untouched"
    );
    let dup = send(&app_a, pay("k")).await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "B still runs: {dup:?}");

    shop.gate("b").open();
    let b = bounded(Duration::from_secs(10), "B's request", b)
        .await
        .unwrap();
    assert_eq!(b.status, StatusCode::OK, "{b:?}");
    assert_eq!(b.text, "run 2 of k: 10 EUR");
    for app in [&app_a, &app_b] {
        send(app, pay("k"))
            .await
            .assert_replay_of("run 2 of k: 10 EUR", "B's record");
    }
    assert_eq!(shop.runs("k"), 2);
}

// ---------------------------------------------------------------------------------------------
// Handlers that fail while the store is unreachable.
// ---------------------------------------------------------------------------------------------

/// A handler panics, or answers 500, while the store is unreachable, so the release of its claim
/// is lost. The client gets its answer in time (`500` problem+json for the panic, the handler's
/// own `500` otherwise); the key is not stuck for longer than the lease: retries get `409`
/// until it lapses, then exactly one runs again (a failed handler is meant to be retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handler_whose_release_is_lost_blocks_only_until_the_lease_lapses() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let proxy = TcpProxy::start(server.port()).await;
    let prefix = unique_prefix("release-lost");
    let shop = Shop::default();
    let app = shop_app(
        layer(
            redis_store(&proxy.url(), &prefix).await,
            Duration::from_millis(1500),
        ),
        &shop,
    );
    for (key, fault) in [("panics", ("x-panic", "1")), ("fails", ("x-status", "500"))] {
        let first = tokio::spawn({
            let app = app.clone();
            async move { send(&app, pay_with(key, &[("x-gate", key), fault])).await }
        });
        shop.gate(key).entered(1).await;
        proxy.set(ProxyMode::Refuse);
        shop.gate(key).open();
        let first = bounded(Duration::from_secs(10), "the failing request", first)
            .await
            .unwrap();
        assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR, "{first:?}");
        assert!(first.took < Duration::from_secs(5), "{first:?}");
        if key == "panics" {
            assert!(first.problem_type().ends_with("HandlerFailed"), "{first:?}");
        } else {
            assert_eq!(first.text, "run 1 of fails: 10 EUR");
        }

        proxy.set(ProxyMode::Pass);
        until_recovered(&app, key).await;
        // The retry is the same request (method, path, body) without the fault.
        let (refused, retry) = retry_until_served(&app, key).await;
        assert!(
            refused.iter().all(|s| *s == StatusCode::CONFLICT),
            "{key}: {refused:?}"
        );
        assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
        assert_eq!(retry.text, format!("run 2 of {key}: 10 EUR"));
        send(&app, pay(key))
            .await
            .assert_replay_of(&format!("run 2 of {key}: 10 EUR"), key);
        assert_eq!(shop.runs(key), 2, "{key}");
    }
}

// ---------------------------------------------------------------------------------------------
// Storm.
// ---------------------------------------------------------------------------------------------

/// A deterministic jitter source (SplitMix64).
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Three instances, each with its own connection to one Redis, each get 500 keys × 10
/// duplicates (15,000 requests, 30 per key) at once, each request after a random delay of up to
/// 50 ms. Every key's handler runs exactly once; every answer is `200` (the run or its replay)
/// or `409`; every `200` of a key carries the same body; afterwards every key replays that
/// body through every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_duplicates_over_three_instances_runs_each_key_once() {
    let _cpu = CPU.write().await;
    const INSTANCES: usize = 3;
    const KEYS: usize = 500;
    const DUPLICATES: usize = 10;

    let server = RedisServer::spawn();
    let prefix = unique_prefix("storm");
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let executions = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for instance in 0..INSTANCES {
        // The storm is about exactly-once, not latency: generous timeouts, so a loaded machine
        // slows it down instead of turning answers into 503s.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(30)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let client = redis::Client::open(server.url()).unwrap();
        let conn = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .unwrap();
        let store = RedisStore::from_connection(conn).key_prefix(prefix.clone());
        let runs = runs.clone();
        let executions = executions.clone();
        let handler = move |key: IdempotencyKey| {
            let runs = runs.clone();
            let executions = executions.clone();
            async move {
                let n: usize = key.as_str().trim_start_matches("key-").parse().unwrap();
                runs[n].fetch_add(1, Ordering::SeqCst);
                let exec = executions.fetch_add(1, Ordering::SeqCst);
                // Long enough for duplicates to find the key in flight.
                tokio::time::sleep(Duration::from_millis(5)).await;
                format!("key {n}: execution {exec} on instance {instance}")
            }
        };
        apps.push(
            Router::new()
                .route("/pay", post(handler))
                .route_layer(IdempotencyLayer::new(store).store_timeout(Duration::from_secs(30))),
        );
    }

    let started = Instant::now();
    let mut jitter = Jitter(0x5eed);
    let mut tasks = Vec::with_capacity(INSTANCES * KEYS * DUPLICATES);
    for _ in 0..DUPLICATES {
        for key in 0..KEYS {
            for app in &apps {
                let app = app.clone();
                let delay = Duration::from_micros(jitter.next() % 50_000);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let reply = send(&app, pay(&format!("key-{key}"))).await;
                    (key, reply)
                }));
            }
        }
    }
    let mut bodies: Vec<Option<String>> = vec![None; KEYS];
    let (mut ok, mut replays, mut conflicts) = (0, 0, 0);
    for task in tasks {
        let (key, reply) = bounded(Duration::from_secs(60), "the storm", task)
            .await
            .unwrap();
        match reply.status {
            StatusCode::OK => {
                ok += 1;
                replays += usize::from(reply.replayed());
                match &bodies[key] {
                    Some(seen) => assert_eq!(*seen, reply.text, "key {key} answered differently"),
                    None => bodies[key] = Some(reply.text),
                }
            }
            StatusCode::CONFLICT => conflicts += 1,
            _ => panic!("key {key}: unexpected answer {reply:?}"),
        }
    }
    let took = started.elapsed();
    eprintln!(
        "storm: {} requests in {took:?}: {ok} ok ({replays} replays), {conflicts} conflicts",
        INSTANCES * KEYS * DUPLICATES
    );
    for (key, count) in runs.iter().enumerate() {
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "key {key} ran {count:?} times"
        );
    }
    assert!(bodies.iter().all(Option::is_some), "a key never got a 200");
    assert_eq!(executions.load(Ordering::SeqCst), KEYS);
    assert_eq!(ok + conflicts, INSTANCES * KEYS * DUPLICATES);
    let redis = TestRedis {
        url: server.url(),
        server: None,
    };
    assert_eq!(redis.count_keys(&prefix), KEYS);
    // Nothing was lost either: once the storm is over, every key, through every instance, is
    // a replay of the body its first answer carried.
    for (key, body) in bodies.iter().enumerate() {
        for app in &apps {
            let reply = send(app, pay(&format!("key-{key}"))).await;
            reply.assert_replay_of(
                body.as_ref().unwrap(),
                &format!("key {key} after the storm"),
            );
        }
    }
    assert_eq!(executions.load(Ordering::SeqCst), KEYS);
}

// ---------------------------------------------------------------------------------------------
// Corrupted records, at the layer.
// ---------------------------------------------------------------------------------------------

/// A stored value is replaced by `corrupt(original)`. The next request with the key gets `500`
/// problem+json (`CorruptRecord`), is not a replay, does not run the handler, and the value is
/// left as it is for inspection.
async fn corrupted_record_is_refused(what: &str, corrupt: impl Fn(&[u8]) -> Vec<u8>) {
    let redis = TestRedis::get();
    let prefix = unique_prefix("corrupt-layer");
    let shop = Shop::default();
    let app = shop_app(
        layer(
            redis_store(&redis.url, &prefix).await,
            Duration::from_secs(10),
        ),
        &shop,
    );
    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::OK);
    let stored = entries(&redis.url, &prefix).await;
    assert_eq!(stored.len(), 1, "{what}");
    let (redis_key, original) = &stored[0];
    let bad = corrupt(original);
    let mut conn = direct(&redis.url).await;
    let _: () = redis::cmd("SET")
        .arg(redis_key)
        .arg(&bad)
        .arg("KEEPTTL")
        .query_async(&mut conn)
        .await
        .unwrap();

    for _ in 0..2 {
        let request = tokio::spawn({
            let app = app.clone();
            async move { send(&app, pay("k")).await }
        });
        let reply = request
            .await
            .unwrap_or_else(|err| panic!("{what}: the layer panicked on the stored value: {err}"));
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{what}: {reply:?}"
        );
        assert!(
            reply.problem_type().ends_with("CorruptRecord"),
            "{what}: {reply:?}"
        );
        assert!(!reply.replayed(), "{what}: garbage replayed: {reply:?}");
    }
    assert_eq!(shop.runs("k"), 1, "{what}: the handler ran again");
    let after = entries(&redis.url, &prefix).await;
    assert_eq!(
        after,
        vec![(redis_key.clone(), bad)],
        "{what}: value not left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_record_of_another_version_is_refused() {
    for version in [0u8, 2, 0xff] {
        corrupted_record_is_refused(&format!("version {version}"), |v| {
            let mut v = v.to_vec();
            v[0] = version;
            v
        })
        .await;
    }
    corrupted_record_is_refused("unknown record kind", |v| {
        let mut v = v.to_vec();
        v[1] = b'X';
        v
    })
    .await;
    corrupted_record_is_refused("running record of another version", |_| {
        let mut running = vec![2u8, b'R'];
        running.extend_from_slice(&[0; 56]);
        running
    })
    .await;
}

/// Where the header count sits in an encoded record: the last two bytes of the fixed head,
/// which is all a record without headers and body consists of.
fn header_count_offset() -> usize {
    let empty = tower_idempotency::CompletedRecord::new(
        tower_idempotency::Fingerprint::from_bytes([0; 32]),
        StatusCode::OK,
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    empty.encode().len() - 2
}

/// A header count no `HeaderMap` can hold (the field is 16 bits, a map holds fewer entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_record_with_an_impossible_header_count_is_refused() {
    let at = header_count_offset();
    corrupted_record_is_refused("header count 65535", |v| {
        let mut v = v.to_vec();
        v[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        v
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_record_truncated_in_its_head_is_refused() {
    // Cuts inside the fixed head (version, kind, fingerprint, flags, ..., header count) and
    // inside the headers.
    let head = header_count_offset() + 2;
    for cut in [1usize, 2, 20, 34, head - 3, head - 1, head + 2, head + 12] {
        corrupted_record_is_refused(&format!("cut at {cut}"), |v| {
            assert!(cut < v.len() - "run 1 of k: 10 EUR".len());
            v[..cut].to_vec()
        })
        .await;
    }
}

/// A record cut inside its body: the response body is the last field of the record and its
/// length is not recorded, so the decoder cannot tell a shortened body from the real one. The
/// layer must still refuse the value rather than replay a shortened response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_record_truncated_in_its_body_is_refused() {
    for lost in [1usize, 5, "run 1 of k: 10 EUR".len()] {
        corrupted_record_is_refused(&format!("{lost} body bytes cut"), |v| {
            v[..v.len() - lost].to_vec()
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Never twice under store faults: lost connections, idle timeouts, a full or read-only Redis,
// claims whose outcome was lost, detached handlers at shutdown, router answers.
// ---------------------------------------------------------------------------------------------

async fn redis_command(url: &str, args: &[&str]) {
    let mut conn = direct(url).await;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query_async(&mut conn).await.unwrap();
}

/// Closes every client connection but the caller's, as a failover, a proxy or a NAT would.
async fn kill_connections(url: &str) {
    redis_command(url, &["CLIENT", "KILL", "TYPE", "normal"]).await;
}

/// The layer's connections are killed while the handler runs: its lease renewal and its
/// complete go out on the connection made in their place, the response is stored, and the
/// retry replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_handler_still_store_the_response() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("killed-mid-handler");
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(6)),
        &shop,
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "k")])).await }
    });
    shop.gate("k").entered(1).await;
    kill_connections(&url).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    shop.gate("k").open();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.text, "run 1 of k: 10 EUR");
    send(&app, pay("k"))
        .await
        .assert_replay_of("run 1 of k: 10 EUR", "right after");
    assert_eq!(shop.runs("k"), 1);
}

/// Redis closes connections idle for a second (`timeout 1`). The first request after a quiet
/// spell is served, not refused; a handler that outlasts the idle timeout stores its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_idle_timeout_neither_refuses_nor_reruns() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn_with(&["--timeout", "1"]);
    let url = server.url();
    let prefix = unique_prefix("idle-timeout");
    let shop = Shop::default();
    // Renewals every 3 s: the connection idles past Redis's timeout while the handler runs.
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(9)),
        &shop,
    );
    assert_eq!(send(&app, pay("warm")).await.status, StatusCode::OK);
    for quiet in 0..3 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let key = format!("after-quiet-{quiet}");
        let reply = send(&app, pay(&key)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "after a quiet spell: {reply:?}"
        );
    }
    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("slow", &[("x-gate", "slow")])).await }
    });
    shop.gate("slow").entered(1).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    shop.gate("slow").open();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::OK, "{slow:?}");
    send(&app, pay("slow"))
        .await
        .assert_replay_of("run 1 of slow: 10 EUR", "after the slow handler");
    assert_eq!(shop.runs("slow"), 1);
}

/// Redis is out of memory (`maxmemory` reached, `noeviction`) only while a handler runs: a new
/// key is refused with `503`, the running one answers `409`; the handler's complete is retried
/// until Redis takes writes again, and its response is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_while_the_handler_runs_still_stores_the_response() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("oom-mid-handler");
    let shop = Shop::default();
    let app = shop_app(
        layer(redis_store(&url, &prefix).await, Duration::from_secs(6)),
        &shop,
    );
    assert_eq!(send(&app, pay("done")).await.status, StatusCode::OK);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, pay_with("k", &[("x-gate", "k")])).await }
    });
    shop.gate("k").entered(1).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory", "1"]).await;

    send(&app, pay("new"))
        .await
        .assert_fast_503("a new key while full");
    send(&app, pay("done"))
        .await
        .assert_replay_of("run 1 of done: 10 EUR", "a completed key while full");
    let running = send(&app, pay("k")).await;
    assert_eq!(running.status, StatusCode::CONFLICT, "{running:?}");

    shop.gate("k").open();
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis_command(&url, &["CONFIG", "SET", "maxmemory", "0"]).await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.text, "run 1 of k: 10 EUR");
    send(&app, pay("k"))
        .await
        .assert_replay_of("run 1 of k: 10 EUR", "after Redis took writes again");
    assert_eq!(shop.runs("k"), 1);
    assert_eq!(shop.runs("new"), 0);
}

/// A store pointed at a read-only replica (a failover not yet followed): completed keys are
/// replayed, new keys get `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_replica_replays_and_refuses_new_keys() {
    let _cpu = CPU.read().await;
    let primary = RedisServer::spawn();
    // The replica loads the primary's data from the socket, never into a file in this folder.
    let replica = RedisServer::spawn_with(&[
        "--replicaof",
        "127.0.0.1",
        &primary.port().to_string(),
        "--repl-diskless-load",
        "on-empty-db",
        "--dir",
        &std::env::temp_dir().to_string_lossy(),
    ]);
    let prefix = unique_prefix("read-only");
    let shop = Shop::default();
    let on_primary = shop_app(
        layer(
            redis_store(&primary.url(), &prefix).await,
            Duration::from_secs(6),
        ),
        &shop,
    );
    assert_eq!(send(&on_primary, pay("k")).await.status, StatusCode::OK);
    let replicated = Instant::now() + Duration::from_secs(15);
    while entries(&replica.url(), &prefix).await.is_empty() {
        assert!(
            Instant::now() < replicated,
            "the replica never got the record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_replica = shop_app(
        layer(
            redis_store(&replica.url(), &prefix).await,
            Duration::from_secs(6),
        ),
        &shop,
    );
    send(&on_replica, pay("k"))
        .await
        .assert_replay_of("run 1 of k: 10 EUR", "on the replica");
    send(&on_replica, pay("new"))
        .await
        .assert_fast_503("a new key on the replica");
    assert_eq!(shop.runs("k"), 1);
    assert_eq!(shop.runs("new"), 0);
}

/// Redis is paused (`CLIENT PAUSE .. ALL`) for longer than the store timeout: the request gets
/// `503`, but its claim was on the wire and runs when Redis resumes. The layer releases it in
/// the background, so the retry runs at once instead of meeting `409` for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lost_in_a_pause_is_released_when_redis_resumes() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("claim-in-pause");
    let shop = Shop::default();
    let layer = layer(redis_store(&url, &prefix).await, Duration::from_secs(60));
    let detached = layer.detached_work();
    let app = shop_app(layer, &shop);

    redis_command(&url, &["CLIENT", "PAUSE", "1500", "ALL"]).await;
    send(&app, pay("k"))
        .await
        .assert_fast_503("during the pause");
    assert!(
        detached.wait_for(Duration::from_secs(10)).await,
        "the background release did not finish"
    );
    assert!(
        running(&url, &prefix).await.is_empty(),
        "a ghost claim is left"
    );
    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(retry.text, "run 1 of k: 10 EUR");
    assert_eq!(shop.runs("k"), 1);
}

/// The client goes away while its claim is held up in Redis (writes paused): the claim runs
/// later for nobody, and is released in the background; the key is free for the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_the_claim_leaves_the_key_free() {
    let _cpu = CPU.read().await;
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("left-during-claim");
    let shop = Shop::default();
    let layer = layer(redis_store(&url, &prefix).await, Duration::from_secs(60))
        .store_timeout(Duration::from_secs(5));
    let detached = layer.detached_work();
    let app = shop_app(layer, &shop);

    pause_writes(&url, 800).await;
    let gave_up = tokio::time::timeout(Duration::from_millis(200), app.clone().oneshot(pay("k")));
    assert!(
        gave_up.await.is_err(),
        "the request should still be claiming"
    );
    assert!(
        detached.wait_for(Duration::from_secs(10)).await,
        "the background release did not finish"
    );
    assert!(
        running(&url, &prefix).await.is_empty(),
        "the key is left claimed"
    );
    let retry = send(&app, pay("k")).await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(retry.text, "run 1 of k: 10 EUR");
    assert_eq!(shop.runs("k"), 1);
}

/// Connections are killed every 200 ms while 12 clients send new keys for three seconds, each
/// key twice, retrying on `409` and `503` as a client would: every key runs exactly once, and
/// every answer for a key is its first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_repeatedly_under_load_run_every_key_once() {
    let _cpu = CPU.write().await;
    const KEYS: usize = 20_000;
    let storm = Instant::now() + Duration::from_secs(3);
    let server = RedisServer::spawn();
    let url = server.url();
    let prefix = unique_prefix("kill-storm");
    let shop = Shop::default();
    let app = shop_app(
        IdempotencyLayer::new(redis_store(&url, &prefix).await)
            .lease_ttl(Duration::from_secs(10))
            .store_timeout(Duration::from_secs(1)),
        &shop,
    );
    let (stop, mut stopped) = watch::channel(false);
    let killer = tokio::spawn({
        let url = url.clone();
        async move {
            let mut kills = 0;
            while !*stopped.borrow() {
                kill_connections(&url).await;
                kills += 1;
                let _ = tokio::time::timeout(Duration::from_millis(200), stopped.changed()).await;
            }
            kills
        }
    });
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..12 {
        let app = app.clone();
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= KEYS || Instant::now() > storm {
                    return answers;
                }
                let key = format!("key-{n}");
                // Twice: the second is a retry that must replay the first.
                for _ in 0..2 {
                    let (_, reply) = retry_until_served(&app, &key).await;
                    assert_eq!(reply.status, StatusCode::OK, "{key}: {reply:?}");
                    answers.push((key.clone(), reply.text));
                }
            }
        }));
    }
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    stop.send_replace(true);
    let kills = killer.await.unwrap();
    assert!(
        kills >= 10,
        "only {kills} kills: the storm was too short to say anything"
    );
    for (key, text) in &answers {
        assert_eq!(text, &format!("run 1 of {key}: 10 EUR"), "{key}");
    }
    let keys: std::collections::BTreeSet<&String> = answers.iter().map(|(key, _)| key).collect();
    assert!(keys.len() >= 50, "only {} keys were sent", keys.len());
    let reruns: Vec<_> = keys
        .iter()
        .filter(|key| shop.runs(key) != 1)
        .map(|key| (shop.runs(key), key))
        .collect();
    assert!(reruns.is_empty(), "keys not run exactly once: {reruns:?}");
    let executions: usize = shop.runs.lock().unwrap().values().sum();
    assert_eq!(executions, keys.len(), "a key ran that no client sent");
}
