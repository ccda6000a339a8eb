//! A router whose handler writes through the request's transaction (`PgTx`), for the tests of
//! `PgStore`'s transactional mode.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, PgStore};

use super::postgres::{Schema, pool, store};

/// A router whose handler inserts `body` into `orders` through the request's transaction, then
/// answers as `x-status` says (200 by default), after waiting at `gate` when one is set.
pub fn orders_app<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    table: String,
) -> Router {
    use axum::http::HeaderMap;
    use tower_idempotency::PgTx;
    Router::new()
        .route(
            "/pay",
            post(move |tx: PgTx, headers: HeaderMap, body: String| {
                let (gate, table) = (gate.clone(), table.clone());
                async move {
                    let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(&body)
                        .execute(&mut *tx.conn().await.unwrap())
                        .await
                        .unwrap();
                    if headers.contains_key("x-gate")
                        && let Some(gate) = gate
                    {
                        let _ = gate.acquire().await.unwrap();
                    }
                    if headers.contains_key("x-kill-backend") {
                        // The transaction's connection dies before the layer commits.
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *tx.conn().await.unwrap())
                            .await
                            .unwrap();
                        let other = pool().await;
                        let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                            .bind(pid)
                            .fetch_one(&other)
                            .await
                            .unwrap();
                    }
                    let status = headers
                        .get("x-status")
                        .map_or(StatusCode::OK, |s| s.to_str().unwrap().parse().unwrap());
                    (status, format!("paid {body}"))
                }
            }),
        )
        .route_layer(layer)
}

pub async fn orders(store: &PgStore, table: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT body FROM {table} ORDER BY id"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A transactional store in a fresh schema, with its `orders` table.
pub async fn transactional(test: &str) -> (PgStore, Schema, String) {
    let (store, schema) = store(test).await;
    let table = format!("\"{}\".orders", schema.name());
    let create = format!("CREATE TABLE {table} (id serial PRIMARY KEY, body text NOT NULL)");
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(store.pool())
        .await
        .unwrap();
    (store.transactional(true), schema, table)
}

pub fn pay_with(key: &str, body: &'static str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post("/pay").header("idempotency-key", key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body)).unwrap()
}

pub async fn answer(app: &Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
