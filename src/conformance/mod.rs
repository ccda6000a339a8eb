//! The store conformance kit (feature `conformance`): the contract of [`IdempotencyStore`]
//! checked against a real store, one async function per property, and
//! [`store_conformance_tests!`](crate::store_conformance_tests) to run them all as tests.
//!
//! ```
//! // tests/conformance.rs of a crate with its own store (here the crate's `MemoryStore`)
//! tower_idempotency::store_conformance_tests!(|_test: &'static str| async {
//!     (tower_idempotency::MemoryStore::new(), ())
//! });
//! # fn main() {}
//! ```
//!
//! The factory gets each test's name (to give it a key prefix of its own) and returns the store
//! and a value kept alive for the test (a guard of a server it started, or `()`). The tests need
//! `tokio` (features `macros`, `rt-multi-thread`) among the dev-dependencies.
//!
//! Time is real: leases and TTLs are a few hundred milliseconds where their lapse is the point,
//! and long ([`LONG`]) where it is not, so a slow scheduler cannot make a lease lapse by
//! accident. Every function panics, as a test does, when the store breaks the contract.
//!
//! The properties are in `cases.rs`; this file holds the macro and the helpers they share,
//! public so that a store's own tests can use them too.

mod cases;
mod operator;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::{Attempt, Claim, CompletedRecord, Fenced, Fingerprint, IdempotencyStore};

pub use cases::{
    bodies_round_trip, claim_absent_then_in_flight, complete_then_replay, concurrent_claims,
    fencing_by_owner, keys_are_independent, lapsed_lease_is_fenced, record_ttl, release_frees_key,
    renew_keeps_key, repeats_find_their_effect,
};
pub use operator::{forget_deletes_completed_only, lookup_reads_without_claiming};

/// Runs every case of the conformance kit as a test of its own. `$factory` is called with the
/// test's name and returns a future of `(store, guard)`; see the [module docs](crate::conformance).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            claim_absent_then_in_flight,
            complete_then_replay,
            fencing_by_owner,
            release_frees_key,
            renew_keeps_key,
            lapsed_lease_is_fenced,
            repeats_find_their_effect,
            record_ttl,
            bodies_round_trip,
            keys_are_independent,
            concurrent_claims,
            lookup_reads_without_claiming,
            forget_deletes_completed_only,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = ($factory)(stringify!($case)).await;
                $crate::conformance::$case(store).await;
            }
        )*
    };
}

/// A lease or TTL that never lapses during a test.
pub const LONG: Duration = Duration::from_secs(10);

/// A fingerprint made of `n` repeated.
pub fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A record with a status, multi-valued headers, a non-UTF-8 header value and a body.
pub fn rich_record(fingerprint: Fingerprint, body: &'static [u8]) -> CompletedRecord {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.append("x-multi", HeaderValue::from_static("one"));
    headers.append("x-multi", HeaderValue::from_static("two"));
    headers.append("x-multi", HeaderValue::from_static("three"));
    headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
    headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
    headers.insert(
        "x-opaque",
        HeaderValue::from_bytes(&[b'v', 0x80, 0xfe, 0xff]).unwrap(),
    );
    headers.insert("x-empty", HeaderValue::from_static(""));
    CompletedRecord::new(
        fingerprint,
        StatusCode::CREATED,
        SystemTime::now() + LONG * 100,
    )
    .with_headers(headers)
    .with_body(Bytes::from_static(body))
}

/// A record with `status`, no headers and `body`.
pub fn plain_record(
    fingerprint: Fingerprint,
    status: StatusCode,
    body: &'static [u8],
) -> CompletedRecord {
    CompletedRecord::new(fingerprint, status, SystemTime::now() + LONG * 100)
        .with_body(Bytes::from_static(body))
}

/// Asserts two records are equal field by field (with the order of repeated header values).
pub fn assert_record_eq(got: &CompletedRecord, want: &CompletedRecord, what: &str) {
    assert_eq!(got.fingerprint, want.fingerprint, "{what}: fingerprint");
    assert_eq!(got.status, want.status, "{what}: status");
    assert_eq!(got.body_omitted, want.body_omitted, "{what}: body_omitted");
    assert!(got.body == want.body, "{what}: body differs");
    assert_eq!(
        got.headers.len(),
        want.headers.len(),
        "{what}: header count"
    );
    for name in want.headers.keys() {
        let got_values: Vec<_> = got.headers.get_all(name).iter().collect();
        let want_values: Vec<_> = want.headers.get_all(name).iter().collect();
        assert_eq!(got_values, want_values, "{what}: values of {name}");
    }
    assert!(got == want, "{what}: records differ");
}

/// Claims `key` for `attempt` and expects the key to have been free; returns the token.
pub async fn expect_acquired<S: IdempotencyStore>(
    store: &S,
    key: &str,
    attempt: &Attempt,
    lease: Duration,
    what: &str,
) -> S::Token {
    match store.claim(key, attempt, lease).await {
        Ok(Claim::Acquired(token)) => token,
        Ok(Claim::InFlight { fingerprint, .. }) => {
            panic!("{what}: expected Acquired, got InFlight ({fingerprint:?})")
        }
        Ok(Claim::Completed(record)) => panic!("{what}: expected Acquired, got {record:?}"),
        Err(err) => panic!("{what}: expected Acquired, got {err}"),
    }
}

/// Claims `key` with a fresh attempt and expects it to be held: returns the holder's
/// fingerprint and the time left on its lease.
pub async fn expect_in_flight<S: IdempotencyStore>(
    store: &S,
    key: &str,
    what: &str,
) -> (Fingerprint, Duration) {
    match store.claim(key, &Attempt::new(fp(0xee)), LONG).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => (fingerprint, retry_after),
        other => panic!("{what}: expected InFlight, got {}", describe(&other)),
    }
}

/// Claims `key` with a fresh attempt and expects a completed record.
pub async fn expect_completed<S: IdempotencyStore>(
    store: &S,
    key: &str,
    what: &str,
) -> CompletedRecord {
    match store.claim(key, &Attempt::new(fp(0xee)), LONG).await {
        Ok(Claim::Completed(record)) => record,
        other => panic!("{what}: expected Completed, got {}", describe(&other)),
    }
}

fn describe<T>(claim: &Result<Claim<T>, crate::StoreError>) -> String {
    match claim {
        Ok(Claim::Acquired(_)) => "Acquired".to_owned(),
        Ok(Claim::InFlight { fingerprint, .. }) => format!("InFlight ({fingerprint:?})"),
        Ok(Claim::Completed(record)) => format!("{record:?}"),
        Err(err) => format!("error: {err}"),
    }
}

/// `Applied`, or panics with `what`.
async fn applied(
    op: impl std::future::Future<Output = Result<Fenced, crate::StoreError>>,
    what: &str,
) {
    assert_eq!(op.await.expect(what), Fenced::Applied, "{what}");
}

/// `NotOwner`, or panics with `what`.
async fn not_owner(
    op: impl std::future::Future<Output = Result<Fenced, crate::StoreError>>,
    what: &str,
) {
    assert_eq!(op.await.expect(what), Fenced::NotOwner, "{what}");
}
