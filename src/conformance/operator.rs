//! The operator's operations of the contract: [`IdempotencyStore::lookup`] reads a key without
//! changing it, [`IdempotencyStore::forget`] deletes a completed record and nothing else.

use super::{
    LONG, applied, assert_record_eq, expect_acquired, expect_completed, expect_in_flight, fp,
    rich_record,
};
use crate::{Attempt, IdempotencyStore, Lookup};

async fn lookup<S: IdempotencyStore>(store: &S, key: &str, what: &str) -> Lookup {
    store
        .lookup(key)
        .await
        .unwrap_or_else(|err| panic!("{what}: lookup failed: {err}"))
}

async fn forget<S: IdempotencyStore>(store: &S, key: &str, what: &str) -> bool {
    store
        .forget(key)
        .await
        .unwrap_or_else(|err| panic!("{what}: forget failed: {err}"))
}

/// A lookup reports absent, running (holder's fingerprint, time left) and completed (the
/// record as stored) keys, and changes none of them: an absent key is still free afterwards, a
/// running one still its holder's.
pub async fn lookup_reads_without_claiming<S: IdempotencyStore>(store: S) {
    let key = "lookup";
    let found = lookup(&store, key, "absent").await;
    assert!(matches!(found, Lookup::Absent), "absent key: {found:?}");
    let a = Attempt::new(fp(21));
    // A lookup made no claim: the key is still free.
    let token = expect_acquired(&store, key, &a, LONG, "claim after a lookup").await;
    match lookup(&store, key, "running").await {
        Lookup::Running {
            fingerprint,
            retry_after,
        } => {
            assert_eq!(fingerprint, fp(21), "the holder's fingerprint");
            assert!(
                retry_after > LONG / 2 && retry_after <= LONG,
                "retry_after {retry_after:?} right after a {LONG:?} claim"
            );
        }
        other => panic!("running key: expected Running, got {other:?}"),
    }
    let record = rich_record(fp(21), b"looked up");
    applied(
        store.complete(key, &token, &record, LONG),
        "the holder completes after a lookup",
    )
    .await;
    for what in ["completed", "completed, again"] {
        match lookup(&store, key, what).await {
            Lookup::Completed(got) => assert_record_eq(&got, &record, what),
            other => panic!("{what}: expected Completed, got {other:?}"),
        }
    }
    let got = expect_completed(&store, key, "claim after lookups").await;
    assert_record_eq(&got, &record, "replayed after lookups");
}

/// Forget deletes a completed record (the key runs again), answers `false` for an absent or a
/// running key and leaves a running key to its holder, and touches no other key.
pub async fn forget_deletes_completed_only<S: IdempotencyStore>(store: S) {
    let (key, other_key) = ("forget", "forget-other");
    assert!(!forget(&store, key, "absent").await, "nothing to forget");
    let a = Attempt::new(fp(22));
    let token = expect_acquired(&store, key, &a, LONG, "claim").await;
    assert!(
        !forget(&store, key, "running").await,
        "a running key is not forgotten"
    );
    expect_in_flight(&store, key, "still running after forget").await;
    let record = rich_record(fp(22), b"to forget");
    applied(
        store.complete(key, &token, &record, LONG),
        "the holder completes after a forget",
    )
    .await;
    let b = Attempt::new(fp(23));
    let other_token = expect_acquired(&store, other_key, &b, LONG, "other key").await;
    let other_record = rich_record(fp(23), b"kept");
    applied(
        store.complete(other_key, &other_token, &other_record, LONG),
        "other key completes",
    )
    .await;

    assert!(
        forget(&store, key, "completed").await,
        "a completed record is forgotten"
    );
    let found = lookup(&store, key, "forgotten").await;
    assert!(matches!(found, Lookup::Absent), "forgotten key: {found:?}");
    assert!(!forget(&store, key, "forgotten").await, "forgotten twice");
    let c = Attempt::new(fp(22));
    let _token = expect_acquired(&store, key, &c, LONG, "a forgotten key runs again").await;
    let got = expect_completed(&store, other_key, "the other key").await;
    assert_record_eq(&got, &other_record, "the other key's record");
}
