//! A store written outside the crate: one `Mutex<HashMap>`, implementing `IdempotencyStore`
//! with nothing but the crate's public API, and checked by its conformance kit.
//!
//! ```text
//! cargo run --example custom_store --features conformance     # a first delivery and a replay
//! cargo test --example custom_store --features conformance    # the conformance kit
//! ```
//!
//! A real backend (a SQL table, a key-value service) keeps the same three things per key: whose
//! claim it is (the attempt's owner token), until when, and the completed record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tower_idempotency::{
    Attempt, Claim, CompletedRecord, Fenced, IdempotencyStore, Lookup, StoreError,
};

enum Entry {
    Running { attempt: Attempt, until: Instant },
    Completed { encoded: Bytes, until: Instant },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Self::Running { until, .. } | Self::Completed { until, .. } => *until,
        }
    }
}

/// The whole store: entries by key. Expired entries stay until their key is claimed again.
#[derive(Clone, Default)]
struct MapStore {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl MapStore {
    /// Runs `f` on the live entry of `key`, if any.
    fn with_live<T>(&self, key: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get_mut(key)
            .filter(|entry| entry.until() > Instant::now())
            .map(f)
    }

    /// Replaces the entry of `key` with `next` if `attempt` is running there.
    fn replace_own(&self, key: &str, attempt: &Attempt, next: Entry) -> Fenced {
        let replaced = self.with_live(key, |entry| match entry {
            Entry::Running { attempt: a, .. } if a == attempt => {
                *entry = next;
                true
            }
            _ => false,
        });
        if replaced == Some(true) {
            Fenced::Applied
        } else {
            Fenced::NotOwner
        }
    }
}

impl IdempotencyStore for MapStore {
    // Nothing to remember between operations but the attempt itself.
    type Token = Attempt;

    async fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> Result<Claim<Attempt>, StoreError> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(Entry::Running {
                attempt: holder,
                until,
            }) if *until > now => Ok(Claim::InFlight {
                fingerprint: *holder.fingerprint(),
                retry_after: *until - now,
            }),
            Some(Entry::Completed { encoded, until }) if *until > now => {
                // An entry this store cannot read is reported, never replayed.
                let record =
                    CompletedRecord::decode(encoded.clone()).map_err(StoreError::corrupt)?;
                Ok(Claim::Completed(record))
            }
            _ => {
                let running = Entry::Running {
                    attempt: *attempt,
                    until: now + lease,
                };
                entries.insert(key.to_owned(), running);
                Ok(Claim::Acquired(*attempt))
            }
        }
    }

    async fn renew(
        &self,
        key: &str,
        attempt: &mut Attempt,
        lease: Duration,
    ) -> Result<Fenced, StoreError> {
        let running = Entry::Running {
            attempt: *attempt,
            until: Instant::now() + lease,
        };
        Ok(self.replace_own(key, attempt, running))
    }

    async fn complete(
        &self,
        key: &str,
        attempt: &Attempt,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<Fenced, StoreError> {
        let encoded = Bytes::from(record.encode());
        // The same record again (the layer repeats a complete whose answer it lost): applied.
        let same = self.with_live(
            key,
            |entry| matches!(entry, Entry::Completed { encoded: held, .. } if *held == encoded),
        );
        if same == Some(true) {
            return Ok(Fenced::Applied);
        }
        let completed = Entry::Completed {
            encoded,
            until: Instant::now() + ttl,
        };
        Ok(self.replace_own(key, attempt, completed))
    }

    async fn release(&self, key: &str, attempt: &Attempt) -> Result<Fenced, StoreError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let owned = matches!(
            entries.get(key),
            Some(Entry::Running { attempt: a, until }) if a == attempt && *until > Instant::now()
        );
        if !owned {
            return Ok(Fenced::NotOwner);
        }
        entries.remove(key);
        Ok(Fenced::Applied)
    }

    // The operator's two operations: read a key without claiming it, forget a completed one.
    async fn lookup(&self, key: &str) -> Result<Lookup, StoreError> {
        let now = Instant::now();
        let found = self.with_live(key, |entry| match entry {
            Entry::Running { attempt, until } => Ok(Lookup::Running {
                fingerprint: *attempt.fingerprint(),
                retry_after: *until - now,
            }),
            Entry::Completed { encoded, .. } => CompletedRecord::decode(encoded.clone())
                .map(Lookup::Completed)
                .map_err(StoreError::corrupt),
        });
        found.unwrap_or(Ok(Lookup::Absent))
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let completed = matches!(
            entries.get(key),
            Some(Entry::Completed { until, .. }) if *until > Instant::now()
        );
        if completed {
            entries.remove(key);
        }
        Ok(completed)
    }
}

#[tokio::main]
async fn main() {
    use axum::{Router, routing::post};
    use tower::ServiceExt;
    use tower_idempotency::IdempotencyLayer;

    let app: Router = Router::new()
        .route("/pay", post(|| async { "paid" }))
        .route_layer(IdempotencyLayer::new(MapStore::default()));
    for delivery in ["first", "retry"] {
        let request = http::Request::post("/pay")
            .header("idempotency-key", "order-1")
            .body(axum::body::Body::empty())
            .expect("a valid request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let replayed = response.headers().contains_key("idempotent-replayed");
        #[allow(clippy::print_stdout)]
        {
            println!("{delivery}: {} (replayed: {replayed})", response.status());
        }
    }
}

#[cfg(test)]
mod conformance {
    tower_idempotency::store_conformance_tests!(|_test| async { (super::MapStore::default(), ()) });
}
