//! The storage behind the layer: one small trait, an in-process store and a Redis store.
//!
//! A store keeps, for every scoped key, one entry in one of two states:
//!
//! - **running**: claimed by one attempt (identified by its [`Lock`]'s owner token), with the
//!   request fingerprint; it lapses after the lease unless the owner renews it;
//! - **completed**: the [`CompletedRecord`] to replay; it lapses after the record TTL.
//!
//! Every operation is a single atomic step (one round trip for a remote store, as a rule; the
//! Redis store's native fencing takes two more after a lost reply). `renew`,
//! `complete` and `release` are *fenced*: they only act while the entry is still running under
//! the same owner, so an attempt that lost its lease can never overwrite another attempt's entry.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::record::{CompletedRecord, DecodeError};

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

/// One attempt's claim on a key: a random owner token and the request's fingerprint.
///
/// A lock also carries one number for the store's own use between its operations on the same
/// attempt ([`Lock::store_note`]); the Redis store keeps there the deadline of the running record
/// it last wrote, so that its next write can be fenced on that exact value.
pub struct Lock {
    owner: [u8; 16],
    fingerprint: Fingerprint,
    note: AtomicU64,
}

impl Lock {
    /// A lock with a fresh owner token, unique to this attempt (across processes too).
    pub fn new(fingerprint: Fingerprint) -> Self {
        Self {
            owner: owner_token(),
            fingerprint,
            note: AtomicU64::new(0),
        }
    }

    /// The owner token.
    pub fn owner(&self) -> &[u8; 16] {
        &self.owner
    }

    /// The fingerprint of the request holding the lock.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The number a store last kept with this lock ([`Lock::set_store_note`]); `0` if none.
    pub fn store_note(&self) -> u64 {
        self.note.load(Ordering::Relaxed)
    }

    /// Keeps a number with this lock for the store's next operation on it. Stores must treat
    /// the note as a hint: a lock may be used with another store, or the note may be stale.
    pub fn set_store_note(&self, note: u64) {
        self.note.store(note, Ordering::Relaxed);
    }
}

impl Clone for Lock {
    fn clone(&self) -> Self {
        Self {
            owner: self.owner,
            fingerprint: self.fingerprint,
            note: AtomicU64::new(self.store_note()),
        }
    }
}

/// Two locks are equal when they are the same attempt: same owner and fingerprint (the store
/// note is not compared).
impl PartialEq for Lock {
    fn eq(&self, other: &Self) -> bool {
        self.owner == other.owner && self.fingerprint == other.fingerprint
    }
}

impl Eq for Lock {}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A 128-bit token: 64 random bits drawn once per process and a 64-bit per-process counter, so
/// tokens never repeat within a process and collide across processes with negligible probability,
/// without a system call per request.
fn owner_token() -> [u8; 16] {
    use std::sync::LazyLock;
    static PROCESS: LazyLock<[u8; 8]> = LazyLock::new(|| {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            // No OS randomness: fall back to the clock and the process id, still unique enough to
            // tell processes apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = (nanos ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
        }
        seed
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut token = [0u8; 16];
    token[..8].copy_from_slice(&*PROCESS);
    token[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    token
}

/// What [`IdempotencyStore::claim`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim {
    /// The key was free and is now running under the caller's lock.
    Acquired,
    /// Another attempt holds the key.
    InFlight {
        /// Fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// Time left on its lease (an upper bound on how long until the key is free or done).
        retry_after: Duration,
    },
    /// The key completed; here is the record to replay.
    Completed(CompletedRecord),
}

/// A store operation that could not be carried out.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is unreachable or answered with an error.
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The operation did not finish within the layer's store timeout.
    Timeout,
    /// The stored value is not a record this crate can read.
    Corrupt(DecodeError),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(err.into())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backend(err) => write!(f, "idempotency store error: {err}"),
            Self::Timeout => f.write_str("idempotency store timed out"),
            Self::Corrupt(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(err) => Some(&**err),
            Self::Timeout => None,
            Self::Corrupt(err) => Some(err),
        }
    }
}

impl From<DecodeError> for StoreError {
    fn from(err: DecodeError) -> Self {
        Self::Corrupt(err)
    }
}

/// Storage for idempotency entries. See the [module docs](self) for the state machine.
///
/// `key` is the scoped key the layer derived (a short digest of scope and idempotency key); a
/// store may prefix it but must treat it as opaque.
///
/// The layer repeats an operation that failed with [`StoreError::Backend`] or
/// [`StoreError::Timeout`] (it may have been applied nonetheless): a failed claim is released,
/// and a failed complete or release is tried again. So a store must let an operation be
/// repeated after it applied: `complete` again with the same record reports `true` when the
/// key already holds exactly that record, `renew` again reports `true` while the lock owns the
/// key, `release` again finds nothing and reports `false`. A store that resends commands itself
/// after a lost connection must recognise its own claim too (a running entry of the same lock is
/// [`Claim::Acquired`]).
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Claims `key` for `lock` with a lease of `lease` if it is absent; otherwise reports what
    /// holds it. One atomic step.
    fn claim(
        &self,
        key: &str,
        lock: &Lock,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Extends the lease of `key` to `lease` from now if `lock` still owns it. Returns whether
    /// it did.
    fn renew(
        &self,
        key: &str,
        lock: &Lock,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Replaces the running entry of `lock` with `record`, kept for `ttl`. Returns `false`,
    /// writing nothing, if `lock` no longer owns the key (its lease lapsed).
    fn complete(
        &self,
        key: &str,
        lock: &Lock,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the running entry of `lock`, so the next request with the key runs again. Returns
    /// `false`, deleting nothing, if `lock` no longer owns the key.
    fn release(
        &self,
        key: &str,
        lock: &Lock,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens_are_unique() {
        let fp = Fingerprint([0; 32]);
        let tokens: std::collections::HashSet<_> =
            (0..1000).map(|_| *Lock::new(fp).owner()).collect();
        assert_eq!(tokens.len(), 1000);
    }
}
