//! An in-process store with the same semantics as the Redis store.

mod digest;
mod operator;
mod shard;
#[cfg(test)]
mod tests;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Attempt, Claim, Fenced, IdempotencyStore, Lookup, StoreError};
use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;

use self::digest::Key;
use self::shard::{Entry, Inner, deadline, lock};

/// An in-process [`IdempotencyStore`]: owners, leases and TTLs behave exactly as in
/// [`RedisStore`](crate::RedisStore), but entries live in this process only.
///
/// Use it for tests, examples and single-instance deployments. Several instances of a service
/// behind a load balancer need a shared store (Redis), or a duplicate reaching another instance
/// runs again.
///
/// Entries are spread over 64 shards, each behind its own lock: concurrent requests seldom
/// wait for each other, and growing or sweeping a shard holds up only the requests whose keys
/// fall in it, for a sixty-fourth of the time a single table would (measured at four million
/// records: 28 ms for a shard, against 1.9 s for one table). Expired entries are removed
/// as new keys are claimed (a shard is swept whenever the number of claims in it since its last
/// sweep reaches the number of entries that sweep left), so memory stays proportional to the live
/// entries and sweeping costs O(1) per claim, amortized. Completed records are kept
/// encoded, as Redis keeps them: one allocation each, about the size of the body and its
/// headers; a replay decodes its record and shares the body. Time is [`tokio::time::Instant`],
/// so tests with a paused clock can move TTLs forward.
///
/// # Bounds
///
/// The store holds at most [`max_entries`](Self::max_entries) entries (1,000,000 by default)
/// and [`max_bytes`](Self::max_bytes) bytes (1 GiB by default). A completed record counts its
/// encoded length (about its body and headers); a running claim counts 64 bytes. Expired
/// entries count until they are swept.
///
/// When a bound is reached, a claim of a new key (absent, or expired) first sweeps the expired
/// entries of the whole store; if that does not make room, the claim fails with
/// [`StoreError::Backend`], which the layer answers with `503` (or, with
/// [`fail_open`](crate::IdempotencyLayer::fail_open), by running the handler unprotected). A
/// claim of a key the store holds is answered as usual, and live entries are never evicted to
/// make room. The bounds are checked when a key is claimed: a handler that already ran always
/// has its record stored, so `max_bytes` can be exceeded by the responses of the requests in
/// flight when it was reached. [`unbounded`](Self::unbounded) lifts both bounds.
///
/// Clones share the same entries and the same bounds.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

const SHARDS: usize = 64;

struct Shared {
    shards: [Mutex<Inner>; SHARDS],
    /// Picks a key's shard. (The layer's digests are uniform, but keys from direct use of the
    /// store need not be.)
    hasher: foldhash::fast::RandomState,
    /// The entries held and their bytes, changed under the lock of the shard that changes.
    entries: AtomicUsize,
    bytes: AtomicUsize,
    max_entries: AtomicUsize,
    max_bytes: AtomicUsize,
    /// When the next "store full" warning may be logged, in milliseconds since `created`.
    next_warning: AtomicU64,
    created: Instant,
}

/// What a running claim counts against `max_bytes`: its owner token, fingerprint and deadline.
const RUNNING_BYTES: usize = 64;
const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
const DEFAULT_MAX_BYTES: usize = 1 << 30;
/// The least time between two "store full" warnings.
const WARN_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .field("max_entries", &self.shared.max_entries.load(Relaxed))
            .field("max_bytes", &self.shared.max_bytes.load(Relaxed))
            .finish()
    }
}

