//! The operator's reads and deletes on Redis: `GET` a key without claiming it, and forget a
//! completed record with a script (check and delete in one step, so a key claimed meanwhile is
//! never deleted).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;

use super::RedisStore;
use super::command::{FORGET, command};
use crate::clock::unix_ms;
use crate::record::Stored;
use crate::store::{Lookup, StoreError};

/// The first bytes of a completed record: encoding version 1, tag `D` (see `record/encoding.rs`).
const COMPLETED_PREFIX: [u8; 2] = [1, b'D'];

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(super) async fn lookup_value(&self, key: &str) -> Result<Lookup, StoreError> {
        let key = self.key(key);
        let value: Option<Bytes> = self
            .query(command("GET", 2, key.len()).arg(key))
            .await
            .map_err(StoreError::backend)?;
        let Some(value) = value else {
            return Ok(Lookup::Absent);
        };
        Ok(match Stored::decode(value)? {
            Stored::Running(r) => Lookup::Running {
                fingerprint: r.fingerprint,
                retry_after: Duration::from_millis(r.deadline_ms.saturating_sub(unix_ms())),
            },
            Stored::Completed(record) => Lookup::Completed(record),
        })
    }

    pub(super) async fn forget_value(&self, key: &str) -> Result<bool, StoreError> {
        let deleted: u64 = self
            .eval(&FORGET, self.key(key), &[&COMPLETED_PREFIX])
            .await
            .map_err(StoreError::backend)?;
        Ok(deleted == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use crate::record::CompletedRecord;

    #[test]
    fn completed_records_start_with_the_prefix() {
        let record = CompletedRecord::new(
            Fingerprint([0; 32]),
            http::StatusCode::OK,
            std::time::UNIX_EPOCH,
        );
        assert_eq!(record.encode()[..2], COMPLETED_PREFIX);
    }
}
