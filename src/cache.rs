//! An in-process cache of completed records (feature `cache`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quick_cache::OptionsBuilder;
use quick_cache::sync::Cache;

use crate::clock::unix_ms;
use crate::record::CompletedRecord;

/// A bounded in-process cache of **completed** records, so that replaying a hot key needs no
/// store round trip. Give it to [`IdempotencyLayer::local_cache`](crate::IdempotencyLayer::local_cache).
///
/// - Only completed records are cached, never running claims: a duplicate of a running request
///   always asks the store.
/// - An entry is never served past the record's expiry in the store (the record carries its
///   expiry time, measured on the wall clock of the instance that completed it), and expired
///   entries are swept out as new ones come in, so they do not hold memory for long either.
/// - Bounded by entries and by bytes (the encoded record size); entries that are seldom asked
///   for go first (S3-FIFO, from the `quick_cache` crate).
///
/// The trade-off: the cache does not hear about changes made to the store behind its back. A
/// record deleted by hand in Redis is still replayed by an instance that cached it, until the
/// record's original expiry. Clones share the same cache.
#[derive(Clone)]
pub struct LocalCache {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Cache<Arc<str>, Arc<CompletedRecord>, Weight, foldhash::fast::RandomState>,
    /// Inserts since the last sweep of expired entries.
    inserts: AtomicUsize,
    /// Inserts between sweeps: the number of entries the last sweep left (at least 64), so a
    /// sweep's cost is paid for by as many inserts.
    sweep_every: AtomicUsize,
}

/// An entry weighs its encoded size, and at least `floor` (`max_bytes / max_entries`), so that
/// the weight bound caps the entry count as well as the bytes.
#[derive(Clone)]
struct Weight {
    floor: u64,
}

impl quick_cache::Weighter<Arc<str>, Arc<CompletedRecord>> for Weight {
    fn weight(&self, _: &Arc<str>, record: &Arc<CompletedRecord>) -> u64 {
        (record.encoded_len() as u64).max(self.floor)
    }
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("entries", &self.inner.cache.len())
            .field("bytes", &self.inner.cache.weight())
            .finish()
    }
}

/// The least share of `max_bytes` a shard gets, so that a record of up to about this size is
/// cached whenever `max_bytes` allows it.
const SHARD_MIN_BYTES: u64 = 1 << 20;

fn prev_power_of_two(n: usize) -> usize {
    if n.is_power_of_two() {
        n
    } else {
        n.next_power_of_two() / 2
    }
}

fn remaining(record: &CompletedRecord) -> Duration {
    Duration::from_millis(record.expires_at_ms().saturating_sub(unix_ms()))
}

