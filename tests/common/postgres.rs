//! A real Postgres for the tests: `DATABASE_URL` if set, else the local server at
//! `postgres://postgres@127.0.0.1:5432/postgres`. Each test works in a schema of its own, dropped
//! when its guard drops; nothing outside it is touched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower_idempotency::PgStore;

const HOW_TO_GET_POSTGRES: &str = "these tests need Postgres: set DATABASE_URL=postgres://... \
    to a server they may create schemas on, or run one on 127.0.0.1:5432 that accepts the \
    user postgres without a password (`apt-get install postgresql`, then \
    `pg_ctlcluster <version> main start`; trust auth on localhost)";

/// The server's URL.
pub fn database_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
    }
}

/// A pool on the test server; fails the test, saying how to get a server, if none answers.
pub async fn pool() -> PgPool {
    pool_named("tower-idempotency-tests").await
}

/// A pool whose connections carry `application_name`, so a test can find (and kill) its own
/// backends in `pg_stat_activity`.
pub async fn pool_named(application_name: &str) -> PgPool {
    let options = connect_options().application_name(application_name);
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach Postgres at {} ({err}); {HOW_TO_GET_POSTGRES}",
                database_url()
            )
        })
}

/// The server's connection options, from [`database_url`].
pub fn connect_options() -> PgConnectOptions {
    database_url()
        .parse()
        .unwrap_or_else(|err| panic!("DATABASE_URL is not a Postgres URL ({err})"))
}

/// Drops its schema when dropped.
pub struct Schema {
    name: String,
}

impl Schema {
    /// A schema name of the test's own, dropped (if anything created it) with the guard.
    pub fn reserve(test: &str) -> Self {
        Self {
            name: unique_schema(test),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async code: a thread with a runtime of its own does the work.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let pool = pool().await;
                let statement = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&pool)
                    .await
                    .expect("drop the test schema");
            });
        });
        let _ = done.join();
    }
}

/// A schema name no other test (or run) uses.
pub fn unique_schema(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let tag: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(24)
        .collect::<String>()
        .to_ascii_lowercase();
    format!(
        "tidem_{}_{}_{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated `PgStore` in a fresh schema, and the guard that drops it.
pub async fn store(test: &str) -> (PgStore, Schema) {
    let schema = Schema {
        name: unique_schema(test),
    };
    let store = PgStore::new(pool_named(schema.name()).await)
        .schema(schema.name())
        .expect("a plain schema name");
    store.migrate().await.expect("migrate the test schema");
    (store, schema)
}

/// Polls `sql` (one boolean, or no row) on `pool` until it is true; fails the test, naming
/// `what`, after 20 s.
pub async fn wait_until(pool: &PgPool, sql: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_optional(pool)
            .await
            .unwrap()
            .flatten();
        if done == Some(true) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
