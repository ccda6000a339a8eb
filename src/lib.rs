//! Idempotency keys for Axum and Tower: run a non-idempotent handler (a payment, a webhook
//! receiver) exactly once per key, and replay its response to every retry.
//!
//! TODO: crate docs.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
mod extract;
mod fingerprint;
mod key;
mod layer;
mod record;
mod rejection;
mod service;
pub mod store;

#[cfg(feature = "axum")]
pub use extract::MissingKeyExtension;
pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::IdempotencyLayer;
pub use record::{CompletedRecord, DecodeError};
pub use rejection::{Rejection, RejectionKind};
pub use service::{IDEMPOTENT_REPLAYED, Idempotency, ResponseFuture};
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
pub use store::{Claim, IdempotencyStore, Lock, StoreError};
