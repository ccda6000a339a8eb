//! The storage behind the layer: one small trait, an in-process store and a Redis store.
//!
//! A store keeps, for every scoped key, one entry in one of two states:
//!
//! - **running**: claimed by one [`Attempt`] (identified by its owner token), with the request
//!   fingerprint; it lapses after the lease unless the attempt renews it;
//! - **completed**: the [`CompletedRecord`] to replay; it lapses after the record TTL.
//!
//! Every operation is a single atomic step (one round trip for a remote store, as a rule).
//! `renew`, `complete` and `release` are *fenced*: they only act while the entry is still
//! running under the same attempt, and say so in a [`Fenced`]; an attempt that lost its lease can
//! never overwrite another attempt's entry.
//!
//! # Writing a store
//!
//! Implement [`IdempotencyStore`]; what your store must remember about a claim it granted (a
//! row version, the exact value it wrote) is its own [`Token`](IdempotencyStore::Token) type,
//! which the layer hands back to every later operation of the same attempt. Persist, for a
//! completed record, every field of [`CompletedRecord`] (its
//! [`expires_at`](CompletedRecord::expires_at) included: the local cache bounds itself by it);
//! [`CompletedRecord::encode`] and [`CompletedRecord::decode`] give a ready binary form. Report
//! an entry you cannot read with [`StoreError::corrupt`]: the layer answers `500` and never runs
//! the handler over it. The conformance kit (feature `conformance`, [`crate::conformance`])
//! checks a store against this contract.
//!
//! Two operations serve operators rather than the layer:
//! [`lookup`](IdempotencyStore::lookup) (read a key without claiming it) and
//! [`forget`](IdempotencyStore::forget) (delete a completed record). They have defaults that
//! answer [`StoreError::Unsupported`], so a store written before them still compiles;
//! implement both to support [`IdempotencyLayer::inspect`](crate::IdempotencyLayer::inspect)
//! and [`IdempotencyLayer::forget`](crate::IdempotencyLayer::forget).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::BoxError;
use crate::fingerprint::Fingerprint;
use crate::record::{CompletedRecord, DecodeError};

mod lookup;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

pub use lookup::Lookup;

/// One attempt at a key: a random owner token, unique to the attempt (across processes too),
/// and the fingerprint of its request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    owner: [u8; 16],
    fingerprint: Fingerprint,
}

impl Attempt {
    /// A new attempt with a fresh owner token.
    pub fn new(fingerprint: Fingerprint) -> Self {
        Self {
            owner: owner_token(),
            fingerprint,
        }
    }

    /// The owner token.
    pub fn owner(&self) -> &[u8; 16] {
        &self.owner
    }

    /// The fingerprint of the attempt's request.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
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

/// What [`IdempotencyStore::claim`] found. `T` is the store's
/// [`Token`](IdempotencyStore::Token).
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim<T> {
    /// The key was free and is now running under the attempt; the token goes with every later
    /// operation of the attempt.
    Acquired(T),
    /// Another attempt holds the key.
    InFlight {
        /// Fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// Time left on its lease (an upper bound on how long until the key is free or completed).
        retry_after: Duration,
    },
    /// The key completed; here is the record to replay.
    Completed(CompletedRecord),
}

/// What a fenced operation (`renew`, `complete`, `release`) did.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The attempt still held the key, and the operation was carried out.
    Applied,
    /// The attempt no longer holds the key (its lease lapsed, another attempt may have it);
    /// nothing was written.
    NotOwner,
}

impl Fenced {
    /// Whether the operation was carried out.
    pub fn applied(self) -> bool {
        self == Self::Applied
    }
}

/// A store operation that could not be carried out.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is unreachable or answered with an error. The operation may or may not have
    /// been applied.
    Backend(BoxError),
    /// The operation did not finish within the layer's store timeout. It may or may not have
    /// been applied.
    Timeout,
    /// The stored entry is not one the store can read (corrupted, truncated, written by
    /// something else). The layer answers `500` and leaves it in place.
    Corrupt(BoxError),
    /// The store does not implement this operation (an operator tool, such as
    /// [`IdempotencyStore::lookup`] or [`IdempotencyStore::forget`], on a store written before
    /// it existed).
    Unsupported(&'static str),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }

    /// Reports an entry the store cannot read.
    pub fn corrupt(err: impl Into<BoxError>) -> Self {
        Self::Corrupt(err.into())
    }

    /// Whether the operation may have been applied although it failed (a backend error or a
    /// timeout): the layer then repeats it, or releases the claim it may have made.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Backend(_) | Self::Timeout)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backend(err) => write!(f, "idempotency store error: {err}"),
            Self::Timeout => f.write_str("idempotency store timed out"),
            Self::Corrupt(err) => write!(f, "idempotency store entry unreadable: {err}"),
            Self::Unsupported(op) => write!(f, "the idempotency store does not support {op}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(err) | Self::Corrupt(err) => Some(&**err),
            Self::Timeout | Self::Unsupported(_) => None,
        }
    }
}

