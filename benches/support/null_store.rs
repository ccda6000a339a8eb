//! A store that does nothing, to price the layer's own request path.

#![allow(unreachable_pub, reason = "a module of several benchmarks")]

use std::time::Duration;

use tower_idempotency::{Claim, CompletedRecord, IdempotencyStore, Lock, StoreError};

/// A store that grants every claim and stores nothing.
#[derive(Clone, Debug)]
pub struct NullStore;

impl IdempotencyStore for NullStore {
    async fn claim(&self, _: &str, _: &Lock, _: Duration) -> Result<Claim, StoreError> {
        Ok(Claim::Acquired)
    }
    async fn renew(&self, _: &str, _: &Lock, _: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn complete(
        &self,
        _: &str,
        _: &Lock,
        _: &CompletedRecord,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }
    async fn release(&self, _: &str, _: &Lock) -> Result<bool, StoreError> {
        Ok(true)
    }
}
