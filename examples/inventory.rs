//! An `ORDER_PAID` webhook receiver that decrements inventory exactly once per delivery.
//!
//! A webhook sender retries whenever it does not see a `2xx` in time, so the same order can
//! arrive several times. The sender puts one idempotency key on every delivery of the same
//! event; [`IdempotencyLayer`] runs the handler for the first delivery only, replays its stored
//! response to every retry, answers `409` while the first delivery is still running, and `422`
//! when the key comes back with a different body.
//!
//! # Running
//!
//! ```text
//! cargo run --example inventory                                  # in-memory store
//! docker compose up -d redis                                       # or any Redis server
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example inventory   # records in Redis
//! ```
//!
//! Environment (an empty value counts as unset; an invalid one stops the program with an error
//! message and exit code 2):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `BIND` | address to listen on, `IP:PORT` (port `0` picks a free port) | `127.0.0.1:3000` |
//! | `REDIS_URL` | Redis to keep idempotency records in; unset: in memory | unset |
//! | `INITIAL_STOCK` | initial stock of both `SKU123` and `SKU456` | `100` |
//! | `WORK_MS` | simulated downstream delay, before the stock changes | `0` |
//! | `KEY_TTL_SECS` | how long a completed response is replayed | `86400` |
//! | `LEASE_TTL_MS` | lease of a running request | `30000` |
//! | `RUST_LOG` | log filter | `info,tower_idempotency=debug` |
//!
//! The program prints `listening on http://ADDR` on standard output once it accepts
//! connections; logs go to standard error. Ctrl-C (or `SIGTERM`) stops it cleanly.
//!
//! # Endpoints
//!
//! - `POST /webhooks/order-paid`, behind the layer: a key is required in `Idempotency-Key` (or
//!   `X-Idempotency-Key`). The body is `{"order_id": "...", "items": [{"sku": "...", "qty": N}]}`
//!   (extra fields are ignored; the `Content-Type` is not checked, senders vary). Answers:
//!   - `200` `{"order_id", "applied", "stock"}`: the order was applied; `stock` is what is left;
//!   - `400` `{"error"}`: the body is not JSON or not of that shape;
//!   - `422` `{"error"}`: the order cannot be applied: no items, a `qty` below 1, an unknown SKU,
//!     or not enough stock (all or nothing: nothing is decremented then).
//!
//!   These handler answers are all below `500`, so the layer stores and replays them too: a
//!   retry of a rejected order gets the same rejection. The layer's own answers (missing key,
//!   in flight, key reused) are `application/problem+json`.
//! - `GET /inventory`, not behind the layer: `{"SKU123": n, "SKU456": m}`.
//!
//! # A session
//!
//! With `WORK_MS=2000 cargo run --example inventory` in another terminal (each handler run then
//! takes two seconds, long enough to send a duplicate while the first delivery runs):
//!
//! ```text
//! $ URL=http://127.0.0.1:3000/webhooks/order-paid
//! $ ORDER='{"order_id":"o-1","items":[{"sku":"SKU123","qty":2}]}'
//!
//! # First delivery: the handler runs, the stock goes down.
//! $ curl -i $URL -H 'content-type: application/json' -H 'Idempotency-Key: evt-1' -d "$ORDER"
//! HTTP/1.1 200 OK
//! content-type: application/json
//!
//! {"order_id":"o-1","applied":[{"sku":"SKU123","qty":2}],"stock":{"SKU123":98,"SKU456":100}}
//!
//! # The sender retries: the stored response comes back at once, the handler does not run.
//! $ curl -i $URL -H 'content-type: application/json' -H 'Idempotency-Key: evt-1' -d "$ORDER"
//! HTTP/1.1 200 OK
//! content-type: application/json
//! idempotent-replayed: true
//!
//! {"order_id":"o-1","applied":[{"sku":"SKU123","qty":2}],"stock":{"SKU123":98,"SKU456":100}}
//!
//! # Another event, delivered twice at once: the duplicate arrives while the first still runs.
//! # Retry-After is what is left of the lease (LEASE_TTL_MS), renewed while the handler runs.
//! $ ORDER2='{"order_id":"o-2","items":[{"sku":"SKU123","qty":2}]}'
//! $ curl -s $URL -H 'Idempotency-Key: evt-2' -d "$ORDER2" & sleep 0.5
//! $ curl -i $URL -H 'Idempotency-Key: evt-2' -d "$ORDER2"
//! HTTP/1.1 409 Conflict
//! content-type: application/problem+json
//! retry-after: 30
//!
//! {"type":"...#variant.InFlight","title":"Request already in progress","status":409,"detail":"..."}
//!
//! # ...and the first delivery, in the background, completes normally:
//! {"order_id":"o-2","applied":[{"sku":"SKU123","qty":2}],"stock":{"SKU123":96,"SKU456":100}}
//!
//! # The same key with another body is a bug in the sender, not a retry: refused.
//! $ curl -i $URL -H 'Idempotency-Key: evt-1' -d '{"order_id":"o-1","items":[{"sku":"SKU123","qty":5}]}'
//! HTTP/1.1 422 Unprocessable Entity
//! content-type: application/problem+json
//!
//! {"type":"...#variant.KeyReused","title":"Idempotency key reused","status":422,"detail":"..."}
//!
//! # No key, no processing.
//! $ curl -i $URL -d "$ORDER"
//! HTTP/1.1 400 Bad Request
//! content-type: application/problem+json
//!
//! {"type":"...#variant.MissingKey","title":"Idempotency key missing","status":400,"detail":"..."}
//!
//! # Of all these requests, only the first delivery of each event changed the stock.
//! $ curl -s http://127.0.0.1:3000/inventory
//! {"SKU123":96,"SKU456":100}
//! ```

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore,
};
use tracing_subscriber::EnvFilter;