impl From<DecodeError> for StoreError {
    fn from(err: DecodeError) -> Self {
        Self::corrupt(err)
    }
}

/// Storage for idempotency entries. See the [module docs](self) for the state machine and for
/// writing a store.
///
/// `key` is the scoped key the layer derived (a short digest of scope and idempotency key); a
/// store may prefix it but must treat it as opaque.
///
/// The layer repeats an operation that failed with an unknown outcome
/// ([`StoreError::outcome_unknown`]): a claim that failed is released, a complete or release
/// that failed is tried again. So an operation must be safe to repeat after it applied:
/// `complete` again with the same record answers [`Fenced::Applied`] when the key already holds
/// exactly that record; `renew` again answers `Applied` while the attempt holds the key;
/// `release` again finds nothing and answers [`Fenced::NotOwner`]. A store that resends a claim
/// itself (after a lost connection) must recognise its own running entry as
/// [`Claim::Acquired`].
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// What the store remembers about a claim it granted, between the claim and the attempt's
    /// later operations: [`Attempt`] itself where nothing more is needed (the in-process
    /// store); the Redis store also keeps the deadline of the running record it last wrote, to
    /// fence its next write on that exact value.
    type Token: Send + Sync + 'static;

    /// Claims `key` for `attempt` with a lease of `lease` if it is absent (or expired);
    /// otherwise reports what holds it. One atomic step.
    fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim<Self::Token>, StoreError>> + Send;

    /// Extends the lease of `key` to `lease` from now if the token's attempt still holds it.
    fn renew(
        &self,
        key: &str,
        token: &mut Self::Token,
        lease: Duration,
    ) -> impl Future<Output = Result<Fenced, StoreError>> + Send;

    /// Replaces the token's running entry with `record`, kept for `ttl`, if its attempt still
    /// holds the key.
    fn complete(
        &self,
        key: &str,
        token: &Self::Token,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<Fenced, StoreError>> + Send;

    /// Deletes the running entry of `attempt`, so the next request with the key runs again.
    /// Takes the attempt rather than a token: the layer also releases claims whose outcome it
    /// never learnt.
    fn release(
        &self,
        key: &str,
        attempt: &Attempt,
    ) -> impl Future<Output = Result<Fenced, StoreError>> + Send;

    /// Called once a request holds its claim, just before its handler runs, for a token for
    /// which [`commits_handler_writes`](Self::commits_handler_writes) is `true`: a store whose
    /// `complete` can commit together with the handler's own writes (a transactional store,
    /// such as `PgStore` in transactional mode) opens that unit of work here, keeps it in the
    /// token, and puts what the handler needs to join it into the request's `extensions`.
    ///
    /// An error answers the request `503` and releases the claim. The default does nothing.
    fn prepare(
        &self,
        token: &mut Self::Token,
        extensions: &mut http::Extensions,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (token, extensions);
        async { Ok(()) }
    }

    /// Whether this token's attempt runs its handler in a unit of work the store opens
    /// ([`prepare`](Self::prepare)) and `complete` commits together with the record. Then a complete that fails or
    /// answers [`Fenced::NotOwner`] means the handler's writes did not happen either: the
    /// layer answers with an error instead of the handler's response, releases the claim, and
    /// does not try the complete again (the unit of work is gone). A token dropped without a
    /// complete must undo the work (a transaction rolls back).
    ///
    /// The default is `false`.
    fn commits_handler_writes(&self, token: &Self::Token) -> bool {
        let _ = token;
        false
    }

    /// Reads what `key` holds without changing it (no claim, no lease, no expiry touched): for
    /// operators ([`IdempotencyLayer::inspect`](crate::IdempotencyLayer::inspect)). An expired
    /// entry is [`Lookup::Absent`].
    ///
    /// The default answers [`StoreError::Unsupported`]; the crate's stores implement it.
    fn lookup(&self, key: &str) -> impl Future<Output = Result<Lookup, StoreError>> + Send {
        let _ = key;
        async { Err(StoreError::Unsupported("lookup")) }
    }

    /// Deletes the **completed** record under `key`, in one atomic step, so that the next
    /// request with the key runs the handler again: for operators
    /// ([`IdempotencyLayer::forget`](crate::IdempotencyLayer::forget)). A running entry is left
    /// alone (deleting it would let a second attempt run beside the first); it is released or
    /// completed by its owner, or lapses with its lease. Answers whether a record was deleted.
    ///
    /// The default answers [`StoreError::Unsupported`]; the crate's stores implement it.
    fn forget(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = key;
        async { Err(StoreError::Unsupported("forget")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens_are_unique() {
        let fp = Fingerprint([0; 32]);
        let tokens: std::collections::HashSet<_> =
            (0..1000).map(|_| *Attempt::new(fp).owner()).collect();
        assert_eq!(tokens.len(), 1000);
    }
}
