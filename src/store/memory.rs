//! An in-process store with the same semantics as the Redis store.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore, Lock, StoreError};
use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;

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

#[derive(Default)]
struct Inner {
    // The keys the layer passes are digests, 32 lowercase hex digits: kept as the 128-bit number
    // they spell, in the slot itself (no allocation per key, no pointer to follow when probing or
    // rehashing a large table). Any other key, from direct use of the store, is kept as text.
    // foldhash, seeded per process: several times cheaper than SipHash on these short keys, and
    // still not predictable from outside.
    digests: HashMap<u128, Entry, foldhash::fast::RandomState>,
    named: HashMap<Box<str>, Entry, foldhash::fast::RandomState>,
    claims_since_sweep: usize,
    /// Claims between sweeps: the number of entries left by the last sweep (at least
    /// `MIN_SWEEP_EVERY`), so a sweep's cost is paid for by as many claims.
    sweep_every: usize,
    /// No entry expires before this (`None`: the shard held nothing at its last sweep and has
    /// taken nothing since), so a full store sweeps only the shards where one may have expired.
    next_expiry: Option<Instant>,
}

/// A key as [`Inner`] files it.
#[derive(Clone, Copy)]
enum Key<'a> {
    Digest(u128),
    Named(&'a str),
}

impl<'a> Key<'a> {
    fn of(key: &'a str) -> Self {
        digest(key).map_or(Self::Named(key), Self::Digest)
    }
}

const MIN_SWEEP_EVERY: usize = 8;

/// The number spelled by exactly 32 lowercase hex digits; `None` for any other text (so no two
/// different keys map to the same number).
fn digest(key: &str) -> Option<u128> {
    digest_bytes(key.as_bytes().try_into().ok()?)
}

fn digest_bytes(bytes: &[u8; 32]) -> Option<u128> {
    let mut n = 0u128;
    for chunk in bytes.as_chunks::<8>().0 {
        n = (n << 32) | u128::from(hex8(u64::from_be_bytes(*chunk))?);
    }
    Some(n)
}

/// The number spelled by eight lowercase hex digits packed in a `u64`, the first digit in the
/// most significant byte; `None` if any byte is not one. All eight bytes at once: a quarter of
/// the instructions of a table lookup per digit.
fn hex8(x: u64) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    if x & HIGH != 0 {
        return None;
    }
    // Every byte is below 0x80 and every addend below 0x80, so no sum carries into the next
    // byte, and a byte's high bit says whether it reached the bound.
    let from_0 = x + ONES * (0x80 - u64::from(b'0'));
    let past_9 = x + ONES * (0x7f - u64::from(b'9'));
    let from_a = x + ONES * (0x80 - u64::from(b'a'));
    let past_f = x + ONES * (0x7f - u64::from(b'f'));
    let digit = from_0 & !past_9;
    let letter = from_a & !past_f;
    if (digit | letter) & HIGH != HIGH {
        return None;
    }
    // A digit's value is its low nibble; a letter's ('a' is 0x61) its low nibble plus 9.
    let v = (x & (ONES * 0x0f)) + ((letter & HIGH) >> 7) * 9;
    // Pack the eight nibbles, the first byte's on top.
    let v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    let v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    let v = (v | (v >> 16)) & 0x0000_0000_ffff_ffff;
    u32::try_from(v).ok()
}

enum Entry {
    Running {
        owner: [u8; 16],
        fingerprint: Fingerprint,
        deadline: Instant,
    },
    // The record encoded, as the Redis store keeps it: one allocation, about the size of the
    // body plus its headers, instead of a header map and its parts; a replay decodes it (the
    // body is shared, not copied).
    Completed {
        record: Bytes,
        expires: Instant,
    },
}

impl Entry {
    fn running(lock: &Lock, deadline: Instant) -> Self {
        Self::Running {
            owner: *lock.owner(),
            fingerprint: *lock.fingerprint(),
            deadline,
        }
    }