/// The SKUs this warehouse stocks.
const SKUS: [&str; 2] = ["SKU123", "SKU456"];

/// The largest TTL accepted from the environment: 100 years, far beyond any retry policy and
/// well within what a clock or a Redis `PX` can represent.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

struct Config {
    bind: SocketAddr,
    redis_url: Option<String>,
    initial_stock: u64,
    work: Duration,
    key_ttl: Duration,
    lease_ttl: Duration,
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let bind = match var("BIND")? {
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
            Some(v) => v.parse().map_err(|_| {
                format!("BIND={v:?} is not an address of the form IP:PORT, e.g. 127.0.0.1:3000")
            })?,
        };
        let key_ttl = Duration::from_secs(number("KEY_TTL_SECS", 86_400, 1, MAX_TTL.as_secs())?);
        let lease_ttl = Duration::from_millis(number(
            "LEASE_TTL_MS",
            30_000,
            1,
            MAX_TTL.as_millis() as u64,
        )?);
        Ok(Self {
            bind,
            redis_url: var("REDIS_URL")?,
            initial_stock: number("INITIAL_STOCK", 100, 0, u64::MAX)?,
            work: Duration::from_millis(number("WORK_MS", 0, 0, u64::MAX)?),
            key_ttl,
            lease_ttl,
        })
    }
}

/// An environment variable; unset and empty (or blank) are both `None`.
fn var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// A whole number from the environment, `default` when unset, within `min..=max`.
fn number(name: &str, default: u64, min: u64, max: u64) -> Result<u64, String> {
    let Some(v) = var(name)? else {
        return Ok(default);
    };
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ if max == u64::MAX => Err(format!(
            "{name}={v:?} is not a whole number of at least {min}"
        )),
        _ => Err(format!(
            "{name}={v:?} is not a whole number between {min} and {max}"
        )),
    }
}

/// The stock, shared by all requests.
struct AppState {
    stock: Mutex<BTreeMap<String, u64>>,
    work: Duration,
}

impl AppState {
    fn stock(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        // Updates are applied only after every check passed, with nothing that can panic in
        // between, so a poisoned lock still guards a consistent map.
        self.stock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The webhook payload. Unknown fields are ignored.
#[derive(Deserialize)]
struct OrderPaid {
    order_id: String,
    items: Vec<Item>,
}

#[derive(Deserialize, Serialize, Clone)]
struct Item {
    sku: String,
    /// Signed, so that `0` and negative quantities are reported as such (`422`) instead of as a
    /// malformed body.
    qty: i64,
}

#[derive(Serialize)]
struct Applied {
    order_id: String,
    applied: Vec<Item>,
    stock: BTreeMap<String, u64>,
}

/// A `{"error": "..."}` response.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Display) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.to_string())
    }

