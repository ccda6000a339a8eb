//! The Postgres variants: `PgStore` behind the layer (plain and transactional), and the same
//! statements written by hand without the layer, in a schema of the benchmark's own on the
//! server at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`), dropped at
//! the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};
use tower_idempotency::{IdempotencyLayer, PgStore, PgTx};

use super::{LEASE_MS, RECORD_TTL_MS, Variant, handler_router, read_body, respond};

/// The benchmark's schema and a pool on it (16 connections, shared by the variants, which run
/// one at a time).
pub struct PgBench {
    pub pool: PgPool,
    pub schema: String,
}

impl PgBench {
    /// Connects and creates the schema with the store's tables (`idempotency_keys` for the
    /// layer, `tx_keys` for the transactional layer, `base_keys` by hand) and the order tables.
    pub async fn setup() -> Self {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .unwrap_or_else(|err| {
                panic!("the Postgres variants need a server at {url} ({err}); set DATABASE_URL")
            });
        let schema = format!("tidem_bench_{}", std::process::id());
        let bench = Self { pool, schema };
        for table in ["idempotency_keys", "tx_keys", "base_keys"] {
            bench.store(table).migrate().await.expect("create a table");
        }
        for table in ["orders", "base_orders"] {
            bench
                .execute(&format!(
                    "CREATE TABLE {} (id bigserial PRIMARY KEY, body bytea NOT NULL)",
                    bench.table(table)
                ))
                .await;
        }
        bench
    }

    fn store(&self, table: &str) -> PgStore {
        PgStore::new(self.pool.clone())
            .schema(&self.schema)
            .and_then(|store| store.table(table))
            .expect("plain names")
    }

    pub fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.schema)
    }

    async fn execute(&self, sql: &str) {
        sqlx::query(AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    /// Empties every table, so each measurement starts alike.
    pub async fn reset(&self) {
        let tables: Vec<String> = [
            "idempotency_keys",
            "tx_keys",
            "base_keys",
            "orders",
            "base_orders",
        ]
        .iter()
        .map(|t| self.table(t))
        .collect();
        self.execute(&format!("TRUNCATE {}", tables.join(", ")))
            .await;
    }

    pub async fn drop_schema(&self) {
        self.execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .await;
    }

    /// Bytes per row of `table` (heap, index, TOAST) and the average row's own size.
    pub async fn bytes_per_row(&self, table: &str) -> (f64, f64) {
        let t = self.table(table);
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT pg_total_relation_size('{t}')::float8 / count(*), avg(pg_column_size(k.*))::float8
             FROM {t} AS k"
        )))
        .fetch_one(&self.pool)
        .await
        .expect("table size");
        (row.get(0), row.get(1))
    }

    /// Inserts `n` expired rows into the layer's table, then purges them in batches of
    /// `batch`: rows per second.
    pub async fn purge_rate(&self, n: u64, batch: u32) -> f64 {
        let t = self.table("idempotency_keys");
        self.execute(&format!(
            "INSERT INTO {t} (key, owner, fingerprint, record, expires_at)
             SELECT 'expired-' || g, '\\x00', '\\x00', NULL, clock_timestamp() - interval '1 s'
             FROM generate_series(1, {n}) AS g"
        ))
        .await;
        self.execute(&format!("VACUUM ANALYZE {t}")).await;
        let store = self.store("idempotency_keys");
        let start = Instant::now();
        let mut purged = 0;
        loop {
            let n = store.purge_expired(batch).await.expect("purge");
            purged += n;
            if n < u64::from(batch) {
                break;
            }
        }
        assert_eq!(purged, n, "every expired row purged");
        n as f64 / start.elapsed().as_secs_f64()
    }
}

