//! The Postgres mode: the stock lives in a table beside the idempotency records, and a delivery
//! changes it in the transaction the layer opened for the request, which commits together with
//! the stored response or not at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tower_idempotency::{IdempotencyKey, PgStore, PgTx};

use crate::stock::{Wanted, check};
use crate::{ApiError, AppState, Applied, StartError, accept, hold, work};

/// The stock table, `"<schema>".inventory_stock`.
pub(crate) struct PgStock {
    pool: PgPool,
    table: String,
}

/// Connects, creates what is missing (the schema, the stock table with `initial` of each SKU
/// not there yet, the store's table) and returns the stock and a transactional store.
pub(crate) async fn connect(
    url: &str,
    schema: &str,
    skus: &[&str],
    initial: u64,
) -> Result<(PgStock, PgStore), StartError> {
    let pool = PgPoolOptions::new()
        .max_connections(32)
        .connect(url)
        .await
        .map_err(|err| StartError::Other(format!("cannot connect to DATABASE_URL: {err}")))?;
    // The store checks the schema name; the stock table's SQL then uses the same name.
    let store = PgStore::new(pool.clone())
        .schema(schema)
        .map_err(|err| StartError::Config(format!("DATABASE_SCHEMA: {err}")))?
        .transactional(true);
    store
        .migrate()
        .await
        .map_err(|err| StartError::Other(format!("cannot create the store's table: {err}")))?;
    store.spawn_purger(std::time::Duration::from_secs(60), 1_000);
    let stock = PgStock {
        pool,
        table: format!("\"{schema}\".inventory_stock"),
    };
    stock
        .create(skus, initial)
        .await
        .map_err(|err| StartError::Other(format!("cannot create the stock table: {err}")))?;
    Ok((stock, store))
}

impl PgStock {
    /// The table, and a row of `initial` for each SKU that has none: instances starting
    /// against one database never reset each other's stock.
    async fn create(&self, skus: &[&str], initial: u64) -> Result<(), sqlx::Error> {
        let table = &self.table;
        let mut tx = self.pool.begin().await?;
        // Concurrent `CREATE … IF NOT EXISTS` can collide: starting instances take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('inventory example'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                sku text PRIMARY KEY,
                qty bigint NOT NULL CHECK (qty >= 0))"
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (sku, qty) SELECT unnest($1::text[]), $2
             ON CONFLICT (sku) DO NOTHING"
        )))
        .bind(skus)
        .bind(i64::try_from(initial).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// What is left of each SKU, as committed.
    pub(crate) async fn read(&self) -> Result<BTreeMap<String, u64>, sqlx::Error> {
        read(&self.table, &self.pool).await
    }

    /// Takes `wanted` out of the stock on `conn` (the request's transaction), all or nothing;
    /// returns what is left.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        wanted: &Wanted,
    ) -> Result<BTreeMap<String, u64>, ApiError> {
        let table = &self.table;
        let skus: Vec<&str> = wanted.keys().map(String::as_str).collect();
        // Lock the rows wanted, in a fixed order so that two orders never deadlock.
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT sku, qty FROM {table} WHERE sku = ANY($1) ORDER BY sku FOR UPDATE"
        )))
        .bind(&skus)
        .fetch_all(&mut *conn)
        .await
        .map_err(ApiError::internal)?;
        let current = rows
            .into_iter()
            .map(|(sku, qty)| (sku, qty.unsigned_abs()))
            .collect();
        check(&current, wanted)?;
        let quantities: Vec<i64> = wanted
            .values()
            .map(|&qty| i64::try_from(qty).unwrap_or(i64::MAX))
            .collect();
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} AS s SET qty = s.qty - w.qty
             FROM unnest($1::text[], $2::int8[]) AS w(sku, qty) WHERE s.sku = w.sku"
        )))
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *conn)
        .await
        .map_err(ApiError::internal)?;
        read(table, conn).await.map_err(ApiError::internal)
    }
}

async fn read<'c, E: sqlx::PgExecutor<'c>>(
    table: &str,
    executor: E,
) -> Result<BTreeMap<String, u64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT sku, qty FROM {table} ORDER BY sku"
    )))
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(sku, qty)| (sku, qty.unsigned_abs()))
        .collect())
}

/// `POST /webhooks/order-paid`, with the stock in Postgres: as the in-memory handler, with the
/// change made on the request's transaction (`PgTx`). The layer commits it with the stored
/// response; a crash, a `5xx` or a lost lease rolls it back.
pub(crate) async fn order_paid(
    State(state): State<Arc<AppState>>,
    key: IdempotencyKey,
    tx: PgTx,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Applied>, ApiError> {
    let (order, wanted) = accept(&key, body)?;
    work(&state).await;
    let crate::stock::Stock::Postgres(stock) = &state.stock else {
        return Err(ApiError::internal("the stock is not in Postgres"));
    };
    let remaining = {
        let mut conn = tx.conn().await.map_err(ApiError::internal)?;
        stock.apply(&mut conn, &wanted).await?
    };
    Ok(hold(&state, order, remaining).await)
}