    fn unprocessable(msg: impl Display) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, msg.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// `POST /webhooks/order-paid`.
///
/// Status codes: `200` applied; `400` body not JSON or not an order; `422` the order cannot be
/// applied (no items, `qty` < 1, unknown SKU, or insufficient stock: an out-of-stock order is
/// not a conflict with another request but an order this warehouse cannot fulfil, so it is
/// `422` and not `409`, which the layer uses for "same key still in flight").
async fn order_paid(
    State(state): State<Arc<AppState>>,
    key: IdempotencyKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Applied>, ApiError> {
    // The key is a bearer-like secret: log its length only.
    tracing::info!(
        key_len = key.as_str().len(),
        "order-paid delivery accepted by the layer"
    );

    // The body is parsed here rather than with `Json<_>` so that every malformed body gets a
    // JSON `400`, whatever the `Content-Type` the sender set.
    let body = body.map_err(|rejection| ApiError(rejection.status(), rejection.body_text()))?;
    let order: OrderPaid = serde_json::from_slice(&body)
        .map_err(|err| ApiError::bad_request(format!("invalid order-paid payload: {err}")))?;

    if order.items.is_empty() {
        return Err(ApiError::unprocessable("the order has no items"));
    }
    // Quantities per SKU, summed in case a SKU is listed twice.
    let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
    for item in &order.items {
        let qty = match u64::try_from(item.qty) {
            Ok(qty) if qty >= 1 => qty,
            _ => {
                return Err(ApiError::unprocessable(format!(
                    "qty for {} must be at least 1, got {}",
                    item.sku, item.qty
                )));
            }
        };
        let total = wanted.entry(item.sku.as_str()).or_default();
        *total = total.saturating_add(qty);
    }

    // Stands for the slow part of real order processing (a database, a downstream call).
    if !state.work.is_zero() {
        tokio::time::sleep(state.work).await;
    }

    // Check every item, then apply every item, under one lock: all or nothing.
    let mut stock = state.stock();
    for (sku, qty) in &wanted {
        match stock.get(*sku) {
            None => return Err(ApiError::unprocessable(format!("unknown SKU {sku:?}"))),
            Some(&available) if available < *qty => {
                return Err(ApiError::unprocessable(format!(
                    "insufficient stock for {sku}: {qty} requested, {available} available"
                )));
            }
            Some(_) => {}
        }
    }
    for (sku, qty) in &wanted {
        if let Some(available) = stock.get_mut(*sku) {
            *available -= qty;
        }
    }
    let remaining = stock.clone();
    drop(stock);

    tracing::info!(order_id = %order.order_id, items = order.items.len(), "order applied");
    Ok(Json(Applied {
        order_id: order.order_id,
        applied: order.items,
        stock: remaining,
    }))
}

/// `GET /inventory`.
async fn inventory(State(state): State<Arc<AppState>>) -> Json<BTreeMap<String, u64>> {
    Json(state.stock().clone())
}

fn app<St: IdempotencyStore>(state: Arc<AppState>, layer: IdempotencyLayer<St>) -> Router {
    Router::new()
        .route("/webhooks/order-paid", post(order_paid))
        // `route_layer`: only the routes above are protected, and keys are scoped by the
        // matched route.
        .route_layer(layer)
        .route("/inventory", get(inventory))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_idempotency=debug")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(msg) => {
            eprintln!("inventory: invalid configuration: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let stock = SKUS
        .iter()
        .map(|sku| ((*sku).to_owned(), config.initial_stock))
        .collect();
    let state = Arc::new(AppState {
        stock: Mutex::new(stock),
        work: config.work,
    });

    let (router, detached) = match &config.redis_url {
        None => {
            tracing::info!("idempotency records kept in memory (set REDIS_URL to share them)");
            let layer = configure(IdempotencyLayer::new(MemoryStore::new()), &config);
            let detached = layer.detached_work();
            (app(state, layer), detached)
        }
        Some(url) => {
            let client = match redis::Client::open(url.as_str()) {
                Ok(client) => client,
                Err(err) => {
                    eprintln!(
                        "inventory: invalid configuration: REDIS_URL is not a Redis URL: {err}"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let store = match RedisStore::new(client).await {
                Ok(store) => store,
                Err(err) => {
                    eprintln!("inventory: cannot connect to Redis at REDIS_URL: {err}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!("idempotency records kept in Redis");
            let layer = configure(IdempotencyLayer::new(store), &config);
            let detached = layer.detached_work();
            (app(state, layer), detached)
        }
    };

    let listener = match tokio::net::TcpListener::bind(config.bind).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("inventory: cannot listen on {}: {err}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.bind);
    tracing::info!(
        initial_stock = config.initial_stock,
        work_ms = config.work.as_millis() as u64,
        key_ttl_secs = config.key_ttl.as_secs(),
        lease_ttl_ms = config.lease_ttl.as_millis() as u64,
        "ready"
    );
    #[allow(clippy::print_stdout)]
    {
        println!("listening on http://{addr}");
    }

    if let Err(err) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        eprintln!("inventory: server error: {err}");
        return ExitCode::FAILURE;
    }
    // The server waited for the requests still connected. A handler whose client left is not
    // one of them: wait for it (and for claims being released) before exiting, so that it is not
    // cut off halfway and its response is stored.
    if !detached.is_empty() {
        tracing::info!(running = detached.len(), "waiting for detached requests");
    }
    if !detached.wait_for(SHUTDOWN_GRACE).await {
        tracing::warn!(
            running = detached.len(),
            "exiting with detached requests still running"
        );
    }
    ExitCode::SUCCESS
}

/// How long shutdown waits for requests whose client left.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn configure<St>(layer: IdempotencyLayer<St>, config: &Config) -> IdempotencyLayer<St> {
    layer.record_ttl(config.key_ttl).lease_ttl(config.lease_ttl)
}