impl LocalCache {
    /// A cache of at most `max_entries` records and `max_bytes` bytes of records.
    ///
    /// The cache is split into shards (fewer locks to contend on), each with its share of
    /// `max_bytes`; a record larger than about one shard's share is not cached. There are as
    /// many shards as leave each at least 1 MiB (the layer's default `max_response_body`), up
    /// to four per CPU, and one when `max_bytes` is under 2 MiB.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        let max_entries = max_entries.max(1);
        let max_bytes = max_bytes.max(1);
        let floor = (max_bytes / max_entries).max(1);
        // No record encodes to less than 46 bytes, so the bytes bound the entries too; the
        // estimate also sizes the cache's memory of recently evicted keys.
        let items = max_entries.min(max_bytes / 46).max(1);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let by_size = usize::try_from(max_bytes / SHARD_MIN_BYTES).unwrap_or(usize::MAX);
        let shards = prev_power_of_two(by_size.min(cpus * 4).max(1));
        let options = OptionsBuilder::new()
            .estimated_items_capacity(usize::try_from(items).unwrap_or(usize::MAX))
            .weight_capacity(max_bytes)
            .shards(shards)
            .build()
            .expect("valid cache options");
        let cache = Cache::with_options(
            options,
            Weight { floor },
            foldhash::fast::RandomState::default(),
            Default::default(),
        );
        Self {
            inner: Arc::new(Inner {
                cache,
                inserts: AtomicUsize::new(0),
                sweep_every: AtomicUsize::new(64),
            }),
        }
    }

    /// The number of cached records, expired ones not yet swept included.
    pub fn entry_count(&self) -> u64 {
        self.inner.cache.len() as u64
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<CompletedRecord>> {
        let record = self.inner.cache.get(key)?;
        if remaining(&record).is_zero() {
            // Only if still expired: a fresh record may have replaced it meanwhile.
            self.inner.cache.remove_if(key, |r| remaining(r).is_zero());
            return None;
        }
        Some(record)
    }

    /// Drops `key`'s record (the operator forgot the key).
    pub(crate) fn remove(&self, key: &str) {
        self.inner.cache.remove(key);
    }

    pub(crate) fn insert(&self, key: &str, record: CompletedRecord) {
        if remaining(&record).is_zero() {
            return;
        }
        self.inner.cache.insert(key.into(), Arc::new(record));
        // Sweep expired entries once as many inserts as the last sweep left entries have
        // happened: O(1) per insert, amortized, and an expired entry holds its memory only until
        // the cache has turned over about once.
        let inserts = self.inner.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        // One sweeper: the insert that resets the count.
        if inserts >= self.inner.sweep_every.load(Ordering::Relaxed)
            && self
                .inner
                .inserts
                .compare_exchange(inserts, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let now = unix_ms();
            self.inner.cache.retain(|_, r| r.expires_at_ms() > now);
            let left = self.inner.cache.len().max(64);
            self.inner.sweep_every.store(left, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;
    use bytes::Bytes;
    use http::StatusCode;

    fn record(body: usize, ttl_ms: u64) -> CompletedRecord {
        CompletedRecord::new(
            Fingerprint::from_bytes([1; 32]),
            StatusCode::OK,
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms() + ttl_ms),
        )
        .with_body(Bytes::from(vec![0; body]))
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
    }

    #[test]
    fn expired_entries_are_swept_as_new_ones_come() {
        let cache = LocalCache::new(10_000, 100_000_000);
        for i in 0..200 {
            cache.insert(&format!("old{i}"), record(1, 100));
        }
        assert_eq!(cache.entry_count(), 200);
        std::thread::sleep(Duration::from_millis(200));
        // Without a lookup of the old keys, the inserts alone sweep them out.
        for i in 0..200 {
            cache.insert(&format!("new{i}"), record(1, 60_000));
        }
        assert!(cache.entry_count() <= 200, "{}", cache.entry_count());
        assert!(cache.get("new199").is_some());
    }

    /// The cache is sharded, each shard holding a share of the bytes: a record of a few hundred
    /// KB must still be cached in a 1 MB cache, whatever the number of CPUs.
    #[test]
    fn large_records_within_the_bytes_bound_are_cached() {
        let cache = LocalCache::new(10_000, 1_000_000);
        cache.insert("big", record(200_000, 60_000));
        assert!(cache.get("big").is_some());
        let cache = LocalCache::new(10_000, 64 << 20);
        cache.insert("big", record(900_000, 60_000));
        assert!(cache.get("big").is_some());
        // Larger than the whole cache: never cached.
        let cache = LocalCache::new(10, 1_000);
        cache.insert("huge", record(5_000, 60_000));
        assert!(cache.get("huge").is_none());
    }

    /// Memory stays proportional to `max_bytes` even when `max_entries` is set far higher
    /// than the bytes allow (the cache's memory of evicted keys is sized from the entries).
    #[test]
    fn memory_follows_the_bytes_bound() {
        let cache = LocalCache::new(10_000_000, 100_000);
        for i in 0..200_000 {
            cache.insert(&format!("k{i}"), record(10, 60_000));
        }
        let used = cache.inner.cache.memory_used();
        let total = used.entries + used.map;
        assert!(total < 2_000_000, "{used:?}");
    }
}
