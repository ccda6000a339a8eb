//! The receiver: this crate's server layer on a `MemoryStore`, in process on 127.0.0.1:0, with
//! handlers that count their executions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};

/// What the handlers saw.
#[derive(Default)]
pub(crate) struct Seen {
    /// Handler executions, over every route.
    pub(crate) runs: AtomicUsize,
    /// Executions per order id.
    pub(crate) per_order: Mutex<HashMap<String, usize>>,
    /// The run number each order got, in the answer of its (first) execution.
    pub(crate) run_of_order: Mutex<HashMap<String, usize>>,
    /// The key of every execution, in order.
    pub(crate) keys: Mutex<Vec<String>>,
    /// `409` answers the server sent.
    pub(crate) conflicts: AtomicUsize,
    /// `GET` requests, and how many of them carried a key header.
    pub(crate) gets: AtomicUsize,
    pub(crate) gets_with_key: AtomicUsize,
    /// Holds `POST /slow` until the test adds a permit.
    pub(crate) gate: Gate,
    /// `POST /slow` executions that have started.
    pub(crate) slow_started: AtomicUsize,
}

impl Seen {
    pub(crate) fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    pub(crate) fn runs_of(&self, order: &str) -> usize {
        self.per_order
            .lock()
            .unwrap()
            .get(order)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn run_of(&self, order: &str) -> Option<usize> {
        self.run_of_order.lock().unwrap().get(order).copied()
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone()
    }
}

/// A semaphore with no permit to begin with.
pub(crate) struct Gate(pub(crate) Semaphore);

impl Default for Gate {
    fn default() -> Self {
        Self(Semaphore::new(0))
    }
}

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub(crate) async fn start() -> Self {
        let seen = Arc::new(Seen::default());
        let counted = seen.clone();
        let app = Router::new()
            .route("/orders", post(order))
            .route("/slow", post(slow))
            .route("/fail", post(fail))
            .route_layer(IdempotencyLayer::new(MemoryStore::new()))
            .route("/stock", get(stock))
            .with_state(seen.clone())
            .layer(axum::middleware::map_response(
                move |res: axum::response::Response| {
                    let counted = counted.clone();
                    async move {
                        if res.status() == StatusCode::CONFLICT {
                            counted.conflicts.fetch_add(1, Ordering::SeqCst);
                        }
                        res
                    }
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, seen, task }
    }
}

/// Counts one execution of `order` under `key` and answers with its run number.
fn run(seen: &Seen, key: &IdempotencyKey, body: &Value) -> Json<Value> {
    let order = body["order"].as_str().unwrap_or("?").to_owned();
    let run = seen.runs.fetch_add(1, Ordering::SeqCst) + 1;
    *seen
        .per_order
        .lock()
        .unwrap()
        .entry(order.clone())
        .or_default() += 1;
    seen.run_of_order.lock().unwrap().insert(order.clone(), run);
    seen.keys.lock().unwrap().push(key.as_str().to_owned());
    Json(json!({ "order": order, "run": run }))
}

async fn order(
    State(seen): State<Arc<Seen>>,
    key: IdempotencyKey,
    Json(body): Json<Value>,
) -> Json<Value> {
    run(&seen, &key, &body)
}

/// Runs once the test lets it through the gate.
async fn slow(
    State(seen): State<Arc<Seen>>,
    key: IdempotencyKey,
    Json(body): Json<Value>,
) -> Json<Value> {
    seen.slow_started.fetch_add(1, Ordering::SeqCst);
    seen.gate.0.acquire().await.unwrap().forget();
    run(&seen, &key, &body)
}

/// Always fails, after counting the execution: a `5xx` releases the key, so every retry runs.
async fn fail(
    State(seen): State<Arc<Seen>>,
    key: IdempotencyKey,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let answer = run(&seen, &key, &body);
    (StatusCode::INTERNAL_SERVER_ERROR, answer)
}

async fn stock(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> &'static str {
    seen.gets.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key("idempotency-key") {
        seen.gets_with_key.fetch_add(1, Ordering::SeqCst);
    }
    "{}"
}
