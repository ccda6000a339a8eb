//! An in-process store with the same semantics as the Redis store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
/// Expired entries are removed as new keys are claimed (a sweep whenever the number of claims since
/// the last sweep reaches the number of entries that sweep left), so memory stays proportional to
/// the live entries and sweeping costs O(1) per claim, amortized. Clones share the same entries. Time is [`tokio::time::Instant`], so tests with a
/// paused clock can move TTLs forward.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    // foldhash, seeded per process: several times cheaper than SipHash on these short keys, and
    // still not predictable from outside (the keys the layer passes are digests anyway).
    entries: HashMap<Box<str>, Entry, foldhash::fast::RandomState>,
    claims_since_sweep: usize,
    /// Claims between sweeps: the number of entries left by the last sweep (at least 64), so a
    /// sweep's cost is paid for by as many claims.
    sweep_every: usize,
}

enum Entry {
    Running {
        owner: [u8; 16],
        fingerprint: Fingerprint,
        deadline: Instant,
    },
    // Boxed: a record is several times the size of a running entry, and every slot of the
    // table is as large as its largest variant (rehashing and sweeping move and scan them all).
    Completed {
        record: Box<CompletedRecord>,
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

    fn is_owned_by(&self, lock: &Lock, now: Instant) -> bool {
        matches!(self, Self::Running { owner, deadline, .. } if owner == lock.owner() && *deadline > now)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.lock().entries.len())
            .finish()
    }
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of entries held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the entry of `key` in place (no key allocation) with `f()` if `lock` still owns
    /// it.
    fn replace_owned(&self, key: &str, lock: &Lock, f: impl FnOnce() -> Entry) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.entries.get_mut(key) {
            Some(entry) if entry.is_owned_by(lock, now) => {
                *entry = f();
                true
            }
            _ => false,
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

impl Inner {
    fn sweep_if_due(&mut self, now: Instant) {
        self.claims_since_sweep += 1;
        if self.claims_since_sweep >= self.sweep_every.max(64) {
            self.entries.retain(|_, e| e.expires() > now);
            self.claims_since_sweep = 0;
            self.sweep_every = self.entries.len();
        }
    }
}

impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lock: &Lock, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep_if_due(now);
        match inner.entries.get(key) {
            Some(Entry::Running {
                fingerprint,
                deadline,
                ..
            }) if *deadline > now => Ok(Claim::InFlight {
                fingerprint: *fingerprint,
                retry_after: *deadline - now,
            }),
            Some(Entry::Completed { record, expires }) if *expires > now => {
                Ok(Claim::Completed(CompletedRecord::clone(record)))
            }
            _ => {
                let entry = Entry::running(lock, deadline(now, lease));
                inner.entries.insert(key.into(), entry);
                Ok(Claim::Acquired)
            }
        }
    }

    async fn renew(&self, key: &str, lock: &Lock, lease: Duration) -> Result<bool, StoreError> {
        let deadline = deadline(Instant::now(), lease);
        Ok(self.replace_owned(key, lock, || Entry::running(lock, deadline)))
    }

    async fn complete(
        &self,
        key: &str,
        lock: &Lock,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let expires = deadline(Instant::now(), ttl);
        Ok(self.replace_owned(key, lock, || Entry::Completed {
            record: Box::new(record.clone()),
            expires,
        }))
    }

    async fn release(&self, key: &str, lock: &Lock) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let owned = inner
            .entries
            .get(key)
            .is_some_and(|e| e.is_owned_by(lock, now));
        if owned {
            inner.entries.remove(key);
        }
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(1);
        for i in 0..100 {
            let lock = Lock::new(Fingerprint([0; 32]));
            store.claim(&format!("k{i}"), &lock, lease).await.unwrap();
        }
        assert_eq!(store.len(), 100);
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..100 {
            let lock = Lock::new(Fingerprint([0; 32]));
            store.claim(&format!("n{i}"), &lock, lease).await.unwrap();
        }
        // The old 100 are gone once the sweep ran; only (some of) the new ones remain.
        assert!(store.len() <= 100, "len {}", store.len());
        assert!(!store.is_empty());
    }
}
