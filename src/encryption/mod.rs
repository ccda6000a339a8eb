//! Encryption at rest (feature `encryption`): a completed record's headers and body are sealed
//! with XChaCha20-Poly1305 before the store sees them, and opened when a claim finds them.
//!
//! The layer seals, not the store, so every store gets it (memory, Redis, Postgres, a store of
//! your own). The scoped key is part of the associated data: a record copied under another key
//! does not open, and is treated as unreadable (`500`, handler not run), never replayed.
//! Without the feature, the hooks below pass records through.

#[cfg(feature = "encryption")]
mod envelope;
#[cfg(feature = "encryption")]
mod ring;

#[cfg(feature = "encryption")]
pub use ring::{InvalidKey, KeyRing};

use http::HeaderName;

use crate::config::Config;
use crate::record::CompletedRecord;
use crate::store::{Claim, StoreError};

/// The header that marks a sealed record. It is reserved: a response's own header of that name
/// is never stored (`record_of` drops it with the hop-by-hop headers), and a record carrying it
/// is opened (or refused), never replayed as it is, with or without the feature.
pub(crate) const SEALED: HeaderName = HeaderName::from_static("tower-idempotency-sealed");

/// The form of `record` to store under `scoped`: `None` when it is stored as it is (no
/// encryption configured). Boxed, so that the first delivery's future, which holds it across
/// the store's `await`, does not grow by a record (BENCHMARKS.md, "Instructions per request").
pub(crate) fn seal(
    config: &Config,
    scoped: &str,
    record: &CompletedRecord,
) -> Result<Option<Box<CompletedRecord>>, StoreError> {
    #[cfg(feature = "encryption")]
    if let Some(ring) = &config.encryption {
        return envelope::seal(ring, scoped, record).map(|sealed| Some(Box::new(sealed)));
    }
    let _ = (config, scoped, record);
    Ok(None)
}

/// Opens the record a claim found under `scoped`; one that does not open is
/// [`StoreError::Corrupt`].
pub(crate) fn open_claim<T>(
    config: &Config,
    scoped: &str,
    claim: Result<Claim<T>, StoreError>,
) -> Result<Claim<T>, StoreError> {
    match claim {
        Ok(Claim::Completed(record)) => open(config, scoped, record).map(Claim::Completed),
        other => other,
    }
}

/// Opens a record stored under `scoped`.
pub(crate) fn open(
    config: &Config,
    scoped: &str,
    record: CompletedRecord,
) -> Result<CompletedRecord, StoreError> {
    #[cfg(feature = "encryption")]
    return envelope::open(config.encryption.as_deref(), scoped, record);
    #[cfg(not(feature = "encryption"))]
    {
        let _ = (config, scoped);
        if record.headers.contains_key(SEALED) {
            return Err(StoreError::corrupt(
                "the record is encrypted and this build has no `encryption` feature",
            ));
        }
        Ok(record)
    }
}