    fn expires(&self) -> Instant {
        match self {
            Self::Running { deadline, .. } => *deadline,
            Self::Completed { expires, .. } => *expires,
        }
    }

    /// What the entry counts against `max_bytes`.
    fn bytes(&self) -> usize {
        match self {
            Self::Running { .. } => RUNNING_BYTES,
            Self::Completed { record, .. } => record.len(),
        }
    }

    fn is_owned_by(&self, lock: &Lock, now: Instant) -> bool {
        matches!(self, Self::Running { owner, deadline, .. } if owner == lock.owner() && *deadline > now)
    }
}

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

    /// Claims `key` if it is free and the bounds allow it, or answers what holds it; `None` if
    /// the key is free but the store is full.
    fn try_claim(
        &self,
        key: Key<'_>,
        lock: &Lock,
        lease: Duration,
        now: Instant,
    ) -> Option<Result<Claim, StoreError>> {
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
                return Some(Ok(Claim::InFlight {
                    fingerprint: *fingerprint,
                    retry_after: *deadline - now,
                }));
            }
            Some(Entry::Completed { record, expires }) if *expires > now => {
                let record = record.clone();
                drop(inner);
                let record = CompletedRecord::decode(record).map_err(StoreError::Corrupt);
                return Some(record.map(Claim::Completed));
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
            return None;
        }
        let entry = Entry::running(lock, deadline(now, lease));
        inner.insert(key, entry);
        Some(Ok(Claim::Acquired))
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

    /// Replaces the entry of `key` in place (no key allocation) with `f(now)` if `lock` still
    /// owns it.
    fn replace_owned(&self, key: &str, lock: &Lock, f: impl FnOnce(Instant) -> Entry) -> bool {
        let now = Instant::now();
        let key = Key::of(key);
        let mut inner = self.shard(key);
        match inner.get_mut(key) {
            Some(entry) if entry.is_owned_by(lock, now) => {
                let new = f(now);
                let expires = new.expires();
                self.shared.resize(entry.bytes(), new.bytes());
                *entry = new;
                inner.expires_by(expires);
                true
            }
            _ => false,
        }
    }
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

