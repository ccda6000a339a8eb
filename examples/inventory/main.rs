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
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --example inventory --features postgres            # stock and records in Postgres
//! ```
//!
//! With `DATABASE_URL`, the stock lives in a Postgres table (`inventory_stock`) beside the
//! idempotency records (`PgStore` in transactional mode): a delivery's stock change commits in
//! the same transaction as its stored response, or not at all.
//!
//! Environment (an empty value counts as unset; an invalid one stops the program with an error
//! message and exit code 2):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `BIND` | address to listen on, `IP:PORT` (port `0` picks a free port) | `127.0.0.1:3000` |
//! | `REDIS_URL` | Redis to keep idempotency records in; unset: in memory | unset |
//! | `DATABASE_URL` | Postgres to keep the stock and the records in (feature `postgres`); not with `REDIS_URL` | unset |
//! | `DATABASE_SCHEMA` | the schema of both tables, created if missing | `public` |
//! | `INITIAL_STOCK` | initial stock of both `SKU123` and `SKU456` (in Postgres: of a SKU that has no row yet, so instances sharing a database never reset it) | `100` |
//! | `WORK_MS` | simulated downstream delay, before the stock changes | `0` |
//! | `HOLD_MS` | delay after the stock changed, before the answer (the crash window, below) | `0` |
//! | `KEY_TTL_SECS` | how long a completed response is replayed | `86400` |
//! | `LOCK_TTL_MS` | lease of a running request | `30000` |
//! | `RUST_LOG` | log filter | `info,tower_idempotency=debug` |
//!
//! The program prints `listening on http://ADDR` on standard output once it accepts
//! connections; logs go to standard error. Ctrl-C (or `SIGTERM`) stops it cleanly.
//!
//! # The crash window
//!
//! `HOLD_MS` holds each delivery between its stock change and its answer. Kill the process
//! (`kill -9`) during the hold: with the records in Redis, a change made in a database of its
//! own would stay while the key is not stored, so the sender's retry (after the lease,
//! `LOCK_TTL_MS`) would apply the order again (this example's stock is in memory then, and dies
//! with the process); with Postgres the change rolls back with the rest of the transaction, and
//! the retry applies it once. Stop an instance instead (`kill -STOP`) until its lease lapses
//! and another instance takes the delivery over: when it continues, its commit finds the key
//! no longer its own, its change rolls back and its client gets `409`; the stock changed once.
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
//! # Retry-After is what is left of the lease (LOCK_TTL_MS), renewed while the handler runs.
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
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::{Deserialize, Serialize};
use tower_idempotency::{
    DetachedWork, IdempotencyKey, IdempotencyLayer, IdempotencyStore, MemoryStore, RedisStore,
};
use tracing_subscriber::EnvFilter;

mod config;
#[cfg(feature = "postgres")]
mod postgres;
mod stock;

use config::{Backend, Config};
use stock::{Stock, Wanted};

/// The SKUs this warehouse stocks.
const SKUS: [&str; 2] = ["SKU123", "SKU456"];

/// Exit code for an invalid configuration.
const EXIT_CONFIG: u8 = 2;

/// How long shutdown waits for requests whose client left.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

struct AppState {
    stock: Stock,
    work: Duration,
    hold: Duration,
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

