//! One shard of the store: its two maps (digest keys and other keys), its entries, and its sweep.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::RUNNING_BYTES;
use super::digest::Key;
use crate::config::MAX_TTL;
use crate::fingerprint::Fingerprint;
use crate::store::Attempt;

#[derive(Default)]
pub(super) struct Inner {
    // The keys the layer passes are digests, 32 lowercase hex digits: kept as the 128-bit number
    // they spell, in the slot itself (no allocation per key, no pointer to follow when probing or
    // rehashing a large table). Any other key, from direct use of the store, is kept as text.
    // foldhash, seeded per process: several times cheaper than SipHash on these short keys, and
    // still not predictable from outside.
    pub(super) digests: HashMap<u128, Entry, foldhash::fast::RandomState>,
    pub(super) named: HashMap<Box<str>, Entry, foldhash::fast::RandomState>,
    pub(super) claims_since_sweep: usize,
    /// Claims between sweeps: the number of entries left by the last sweep (at least
    /// `MIN_SWEEP_EVERY`), so a sweep's cost is paid for by as many claims.
    pub(super) sweep_every: usize,
    /// No entry expires before this (`None`: the shard held nothing at its last sweep and has
    /// taken nothing since), so a full store sweeps only the shards where one may have expired.
    pub(super) next_expiry: Option<Instant>,
}

pub(super) const MIN_SWEEP_EVERY: usize = 8;
pub(super) enum Entry {
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
    pub(super) fn running(attempt: &Attempt, deadline: Instant) -> Self {
        Self::Running {
            owner: *attempt.owner(),
            fingerprint: *attempt.fingerprint(),
            deadline,
        }
    }

    pub(super) fn expires(&self) -> Instant {
        match self {
            Self::Running { deadline, .. } => *deadline,
            Self::Completed { expires, .. } => *expires,
        }
    }

    /// What the entry counts against `max_bytes`.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::Running { .. } => RUNNING_BYTES,
            Self::Completed { record, .. } => record.len(),
        }
    }

    pub(super) fn is_owned_by(&self, attempt: &Attempt, now: Instant) -> bool {
        matches!(self, Self::Running { owner, deadline, .. } if owner == attempt.owner() && *deadline > now)
    }
}

pub(super) fn lock(shard: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the map half-updated (every update is a single
    // insert or remove), so a poisoned lock is safe to keep using.
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// `now + d`, saturating far in the future instead of overflowing.
pub(super) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| now + MAX_TTL)
}

impl Inner {
    pub(super) fn len(&self) -> usize {
        self.digests.len() + self.named.len()
    }

    pub(super) fn get(&self, key: Key<'_>) -> Option<&Entry> {
        match key {
            Key::Digest(n) => self.digests.get(&n),
            Key::Named(name) => self.named.get(name),
        }
    }

    pub(super) fn get_mut(&mut self, key: Key<'_>) -> Option<&mut Entry> {
        match key {
            Key::Digest(n) => self.digests.get_mut(&n),
            Key::Named(name) => self.named.get_mut(name),
        }
    }

    pub(super) fn insert(&mut self, key: Key<'_>, entry: Entry) {
        self.expires_by(entry.expires());
        match key {
            Key::Digest(n) => self.digests.insert(n, entry),
            Key::Named(name) => self.named.insert(name.into(), entry),
        };
    }

    pub(super) fn remove(&mut self, key: Key<'_>) -> Option<Entry> {
        match key {
            Key::Digest(n) => self.digests.remove(&n),
            Key::Named(name) => self.named.remove(name),
        }
    }

    /// Notes that an entry of the shard expires at `at`.
    pub(super) fn expires_by(&mut self, at: Instant) {
        self.next_expiry = Some(self.next_expiry.map_or(at, |t| t.min(at)));
    }

    /// Counts a claim; whether the shard is now due for a sweep.
    pub(super) fn sweep_due(&mut self) -> bool {
        self.claims_since_sweep += 1;
        self.claims_since_sweep >= self.sweep_every.max(MIN_SWEEP_EVERY)
    }

    /// Removes the expired entries; returns how many, and their bytes.
    pub(super) fn sweep(&mut self, now: Instant) -> (usize, usize) {
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