fn lock(shard: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the map half-updated (every update is a single
    // insert or remove), so a poisoned lock is safe to keep using.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// `now + d`, saturating far in the future instead of overflowing.
fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

impl Inner {
    fn len(&self) -> usize {
        self.digests.len() + self.named.len()
    }

    fn get(&self, key: Key<'_>) -> Option<&Entry> {
        match key {
            Key::Digest(n) => self.digests.get(&n),
            Key::Named(name) => self.named.get(name),
        }
    }

    fn get_mut(&mut self, key: Key<'_>) -> Option<&mut Entry> {
        match key {
            Key::Digest(n) => self.digests.get_mut(&n),
            Key::Named(name) => self.named.get_mut(name),
        }
    }

    fn insert(&mut self, key: Key<'_>, entry: Entry) {
        self.expires_by(entry.expires());
        match key {
            Key::Digest(n) => self.digests.insert(n, entry),
            Key::Named(name) => self.named.insert(name.into(), entry),
        };
    }

    fn remove(&mut self, key: Key<'_>) -> Option<Entry> {
        match key {
            Key::Digest(n) => self.digests.remove(&n),
            Key::Named(name) => self.named.remove(name),
        }
    }

    /// Notes that an entry of the shard expires at `at`.
    fn expires_by(&mut self, at: Instant) {
        self.next_expiry = Some(self.next_expiry.map_or(at, |t| t.min(at)));
    }

    /// Counts a claim; whether the shard is now due for a sweep.
    fn sweep_due(&mut self) -> bool {
        self.claims_since_sweep += 1;
        self.claims_since_sweep >= self.sweep_every.max(MIN_SWEEP_EVERY)
    }

    /// Removes the expired entries; returns how many, and their bytes.
    fn sweep(&mut self, now: Instant) -> (usize, usize) {
        let (mut entries, mut bytes, mut next_expiry) = (0, 0, None::<Instant>);
        let mut keep = |e: &mut Entry| {
            let expires = e.expires();
            if expires > now {
                next_expiry = Some(next_expiry.map_or(expires, |t| t.min(expires)));
            } else {
                entries += 1;
                bytes += e.bytes();
            }
            expires > now
        };
        self.digests.retain(|_, e| keep(e));
        self.named.retain(|_, e| keep(e));
        self.claims_since_sweep = 0;
        self.sweep_every = self.len();
        self.next_expiry = next_expiry;
        (entries, bytes)
    }
}

impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lock: &Lock, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let key = Key::of(key);
        if let Some(claim) = self.try_claim(key, lock, lease, now) {
            return claim;
        }
        // Full: expired entries do not hold room, so sweep them all and try once more.
        self.sweep_expired(now);
        self.try_claim(key, lock, lease, now)
            .unwrap_or_else(|| Err(self.full(now)))
    }

    async fn renew(&self, key: &str, lock: &Lock, lease: Duration) -> Result<bool, StoreError> {
        Ok(self.replace_owned(key, lock, |now| Entry::running(lock, deadline(now, lease))))
    }

    async fn complete(
        &self,
        key: &str,
        lock: &Lock,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let record = Bytes::from(record.encode());
        Ok(self.replace_owned(key, lock, |now| Entry::Completed {
            record,
            expires: deadline(now, ttl),
        }))
    }

    async fn release(&self, key: &str, lock: &Lock) -> Result<bool, StoreError> {
        let now = Instant::now();
        let key = Key::of(key);
        let mut inner = self.shard(key);
        let owned = inner.get(key).is_some_and(|e| e.is_owned_by(lock, now));
        if owned && let Some(released) = inner.remove(key) {
            self.shared.forget((1, released.bytes()));
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MemoryStore {
        /// The number of entries filed under digest keys.
        fn digests(&self) -> usize {
            self.shared
                .shards
                .iter()
                .map(|s| lock(s).digests.len())
                .sum()
        }
    }

    /// Entries spread over all shards, digests and other keys alike.
    #[tokio::test]
    async fn keys_spread_over_the_shards() {
        let store = MemoryStore::new();
        for i in 0..SHARDS * 64 {
            let key = if i % 2 == 0 {
                format!(
                    "{:032x}",
                    (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                )
            } else {
                format!("key-{i}")
            };
            let lock = Lock::new(Fingerprint([0; 32]));
            store
                .claim(&key, &lock, Duration::from_secs(30))
                .await
                .unwrap();
        }
        for shard in &store.shared.shards {
            let n = lock(shard).len();
            assert!(
                (16..=112).contains(&n),
                "a shard holds {n} of {}",
                SHARDS * 64
            );
        }
        assert_counted(&store);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(1);
        // Half of the keys in the layer's digest form, half not: both kinds are swept.
        let key = |tag: &str, i: usize| match i % 2 {
            0 => format!("{tag}{i}"),
            _ => format!("{:032x}", (i as u128) << 8 | u128::from(tag.as_bytes()[0])),
        };
        for i in 0..100 {
            let lock = Lock::new(Fingerprint([0; 32]));
            store.claim(&key("k", i), &lock, lease).await.unwrap();
        }
        assert_eq!(store.len(), 100);
        assert_eq!(store.digests(), 50);
        tokio::time::advance(Duration::from_secs(2)).await;
        // A shard is swept once it has seen `MIN_SWEEP_EVERY` claims since its last sweep:
        // 5,000 claims give each of the 64 shards about 78, so every shard is swept after the
        // old entries expired (shards are picked by a seeded hash; the chance that one gets
        // fewer than 8 is below 10^-20).
        let claims = 5_000;
        for i in 0..claims {
            let lock = Lock::new(Fingerprint([0; 32]));
            store.claim(&key("n", i), &lock, lease).await.unwrap();
        }
        // The old 100 are gone; the new ones are all live.
        assert_eq!(store.len(), claims);
        assert_counted(&store);
    }

    #[test]
    fn only_lowercase_32_digit_hex_is_filed_as_a_digest() {
        let lower = "0123456789abcdef0123456789abcdef";
        assert_eq!(digest(lower), Some(0x0123456789abcdef0123456789abcdef));
        assert_eq!(digest(&"f".repeat(32)), Some(u128::MAX));
        for other in [
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            "+123456789abcdef0123456789abcdef",
            "",
        ] {
            assert_eq!(digest(other), None, "{other:?}");
        }
        // Every number round trips, and a stray byte at any position is refused.
        let mut n = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835_u128;
        for _ in 0..1000 {
            n = n.rotate_left(7).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x1234;
            let hex = format!("{n:032x}");
            assert_eq!(digest(&hex), Some(n), "{hex}");
        }
        let hex = "0123456789abcdef0123456789abcdef";
        for at in 0..32 {
            for stray in ["g", "G", "A", "/", ":", "`", " ", "\0"] {
                let key = format!("{}{stray}{}", &hex[..at], &hex[at + 1..]);
                assert_eq!(digest(&key), None, "{key:?}");
            }
            // A two-byte character in place of two digits keeps the length at 32.
            if at < 31 {
                let key = format!("{}é{}", &hex[..at], &hex[at + 2..]);
                assert_eq!(key.len(), 32);
                assert_eq!(digest(&key), None, "{key:?}");
            }
        }
    }

    /// Every byte value at every position, against an independent reading: a digest exactly
    /// when all 32 bytes are lowercase hex digits, and then the number `from_str_radix` reads.
    #[test]
    fn digest_agrees_with_from_str_radix_for_every_byte_at_every_position() {
        let base = *b"0123456789abcdef0123456789abcdef";
        for at in 0..32 {
            for byte in 0..=255u8 {
                let mut key = base;
                key[at] = byte;
                let expected =
                    (byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)).then(|| {
                        let text = std::str::from_utf8(&key).unwrap();
                        u128::from_str_radix(text, 16).unwrap()
                    });
                assert_eq!(digest_bytes(&key), expected, "byte {byte:#04x} at {at}");
            }
        }
    }

    /// Keys that spell the same number in another form are different keys.
    #[tokio::test]
    async fn digest_and_named_keys_do_not_collide() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(30);
        let keys = [
            "00000000000000000000000000000abc",
            "00000000000000000000000000000ABC",
            "abc",
            "0000000000000000000000000000000abc",
        ];
        for key in keys {
            let lock = Lock::new(Fingerprint([1; 32]));
            let claim = store.claim(key, &lock, lease).await.unwrap();
            assert!(matches!(claim, Claim::Acquired), "{key}: {claim:?}");
        }
        assert_eq!(store.len(), keys.len());
        assert_eq!(store.digests(), 1);
        for key in keys {
            let lock = Lock::new(Fingerprint([1; 32]));
            let claim = store.claim(key, &lock, lease).await.unwrap();
            assert!(matches!(claim, Claim::InFlight { .. }), "{key}: {claim:?}");
        }
    }

    /// A record comes back as it was stored, through its encoding.
    #[tokio::test]
    async fn completed_records_round_trip() {
        let store = MemoryStore::new();
        let key = "0123456789abcdef0123456789abcdef";
        let lock = Lock::new(Fingerprint([2; 32]));
        store
            .claim(key, &lock, Duration::from_secs(30))
            .await
            .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.append("x-a", http::HeaderValue::from_static("1"));
        headers.append("x-a", http::HeaderValue::from_static("2"));
        let record = CompletedRecord::new(
            Fingerprint([2; 32]),
            http::StatusCode::ACCEPTED,
            headers,
            Bytes::from_static(b"done"),
            false,
        )
        .with_expiry(1_234);
        assert!(
            store
                .complete(key, &lock, &record, Duration::from_secs(60))
                .await
                .unwrap()
        );
        let other = Lock::new(Fingerprint([2; 32]));
        match store.claim(key, &other, Duration::from_secs(30)).await {
            Ok(Claim::Completed(stored)) => assert_eq!(stored, record),
            other => panic!("{other:?}"),
        }
    }

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(60);

    /// The counts match the entries the shards hold.
    fn assert_counted(store: &MemoryStore) {
        let (mut entries, mut bytes) = (0, 0);
        for shard in &store.shared.shards {
            let inner = lock(shard);
            for entry in inner.digests.values().chain(inner.named.values()) {
                entries += 1;
                bytes += entry.bytes();
            }
        }
        assert_eq!(
            (store.len(), store.bytes()),
            (entries, bytes),
            "counted, held"
        );
    }

    fn record(body: &'static [u8]) -> CompletedRecord {
        let headers = http::HeaderMap::new();
        CompletedRecord::new(
            Fingerprint([0; 32]),
            http::StatusCode::OK,
            headers,
            Bytes::from_static(body),
            false,
        )
    }

    async fn claim(store: &MemoryStore, key: &str) -> (Lock, Result<Claim, StoreError>) {
        let lock = Lock::new(Fingerprint([0; 32]));
        let claim = store.claim(key, &lock, LEASE).await;
        (lock, claim)
    }

    async fn acquire(store: &MemoryStore, key: &str) -> Lock {
        match claim(store, key).await {
            (lock, Ok(Claim::Acquired)) => lock,
            (_, other) => panic!("{key}: {other:?}"),
        }
    }

    async fn assert_full(store: &MemoryStore, key: &str) {
        match claim(store, key).await.1 {
            Err(StoreError::Backend(err)) if err.to_string().starts_with("memory store full") => {}
            other => panic!("{key}: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_refuses_new_keys_and_answers_held_ones() {
        let store = MemoryStore::new().max_entries(4);
        let mut locks = Vec::new();
        for i in 0..4 {
            locks.push(acquire(&store, &format!("k{i}")).await);
        }
        assert_full(&store, "k4").await;
        assert_eq!(store.len(), 4);
        // Keys the store holds are answered as usual.
        assert!(matches!(
            claim(&store, "k0").await.1,
            Ok(Claim::InFlight { .. })
        ));
        let done = record(b"done");
        assert!(store.complete("k1", &locks[1], &done, TTL).await.unwrap());
        assert!(matches!(claim(&store, "k1").await.1, Ok(Claim::Completed(r)) if r == done));
        // A release makes room for one new key.
        assert!(store.release("k2", &locks[2]).await.unwrap());
        acquire(&store, "k4").await;
        assert_full(&store, "k5").await;
        assert_counted(&store);
        // Everything expired: the store is swept, whichever shards hold the old keys.
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        for i in 5..9 {
            acquire(&store, &format!("k{i}")).await;
        }
        assert_full(&store, "k9").await;
        assert_eq!(store.len(), 4);
        assert_counted(&store);
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_bound_refuses_new_keys_but_stores_every_record() {
        let record = record(&[b'x'; 1000]);
        let size = record.encode().len();
        let store = MemoryStore::new().max_bytes(2 * size + RUNNING_BYTES);
        for key in ["a", "b"] {
            let lock = acquire(&store, key).await;
            assert!(store.complete(key, &lock, &record, TTL).await.unwrap());
        }
        assert_eq!(store.bytes(), 2 * size);
        // Room for one running claim, not two.
        let c = acquire(&store, "c").await;
        assert_eq!(store.bytes(), 2 * size + RUNNING_BYTES);
        assert_full(&store, "d").await;
        // The running claim's record passes the bound, and is stored all the same.
        assert!(store.complete("c", &c, &record, TTL).await.unwrap());
        assert_eq!(store.bytes(), 3 * size);
        assert!(matches!(claim(&store, "c").await.1, Ok(Claim::Completed(r)) if r == record));
        assert_full(&store, "d").await;
        assert_counted(&store);
        let debug = format!("{store:?}");
        assert!(debug.contains(&format!("bytes: {}", 3 * size)), "{debug}");
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        acquire(&store, "d").await;
        assert_eq!((store.len(), store.bytes()), (1, RUNNING_BYTES));
        assert_counted(&store);
    }

    /// Claims, renewals, completions, releases, expiry and replaced expired entries, counted
    /// through several fills of the store.
    #[tokio::test(start_paused = true)]
    async fn counts_follow_every_change() {
        let bound = 16;
        let store = MemoryStore::new().max_entries(bound);
        // Digest keys and named keys, as the store files them apart.
        let key = |i: usize| match i % 2 {
            0 => format!("{i:032x}"),
            _ => format!("key-{i}"),
        };
        let done = record(b"done");
        for round in 0..3 {
            let base = round * 1000;
            let mut locks = Vec::new();
            for i in 0..bound {
                locks.push(acquire(&store, &key(base + i)).await);
            }
            assert_full(&store, &key(base + bound)).await;
            assert_counted(&store);
            for (i, lock) in locks.iter().enumerate() {
                assert!(store.renew(&key(base + i), lock, LEASE).await.unwrap());
            }
            // Half completed, half released.
            for (i, lock) in locks.iter().enumerate() {
                if i % 2 == 0 {
                    assert!(
                        store
                            .complete(&key(base + i), lock, &done, TTL)
                            .await
                            .unwrap()
                    );
                } else {
                    assert!(store.release(&key(base + i), lock).await.unwrap());
                }
            }
            assert_eq!(store.len(), bound / 2);
            assert_counted(&store);
            // Fill again; the new claims lapse, and their keys are claimed anew in place.
            for i in bound..bound + bound / 2 {
                acquire(&store, &key(base + i)).await;
            }
            assert_full(&store, &key(base + 2 * bound)).await;
            tokio::time::advance(LEASE + Duration::from_secs(1)).await;
            let mut locks = Vec::new();
            for i in bound..bound + bound / 2 {
                locks.push(acquire(&store, &key(base + i)).await);
            }
            assert_eq!(store.len(), bound);
            assert_counted(&store);
            for (i, lock) in (bound..).zip(&locks) {
                assert!(store.release(&key(base + i), lock).await.unwrap());
            }
            // The completed records expire and are swept as the store fills up.
            tokio::time::advance(TTL).await;
            assert_eq!(store.len(), bound / 2);
            for i in 0..bound {
                acquire(&store, &key(base + 500 + i)).await;
            }
            assert_counted(&store);
            // Empty for the next round.
            tokio::time::advance(LEASE + Duration::from_secs(1)).await;
            store.sweep_expired(Instant::now());
            assert_eq!((store.len(), store.bytes()), (0, 0));
        }
    }

    /// Concurrent claims never take the store past its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_stay_within_the_bound() {
        let bound = 100;
        let store = MemoryStore::new().max_entries(bound);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut acquired = 0;
                    for i in 0..100 {
                        if let (_, Ok(Claim::Acquired)) = claim(&store, &format!("{t}-{i}")).await {
                            acquired += 1;
                        }
                    }
                    acquired
                })
            })
            .collect();
        let mut acquired = 0;
        for task in tasks {
            acquired += task.await.unwrap();
        }
        assert!((1..=bound).contains(&acquired), "{acquired}");
        assert_eq!(store.len(), acquired);
        assert_counted(&store);
    }

    #[tokio::test]
    async fn the_full_warning_is_due_once_a_second() {
        let store = MemoryStore::new();
        let shared = &store.shared;
        let start = shared.created;
        assert!(shared.warning_due(start));
        assert!(!shared.warning_due(start));
        assert!(!shared.warning_due(start + WARN_EVERY - Duration::from_millis(1)));
        assert!(shared.warning_due(start + WARN_EVERY));
        assert!(!shared.warning_due(start + WARN_EVERY));
    }
}
