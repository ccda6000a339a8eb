//! A store that does nothing, to price the layer's own request path.

#![allow(unreachable_pub, reason = "a module of several benchmarks")]

use std::time::Duration;

use tower_idempotency::{Attempt, Claim, CompletedRecord, Fenced, IdempotencyStore, StoreError};

/// A store that grants every claim and stores nothing.
#[derive(Clone, Debug)]
pub struct NullStore;

impl IdempotencyStore for NullStore {
    type Token = ();

    async fn claim(&self, _: &str, _: &Attempt, _: Duration) -> Result<Claim<()>, StoreError> {
        Ok(Claim::Acquired(()))
    }
    async fn renew(&self, _: &str, _: &mut (), _: Duration) -> Result<Fenced, StoreError> {
        Ok(Fenced::Applied)
    }
    async fn complete(
        &self,
        _: &str,
        _: &(),
        _: &CompletedRecord,
        _: Duration,
    ) -> Result<Fenced, StoreError> {
        Ok(Fenced::Applied)
    }
    async fn release(&self, _: &str, _: &Attempt) -> Result<Fenced, StoreError> {
        Ok(Fenced::Applied)
    }
}