    /// A `500`: the layer stores no 5xx, so the key is released and a retry runs again.
    fn internal(err: impl Display) -> Self {
        tracing::error!(error = %err, "order-paid failed");
        Self(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".to_owned(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Reads and checks a delivery: the order, and the quantity wanted per SKU.
///
/// The body is parsed here rather than with `Json<_>` so that every malformed body gets a JSON
/// `400`, whatever the `Content-Type` the sender set.
fn accept(
    key: &IdempotencyKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<(OrderPaid, Wanted), ApiError> {
    // The key is a bearer-like secret: log its length only.
    tracing::info!(
        key_len = key.as_str().len(),
        "order-paid delivery accepted by the layer"
    );
    let body = body.map_err(|rejection| ApiError(rejection.status(), rejection.body_text()))?;
    let order: OrderPaid = serde_json::from_slice(&body)
        .map_err(|err| ApiError::bad_request(format!("invalid order-paid payload: {err}")))?;
    if order.items.is_empty() {
        return Err(ApiError::unprocessable("the order has no items"));
    }
    // Quantities per SKU, summed in case a SKU is listed twice.
    let mut wanted = Wanted::new();
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
        let total = wanted.entry(item.sku.clone()).or_default();
        *total = total.saturating_add(qty);
    }
    Ok((order, wanted))
}

/// Stands for the slow part of real order processing (a database, a downstream call).
async fn work(state: &AppState) {
    if !state.work.is_zero() {
        tokio::time::sleep(state.work).await;
    }
}

/// After the stock changed and before the answer: the window in which a crash leaves the
/// stock changed and the key unstored (with Redis or memory), or rolls the change back (with
/// Postgres).
async fn hold(state: &AppState, order: OrderPaid, stock: BTreeMap<String, u64>) -> Json<Applied> {
    if !state.hold.is_zero() {
        tokio::time::sleep(state.hold).await;
    }
    tracing::info!(order_id = %order.order_id, items = order.items.len(), "order applied");
    Json(Applied {
        order_id: order.order_id,
        applied: order.items,
        stock,
    })
}

/// `POST /webhooks/order-paid`, with the stock in memory.
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
    let (order, wanted) = accept(&key, body)?;
    work(&state).await;
    let stock = (state.stock.in_memory())
        .ok_or_else(|| ApiError::internal("the stock is not in memory"))?;
    let remaining = stock.apply(&wanted)?;
    Ok(hold(&state, order, remaining).await)
}

/// `GET /inventory`.
async fn inventory(
    State(state): State<Arc<AppState>>,
) -> Result<Json<BTreeMap<String, u64>>, ApiError> {
    Ok(Json(state.stock.read().await?))
}

fn app<St: IdempotencyStore>(
    state: Arc<AppState>,
    layer: IdempotencyLayer<St>,
    order_paid: MethodRouter<Arc<AppState>>,
) -> Router {
    Router::new()
        .route("/webhooks/order-paid", order_paid)
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

/// Why the program could not start: a configuration error (exit code 2) or another failure.
enum StartError {
    Config(String),
    Other(String),
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

    let started = match Config::from_env() {
        Ok(config) => start(&config).await.map(|app| (config, app)),
        Err(msg) => Err(StartError::Config(msg)),
    };
    let (config, (router, detached)) = match started {
        Ok(started) => started,
        Err(StartError::Config(msg)) => {
            eprintln!("inventory: invalid configuration: {msg}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(StartError::Other(msg)) => {
            eprintln!("inventory: {msg}");
            return ExitCode::FAILURE;
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
        hold_ms = config.hold.as_millis() as u64,
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

/// Connects to the configured backend and builds the router.
async fn start(config: &Config) -> Result<(Router, DetachedWork), StartError> {
    let state = |stock| {
        Arc::new(AppState {
            stock,
            work: config.work,
            hold: config.hold,
        })
    };
    let memory_stock = || Stock::memory(&SKUS, config.initial_stock);
    match &config.backend {
        Backend::Memory => {
            tracing::info!("idempotency records kept in memory (set REDIS_URL to share them)");
            let layer = configure(IdempotencyLayer::new(MemoryStore::new()), config);
            let detached = layer.detached_work();
            Ok((
                app(state(memory_stock()), layer, post(order_paid)),
                detached,
            ))
        }
        Backend::Redis { url } => {
            let client = redis::Client::open(url.as_str()).map_err(|err| {
                StartError::Config(format!("REDIS_URL is not a Redis URL: {err}"))
            })?;
            let store = RedisStore::new(client).await.map_err(|err| {
                StartError::Other(format!("cannot connect to Redis at REDIS_URL: {err}"))
            })?;
            tracing::info!("idempotency records kept in Redis");
            let layer = configure(IdempotencyLayer::new(store), config);
            let detached = layer.detached_work();
            Ok((
                app(state(memory_stock()), layer, post(order_paid)),
                detached,
            ))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres { url, schema } => {
            let (stock, store) =
                postgres::connect(url, schema, &SKUS, config.initial_stock).await?;
            tracing::info!(schema, "stock and idempotency records kept in Postgres");
            let layer = configure(IdempotencyLayer::new(store), config);
            let detached = layer.detached_work();
            let handler = post(postgres::order_paid);
            Ok((app(state(Stock::Postgres(stock)), layer, handler), detached))
        }
        #[cfg(not(feature = "postgres"))]
        Backend::Postgres { .. } => Err(StartError::Config(
            "DATABASE_URL needs the example built with Postgres: \
             cargo run --example inventory --features postgres"
                .to_owned(),
        )),
    }
}

fn configure<St>(layer: IdempotencyLayer<St>, config: &Config) -> IdempotencyLayer<St> {
    layer.record_ttl(config.key_ttl).lease_ttl(config.lease_ttl)
}
