//! The Postgres store (feature `postgres`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::{Attempt, Claim, Fenced, IdempotencyStore, Lookup, StoreError};
use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;

mod operator;
mod statements;
mod transaction;

pub use statements::InvalidIdentifier;
use statements::{Statements, identifier};
use transaction::SharedTx;
pub use transaction::{PgToken, PgTx};

/// The table used unless [`PgStore::table`] names another.
pub const DEFAULT_TABLE: &str = "idempotency_keys";
/// The schema used unless [`PgStore::schema`] names another.
pub const DEFAULT_SCHEMA: &str = "public";

/// An [`IdempotencyStore`] on Postgres: one row per scoped key, in a table of its own in the
/// application's database, so services that run Postgres and no Redis have a store they already
/// operate.
///
/// # Table
///
/// ```sql
/// CREATE TABLE public.idempotency_keys (
///     key         text PRIMARY KEY,     -- the layer's scoped key
///     owner       bytea NOT NULL,       -- the attempt that claimed it
///     fingerprint bytea NOT NULL,       -- its request's fingerprint
///     record      bytea,                -- the completed record; NULL while running
///     expires_at  timestamptz NOT NULL  -- the lease while running, the record TTL once completed
/// );
/// ```
///
/// [`PgStore::migrate`] creates it (and its schema and the index the purge uses) if missing;
/// `migrations/postgres.sql` holds the same statements for the default names, for your own
/// migration tool.
///
/// # Statements
///
/// | operation | statement | round trips |
/// |---|---|---|
/// | claim | a read of the live row that holds the key and, only when there is none, `INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <= now`, in one statement (a replay takes no row lock) | 1 |
/// | renew | `UPDATE … WHERE key = $1 AND owner = $2 AND record IS NULL AND expires_at > now` | 1 |
/// | complete | `UPDATE … SET record = $3 WHERE key = $1 AND owner = $2 AND (record IS NULL OR record = $3)` | 1 |
/// | release | `DELETE … WHERE key = $1 AND owner = $2 AND record IS NULL` | 1 |
///
/// Leases and expiries are computed with the database's clock (`clock_timestamp()`), so
/// instances with skewed clocks agree. An expired row counts as absent: a claim takes it over.
/// Expired rows are deleted by [`PgStore::purge_expired`] in bounded batches, which
/// [`PgStore::spawn_purger`] runs periodically.
///
/// A completion is fenced on the owner only: once a complete has updated the row, its lease no
/// longer matters, and a competing claim waits on the row lock and then finds the record.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    sql: Arc<Statements>,
    transactional: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.sql.schema)
            .field("table", &self.sql.table)
            .field("transactional", &self.transactional)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A store on `pool`, in table `idempotency_keys` of schema `public`. Call
    /// [`migrate`](Self::migrate) once (or run `migrations/postgres.sql`) before use.
    ///
    /// Size the pool for the requests in flight: each holds a connection only during a store
    /// operation. A pool that has none free makes the operation wait, within the layer's store
    /// timeout.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(DEFAULT_SCHEMA, DEFAULT_TABLE)),
            transactional: false,
        }
    }

    /// Runs each claimed request's handler in a transaction of its own on the pool, which the
    /// handler joins through the [`PgTx`] extractor, and writes the completed record **inside
    /// that transaction**, fenced on the attempt, before committing it: the handler's writes
    /// and its stored response commit together or not at all.
    ///
    /// - A process that dies before the commit leaves neither; the retry after the lease runs
    ///   the handler once.
    /// - An attempt whose lease lapsed and was taken over finds the key no longer its own when
    ///   it completes: everything rolls back and its client gets `409` (`LeaseLost`), so even a
    ///   stalled instance cannot apply its writes after another attempt did.
    /// - An answer that is not stored (5xx by default, a panic) rolls back and releases the key.
    /// - A commit that fails answers `503` (`CommitFailed`) and releases the key: if the commit
    ///   did happen after all, the release finds the key completed and leaves it, and the retry
    ///   replays; if not, the retry runs once.
    ///
    /// It covers writes in this database only: a call from the handler to another system
    /// happens whatever the transaction does (forward the key to it). The lease is renewed on
    /// other connections while the handler runs, so each request in flight holds two
    /// connections at times: size the pool for that.
    ///
    /// Defaults to `false`: the handler's writes are its own, and the record is stored after.
    pub fn transactional(mut self, enabled: bool) -> Self {
        self.transactional = enabled;
        self
    }

    /// Sets the table's schema.
    ///
    /// Defaults to `public`.
    pub fn schema(self, schema: &str) -> Result<Self, InvalidIdentifier> {
        let table = self.sql.table.clone();
        self.named(identifier(schema)?, &table)
    }

    /// Sets the table's name.
    ///
    /// Defaults to `idempotency_keys`.
    pub fn table(self, table: &str) -> Result<Self, InvalidIdentifier> {
        let schema = self.sql.schema.clone();
        self.named(&schema, identifier(table)?)
    }

    fn named(mut self, schema: &str, table: &str) -> Result<Self, InvalidIdentifier> {
        self.sql = Arc::new(Statements::new(schema, table));
        Ok(self)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The statements that create the schema, the table and its expiry index, each
    /// `IF NOT EXISTS`.
    pub fn ddl(&self) -> Vec<String> {
        self.sql.ddl()
    }

    /// Creates the schema, the table and its index if they are missing. Safe to call at every
    /// start, from several instances at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
        // Concurrent `CREATE … IF NOT EXISTS` can still collide; one transaction-scoped lock
        // makes starting instances take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(7402341651820437)")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::backend)?;
        for statement in self.ddl() {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
        }
        tx.commit().await.map_err(StoreError::backend)
    }

    /// Deletes up to `batch` expired rows; returns how many. Rows another transaction holds are
    /// skipped, so a purge never waits on a request.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(done.rows_affected())
    }

    /// Runs [`purge_expired`](Self::purge_expired) every `every`, in batches of `batch` until a
    /// batch comes back short, in a task of its own. Errors are logged and retried at the next
    /// tick. Abort the returned handle to stop it.
    pub fn spawn_purger(&self, every: Duration, batch: u32) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                loop {
                    match store.purge_expired(batch).await {
                        Ok(n) if n == u64::from(batch) => continue,
                        Ok(_) => break,
                        Err(err) => {
                            tracing::warn!(error = %err, "purging expired idempotency rows failed");
                            break;
                        }
                    }
                }
            }
        })
    }

    async fn fenced(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Fenced, StoreError> {
        let done = query
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(if done.rows_affected() == 1 {
            Fenced::Applied
        } else {
            Fenced::NotOwner
        })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, crate::config::MAX_TTL.as_millis() as i64)
}

