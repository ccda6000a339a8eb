//! An in-process cache of completed records (feature `cache`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::sync::Cache;

use crate::record::CompletedRecord;

/// A bounded in-process cache of **completed** records, so that replaying a hot key needs no
/// store round trip. Give it to [`IdempotencyLayer::local_cache`](crate::IdempotencyLayer::local_cache).
///
/// - Only completed records are cached, never running claims: a duplicate of a running request
///   always asks the store.
/// - An entry never outlives the record's expiry in the store (the record carries its expiry
///   time, measured on the wall clock of the instance that completed it).
/// - Bounded by entries and by bytes (the encoded record size); the least recently used entries
///   go first.
///
/// The trade-off: the cache does not hear about changes made to the store behind its back. A
/// record deleted by hand in Redis is still replayed by an instance that cached it, until the
/// record's original expiry. Clones share the same cache.
#[derive(Clone)]
pub struct LocalCache {
    inner: Cache<Arc<str>, Arc<CompletedRecord>, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

struct UntilRecordExpires;

impl Expiry<Arc<str>, Arc<CompletedRecord>> for UntilRecordExpires {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        record: &Arc<CompletedRecord>,
        _: Instant,
    ) -> Option<Duration> {
        Some(remaining(record))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn remaining(record: &CompletedRecord) -> Duration {
    Duration::from_millis(record.expires_at_ms.saturating_sub(now_ms()))
}

impl LocalCache {
    /// A cache of at most `max_entries` records and `max_bytes` bytes of records.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        let max_entries = max_entries.max(1);
        // Each entry weighs at least max_bytes / max_entries, so the weight bound caps the entry
        // count as well as the bytes.
        let floor = (max_bytes / max_entries).max(1);
        let inner = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |_, record: &Arc<CompletedRecord>| {
                let weight = (record.encoded_len() as u64).max(floor);
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(UntilRecordExpires)
            // Keys are digests; foldhash (seeded per process) is several times cheaper than the
            // default SipHash on them.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { inner }
    }

    /// The number of cached records (approximate: pending evictions may not have run yet).
    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<CompletedRecord>> {
        self.inner.get(key).filter(|r| !remaining(r).is_zero())
    }

    pub(crate) fn insert(&self, key: &str, record: CompletedRecord) {
        if !remaining(&record).is_zero() {
            self.inner.insert(key.into(), Arc::new(record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn record(body: usize, ttl_ms: u64) -> CompletedRecord {
        CompletedRecord::new(
            Fingerprint::from_bytes([1; 32]),
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![0; body]),
            false,
        )
        .with_expiry(now_ms() + ttl_ms)
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let cache = LocalCache::new(10, 1_000_000);
        for i in 0..100 {
            cache.insert(&format!("k{i}"), record(10, 60_000));
        }
        assert!(cache.entry_count() <= 10, "{}", cache.entry_count());
        let cache = LocalCache::new(1000, 10_000);
        for i in 0..100 {
            cache.insert(&format!("k{i}"), record(1000, 60_000));
        }
        assert!(cache.entry_count() <= 10, "{}", cache.entry_count());
    }

    #[test]
    fn never_outlives_the_record() {
        let cache = LocalCache::new(10, 1_000_000);
        cache.insert("expired", record(1, 0));
        assert!(cache.get("expired").is_none());
        cache.insert("short", record(1, 150));
        assert!(cache.get("short").is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.get("short").is_none());
        // A record without a known expiry is never cached.
        cache.insert("unknown", record(1, 0).with_expiry(0));
        assert!(cache.get("unknown").is_none());
    }
}
