//! What a store holds under a key, read without changing it: for operators
//! ([`IdempotencyLayer::inspect`](crate::IdempotencyLayer::inspect)).

use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::record::CompletedRecord;

/// What [`IdempotencyStore::lookup`](super::IdempotencyStore::lookup) found under a key.
#[derive(Debug)]
#[non_exhaustive]
pub enum Lookup {
    /// Nothing (or only an expired entry): the next request with the key runs the handler.
    Absent,
    /// An attempt holds the key.
    Running {
        /// Fingerprint of the request that holds it.
        fingerprint: Fingerprint,
        /// Time left on its lease.
        retry_after: Duration,
    },
    /// The key completed; the record as the store keeps it (encrypted, if the layer encrypts).
    Completed(CompletedRecord),
}
