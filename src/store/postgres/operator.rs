//! The operator's read and delete on Postgres: one statement each, on the database's clock.

use sqlx::AssertSqlSafe;

use super::{PgStore, held};
use crate::store::{Claim, Lookup, StoreError};

impl PgStore {
    pub(super) async fn lookup_row(&self, key: &str) -> Result<Lookup, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.lookup.clone()))
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        let Some(row) = row else {
            return Ok(Lookup::Absent);
        };
        Ok(match held(&row)? {
            Some(Claim::InFlight {
                fingerprint,
                retry_after,
            }) => Lookup::Running {
                fingerprint,
                retry_after,
            },
            Some(Claim::Completed(record)) => Lookup::Completed(record),
            _ => Lookup::Absent,
        })
    }

    pub(super) async fn forget_row(&self, key: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query(AssertSqlSafe(self.sql.forget.clone()))
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(deleted.rows_affected() == 1)
    }
}
