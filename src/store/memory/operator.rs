//! The operator's reads and deletes on the memory store: look a key up without claiming it,
//! forget a completed record.

use bytes::Bytes;
use tokio::time::Instant;

use super::MemoryStore;
use super::digest::Key;
use super::shard::Entry;
use crate::record::CompletedRecord;
use crate::store::{Lookup, StoreError};

/// What a lookup found in its shard; a record is decoded outside the lock.
enum Found {
    Absent,
    Running(Lookup),
    Completed(Bytes),
}

impl MemoryStore {
    pub(super) fn lookup_entry(&self, key: &str) -> Result<Lookup, StoreError> {
        let now = Instant::now();
        let key = Key::of(key);
        let found = match self.shard(key).get(key) {
            Some(Entry::Running {
                fingerprint,
                deadline,
                ..
            }) if *deadline > now => Found::Running(Lookup::Running {
                fingerprint: *fingerprint,
                retry_after: *deadline - now,
            }),
            Some(Entry::Completed { record, expires }) if *expires > now => {
                Found::Completed(record.clone())
            }
            _ => Found::Absent,
        };
        Ok(match found {
            Found::Absent => Lookup::Absent,
            Found::Running(running) => running,
            Found::Completed(record) => Lookup::Completed(CompletedRecord::decode(record)?),
        })
    }

    pub(super) fn forget_entry(&self, key: &str) -> bool {
        let now = Instant::now();
        let key = Key::of(key);
        let mut inner = self.shard(key);
        let completed =
            matches!(inner.get(key), Some(Entry::Completed { expires, .. }) if *expires > now);
        if !completed {
            return false;
        }
        if let Some(forgotten) = inner.remove(key) {
            self.shared.forget((1, forgotten.bytes()));
        }
        true
    }
}