impl MemoryStore {
    /// Creates an empty store with the default bounds.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                shards: std::array::from_fn(|_| Mutex::default()),
                hasher: foldhash::fast::RandomState::default(),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_entries: AtomicUsize::new(DEFAULT_MAX_ENTRIES),
                max_bytes: AtomicUsize::new(DEFAULT_MAX_BYTES),
                next_warning: AtomicU64::new(0),
                created: Instant::now(),
            }),
        }
    }

    /// Creates an empty store without bounds: it grows with the live entries, however many.
    pub fn unbounded() -> Self {
        Self::new().max_entries(usize::MAX).max_bytes(usize::MAX)
    }

    /// Sets the most entries (running claims and completed records) the store holds; beyond
    /// it, new keys are refused. A store holds about as many records as it takes new keys in a
    /// record TTL: the default covers 11 new keys a second kept for the layer's default 24 hours.
    ///
    /// Defaults to 1,000,000. `usize::MAX` lifts the bound. Sets it for every clone.
    pub fn max_entries(self, max: usize) -> Self {
        self.shared.max_entries.store(max, Relaxed);
        self
    }

    /// Sets the most bytes the store holds: the encoded length of each completed record and
    /// 64 bytes for each running claim. Beyond it, new keys are refused; a request already
    /// running always stores its response, so the bound can be exceeded by the responses of
    /// the requests in flight.
    ///
    /// Defaults to 1 GiB. `usize::MAX` lifts the bound. Sets it for every clone.
    pub fn max_bytes(self, max: usize) -> Self {
        self.shared.max_bytes.store(max, Relaxed);
        self
    }

    /// The number of entries held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.shared.entries.load(Relaxed)
    }

    /// The bytes held, as counted against [`max_bytes`](Self::max_bytes), including those of
    /// expired entries not yet swept.
    pub fn bytes(&self) -> usize {
        self.shared.bytes.load(Relaxed)
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shard that holds `key`, locked.
    fn shard(&self, key: Key<'_>) -> MutexGuard<'_, Inner> {
        let index = match key {
            Key::Digest(n) => self.shared.hasher.hash_one(n),
            Key::Named(name) => self.shared.hasher.hash_one(name),
        } as usize;
        lock(&self.shared.shards[index % SHARDS])
    }

    /// Claims `key` if it is free and the bounds allow it, or finds what holds it. A record is
    /// decoded by the caller, outside the shard's lock.
    fn try_claim(&self, key: Key<'_>, attempt: &Attempt, lease: Duration, now: Instant) -> Found {
        let mut inner = self.shard(key);
        if inner.sweep_due() {
            self.shared.forget(inner.sweep(now));
        }
        match inner.get(key) {
            Some(Entry::Running {
                fingerprint,
                deadline,
                ..
            }) if *deadline > now => {
                return Found::InFlight {
                    fingerprint: *fingerprint,
                    retry_after: *deadline - now,
                };
            }
            Some(Entry::Completed { record, expires }) if *expires > now => {
                return Found::Completed(record.clone());
            }
            // Expired: gone before the new claim is counted in.
            Some(_) => {
                if let Some(expired) = inner.remove(key) {
                    self.shared.forget((1, expired.bytes()));
                }
            }
            None => {}
        }
        if !self.shared.admit(RUNNING_BYTES) {
            return Found::Full;
        }
        inner.insert(key, Entry::running(attempt, deadline(now, lease)));
        Found::Acquired
    }

    /// Sweeps every shard where an entry may have expired.
    fn sweep_expired(&self, now: Instant) {
        for shard in &self.shared.shards {
            let mut inner = lock(shard);
            if inner.next_expiry.is_some_and(|t| t <= now) {
                self.shared.forget(inner.sweep(now));
            }
        }
    }

    /// The error for a claim refused because the store is full; counted, and logged at most
    /// once every `WARN_EVERY`.
    fn full(&self, now: Instant) -> StoreError {
        let (entries, bytes) = (self.len(), self.bytes());
        let max_entries = self.shared.max_entries.load(Relaxed);
        let max_bytes = self.shared.max_bytes.load(Relaxed);
        crate::metrics::count(crate::metrics::MEMORY_STORE_FULL);
        if self.shared.warning_due(now) {
            tracing::warn!(
                entries,
                bytes,
                max_entries,
                max_bytes,
                "memory store full: new idempotency keys are refused until entries expire or are released"
            );
        }
        StoreError::backend(format!(
            "memory store full: {entries} entries / {bytes} bytes held, bounds {max_entries} / \
             {max_bytes}; new keys are refused until entries expire or are released"
        ))
    }

    /// Replaces the entry of `key` in place (no key allocation) with `next` if `attempt` still
    /// owns it. A completed entry that already holds the record `next` would write (a complete
    /// repeated after it applied) answers `Applied` too.
    fn replace_owned(&self, key: &str, attempt: &Attempt, next: Next) -> Fenced {
        let now = Instant::now();
        let key = Key::of(key);
        let mut inner = self.shard(key);
        match inner.get_mut(key) {
            Some(entry) if entry.is_owned_by(attempt, now) => {
                let new = match next {
                    Next::Running { lease } => Entry::running(attempt, deadline(now, lease)),
                    Next::Completed { record, ttl } => Entry::Completed {
                        record,
                        expires: deadline(now, ttl),
                    },
                };
                let expires = new.expires();
                self.shared.resize(entry.bytes(), new.bytes());
                *entry = new;
                inner.expires_by(expires);
                Fenced::Applied
            }
            Some(Entry::Completed {
                record: held,
                expires,
            }) if *expires > now
                && matches!(&next, Next::Completed { record, .. } if record == held) =>
            {
                Fenced::Applied
            }
            _ => Fenced::NotOwner,
        }
    }
}

/// What a claim found in its shard: the answer, the record to decode outside the lock, or no
/// room for a new key.
enum Found {
    Acquired,
    InFlight {
        fingerprint: Fingerprint,
        retry_after: Duration,
    },
    Completed(Bytes),
    Full,
}

/// What [`MemoryStore::replace_owned`] writes.
enum Next {
    Running { lease: Duration },
    Completed { record: Bytes, ttl: Duration },
}

impl Shared {
    /// Counts in a new entry of `bytes`, unless that would pass a bound.
    fn admit(&self, bytes: usize) -> bool {
        let entries_before = self.entries.fetch_add(1, Relaxed);
        let bytes_before = self.bytes.fetch_add(bytes, Relaxed);
        if entries_before < self.max_entries.load(Relaxed)
            && bytes_before.saturating_add(bytes) <= self.max_bytes.load(Relaxed)
        {
            return true;
        }
        self.forget((1, bytes));
        false
    }

    /// Counts out removed entries: how many, and their bytes.
    fn forget(&self, (entries, bytes): (usize, usize)) {
        if entries > 0 {
            self.entries.fetch_sub(entries, Relaxed);
            self.bytes.fetch_sub(bytes, Relaxed);
        }
    }

    /// Whether a "store full" warning may be logged at `now`: one every `WARN_EVERY` at most.
    fn warning_due(&self, now: Instant) -> bool {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let now = ms(now.saturating_duration_since(self.created));
        let due = self.next_warning.load(Relaxed);
        let next = now.saturating_add(ms(WARN_EVERY));
        now >= due
            && (self.next_warning)
                .compare_exchange(due, next, Relaxed, Relaxed)
                .is_ok()
    }

    /// Counts an entry's change from `from` bytes to `to`.
    fn resize(&self, from: usize, to: usize) {
        if to > from {
            self.bytes.fetch_add(to - from, Relaxed);
        } else if from > to {
            self.bytes.fetch_sub(from - to, Relaxed);
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl IdempotencyStore for MemoryStore {
    /// The attempt itself: its owner token is all the store fences on.
    type Token = Attempt;

    async fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> Result<Claim<Attempt>, StoreError> {
        let now = Instant::now();
        let key = Key::of(key);
        let mut swept = false;
        loop {
            return match self.try_claim(key, attempt, lease, now) {
                Found::Acquired => Ok(Claim::Acquired(*attempt)),
                Found::InFlight {
                    fingerprint,
                    retry_after,
                } => Ok(Claim::InFlight {
                    fingerprint,
                    retry_after,
                }),
                Found::Completed(record) => Ok(Claim::Completed(CompletedRecord::decode(record)?)),
                Found::Full if swept => Err(self.full(now)),
                // Expired entries hold no room: sweep them all, and try once more.
                Found::Full => {
                    self.sweep_expired(now);
                    swept = true;
                    continue;
                }
            };
        }
    }

    async fn renew(
        &self,
        key: &str,
        attempt: &mut Attempt,
        lease: Duration,
    ) -> Result<Fenced, StoreError> {
        Ok(self.replace_owned(key, attempt, Next::Running { lease }))
    }

    async fn complete(
        &self,
        key: &str,
        attempt: &Attempt,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<Fenced, StoreError> {
        let record = Bytes::from(record.encode());
        Ok(self.replace_owned(key, attempt, Next::Completed { record, ttl }))
    }

    async fn release(&self, key: &str, attempt: &Attempt) -> Result<Fenced, StoreError> {
        let now = Instant::now();
        let key = Key::of(key);
        let mut inner = self.shard(key);
        if !inner.get(key).is_some_and(|e| e.is_owned_by(attempt, now)) {
            return Ok(Fenced::NotOwner);
        }
        if let Some(released) = inner.remove(key) {
            self.shared.forget((1, released.bytes()));
        }
        Ok(Fenced::Applied)
    }

    async fn lookup(&self, key: &str) -> Result<Lookup, StoreError> {
        self.lookup_entry(key)
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.forget_entry(key))
    }
}