/// What a claim found in the row that holds the key.
fn held(row: &PgRow) -> Result<Option<Claim<()>>, StoreError> {
    let get = |name| -> Result<Option<Vec<u8>>, StoreError> {
        row.try_get(name).map_err(StoreError::corrupt)
    };
    let left_ms: i64 = row.try_get("left_ms").map_err(StoreError::corrupt)?;
    if left_ms <= 0 {
        // Expired in the snapshot the read saw: not an answer.
        return Ok(None);
    }
    if let Some(record) = get("record")? {
        return Ok(Some(Claim::Completed(CompletedRecord::decode(
            Bytes::from(record),
        )?)));
    }
    let fingerprint = get("fingerprint")?
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| StoreError::corrupt("a running row without a 32-byte fingerprint"))?;
    Ok(Some(Claim::InFlight {
        fingerprint: Fingerprint::from_bytes(fingerprint),
        retry_after: Duration::from_millis(left_ms.unsigned_abs()),
    }))
}

impl IdempotencyStore for PgStore {
    type Token = PgToken;

    async fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> Result<Claim<PgToken>, StoreError> {
        let token = || PgToken {
            attempt: *attempt,
            tx: None,
        };
        // A few tries: each misses only when another claim of the key committed while this
        // statement ran.
        for _ in 0..3 {
            let row = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
                .bind(key)
                .bind(&attempt.owner()[..])
                .bind(&attempt.fingerprint().as_bytes()[..])
                .bind(millis(lease))
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let Some(row) = row else { continue };
            if row
                .try_get::<bool, _>("acquired")
                .map_err(StoreError::corrupt)?
            {
                return Ok(Claim::Acquired(token()));
            }
            // This attempt's own running row: a claim sent again after its answer was lost.
            let owner: Option<Vec<u8>> = row.try_get("owner").map_err(StoreError::corrupt)?;
            let record: Option<Vec<u8>> = row.try_get("record").map_err(StoreError::corrupt)?;
            if record.is_none() && owner.as_deref() == Some(&attempt.owner()[..]) {
                return Ok(Claim::Acquired(token()));
            }
            match held(&row)? {
                Some(Claim::InFlight {
                    fingerprint,
                    retry_after,
                }) => {
                    return Ok(Claim::InFlight {
                        fingerprint,
                        retry_after,
                    });
                }
                Some(Claim::Completed(record)) => return Ok(Claim::Completed(record)),
                _ => {}
            }
        }
        Err(StoreError::backend(
            "the key changed hands during every try of the claim",
        ))
    }

    async fn renew(
        &self,
        key: &str,
        token: &mut PgToken,
        lease: Duration,
    ) -> Result<Fenced, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
            .bind(key)
            .bind(&token.attempt.owner()[..])
            .bind(millis(lease));
        self.fenced(query).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &PgToken,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<Fenced, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.sql.complete.clone()))
            .bind(key)
            .bind(&token.attempt.owner()[..])
            .bind(record.encode())
            .bind(millis(ttl));
        let Some(shared) = &token.tx else {
            return self.fenced(query).await;
        };
        // The record goes in the handler's transaction, which commits only if this attempt
        // still owns the key.
        let tx = shared.try_lock().ok().and_then(|mut slot| slot.take());
        let Some(mut tx) = tx else {
            return Err(StoreError::backend(
                "the handler still holds the request's transaction (or it has ended)",
            ));
        };
        let done = query.execute(&mut *tx).await.map_err(StoreError::backend)?;
        if done.rows_affected() != 1 {
            tx.rollback().await.map_err(StoreError::backend)?;
            return Ok(Fenced::NotOwner);
        }
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(Fenced::Applied)
    }

    async fn release(&self, key: &str, attempt: &Attempt) -> Result<Fenced, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.sql.release.clone()))
            .bind(key)
            .bind(&attempt.owner()[..]);
        self.fenced(query).await
    }

    /// In transactional mode, opens the handler's transaction and hands it a [`PgTx`].
    async fn prepare(
        &self,
        token: &mut PgToken,
        extensions: &mut http::Extensions,
    ) -> Result<(), StoreError> {
        let tx = self.pool.begin().await.map_err(StoreError::backend)?;
        let shared: SharedTx = Arc::new(tokio::sync::Mutex::new(Some(tx)));
        extensions.insert(PgTx(shared.clone()));
        token.tx = Some(shared);
        Ok(())
    }

    fn commits_handler_writes(&self, _token: &PgToken) -> bool {
        self.transactional
    }

    async fn lookup(&self, key: &str) -> Result<Lookup, StoreError> {
        self.lookup_row(key).await
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.forget_row(key).await
    }
}