/// The router of a Postgres variant.
pub fn router_for(variant: Variant, pg: &PgBench, response: Bytes) -> Router {
    match variant {
        Variant::PgFirst | Variant::PgReplay => handler_router(response)
            .route_layer(IdempotencyLayer::new(pg.store("idempotency_keys"))),
        Variant::PgTxFirst => {
            let insert: Arc<str> =
                format!("INSERT INTO {} (body) VALUES ($1)", pg.table("orders")).into();
            let store = pg.store("tx_keys").transactional(true);
            Router::new()
                .route(
                    "/pay",
                    post(move |tx: PgTx, body: Bytes| {
                        let (insert, response) = (insert.clone(), response.clone());
                        async move {
                            let Ok(mut conn) = tx.conn().await else {
                                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                            };
                            let inserted = sqlx::query(AssertSqlSafe(insert))
                                .bind(&body[..])
                                .execute(&mut *conn)
                                .await;
                            match inserted {
                                Ok(_) => respond(StatusCode::CREATED, response),
                                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                            }
                        }
                    }),
                )
                .route_layer(IdempotencyLayer::new(store))
        }
        Variant::BaselinePg | Variant::BaselinePgReplay => {
            let t = pg.table("base_keys");
            let state = ByHand {
                pool: pg.pool.clone(),
                response,
                claim: by_hand_claim(&t).into(),
                complete: format!(
                    "UPDATE {t} SET record = $3,
                         expires_at = clock_timestamp() + $4 * interval '1 millisecond'
                     WHERE key = $1 AND owner = $2"
                )
                .into(),
                owners: Arc::default(),
            };
            Router::new()
                .route("/pay", post(baseline_pg))
                .with_state(state)
        }
        Variant::BaselinePgTx => {
            let insert: Arc<str> =
                format!("INSERT INTO {} (body) VALUES ($1)", pg.table("base_orders")).into();
            let pool = pg.pool.clone();
            Router::new().route(
                "/pay",
                post(move |body: Bytes| {
                    let (insert, pool, response) = (insert.clone(), pool.clone(), response.clone());
                    async move {
                        let written = async {
                            let mut tx = pool.begin().await?;
                            sqlx::query(AssertSqlSafe(insert))
                                .bind(&body[..])
                                .execute(&mut *tx)
                                .await?;
                            tx.commit().await
                        };
                        match written.await {
                            Ok(()) => respond(StatusCode::CREATED, response),
                            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                        }
                    }
                }),
            )
        }
        v => panic!("{v:?} is not a Postgres variant"),
    }
}

/// The claim statement `PgStore` sends, as it sends it: acquired, or what holds the key.
fn by_hand_claim(t: &str) -> String {
    format!(
        "WITH live AS (
            SELECT owner, fingerprint, record, expires_at FROM {t}
            WHERE key = $1 AND expires_at > clock_timestamp()
        ),
        claimed AS (
            INSERT INTO {t} AS e (key, owner, fingerprint, record, expires_at)
            SELECT $1, $2, '\\x00', NULL, clock_timestamp() + $3 * interval '1 millisecond'
            WHERE NOT EXISTS (SELECT 1 FROM live)
            ON CONFLICT (key) DO UPDATE
                SET owner = EXCLUDED.owner, fingerprint = EXCLUDED.fingerprint,
                    record = NULL, expires_at = EXCLUDED.expires_at
                WHERE e.expires_at <= clock_timestamp()
            RETURNING e.key
        )
        SELECT true AS acquired, NULL::bytea AS owner, NULL::bytea AS fingerprint,
               NULL::bytea AS record, 0::int8 AS left_ms
        FROM claimed
        UNION ALL
        SELECT false, owner, fingerprint, record,
               (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8
        FROM live"
    )
}

#[derive(Clone)]
struct ByHand {
    pool: PgPool,
    response: Bytes,
    claim: Arc<str>,
    complete: Arc<str>,
    owners: Arc<AtomicU64>,
}

/// 7a and 8a: the claim statement; then, for a first delivery, the handler's response and the
/// complete statement; for a repeat, the stored response.
async fn baseline_pg(State(st): State<ByHand>, request: Request) -> Response {
    let Some(key) = request
        .headers()
        .get(super::KEY_HEADER)
        .and_then(|k| k.to_str().ok())
        .map(str::to_owned)
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if let Err(rejection) = read_body(request).await {
        return rejection;
    }
    let owner = st.owners.fetch_add(1, Ordering::Relaxed).to_le_bytes();
    let claimed = sqlx::query(AssertSqlSafe(st.claim.clone()))
        .bind(&key)
        .bind(&owner[..])
        .bind(LEASE_MS as i64)
        .fetch_optional(&st.pool)
        .await;
    let row = match claimed {
        Ok(Some(row)) => row,
        Ok(None) => return StatusCode::CONFLICT.into_response(),
        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    if !row.get::<bool, _>("acquired") {
        return match row.get::<Option<Vec<u8>>, _>("record") {
            Some(record) => respond(StatusCode::CREATED, Bytes::from(record)),
            None => StatusCode::CONFLICT.into_response(),
        };
    }
    let stored = sqlx::query(AssertSqlSafe(st.complete.clone()))
        .bind(&key)
        .bind(&owner[..])
        .bind(&st.response[..])
        .bind(RECORD_TTL_MS as i64)
        .execute(&st.pool)
        .await;
    match stored {
        Ok(_) => respond(StatusCode::CREATED, st.response.clone()),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
