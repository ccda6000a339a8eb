//! The store conformance suite: the claim/renew/complete/release state machine, fencing by
//! owner token, leases and record TTLs, and record round trips, written once as generic async
//! functions over any `IdempotencyStore`, plus the record helpers the store tests share.
//!
//! Included by `tests/store_conformance.rs` (memory and Redis stores) and `tests/cluster.rs`
//! (Redis Cluster) with `#[path = "common/conformance.rs"] mod conformance;`, each instantiating
//! every case as a test of its own.
//!
//! Time is real: leases and TTLs are a few hundred milliseconds where their lapse is the point,
//! and long (`LONG`) where it is not, so a slow scheduler cannot make a lease lapse by accident.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Barrier;
use tower_idempotency::{Claim, CompletedRecord, Fingerprint, IdempotencyStore, Lock};

/// Calls `$callback!` with the bracketed list of every case of the suite appended to `$args`,
/// so that each file instantiating the suite runs all of its cases without listing them.
macro_rules! with_conformance_cases {
    ($callback:ident!($($args:tt)*)) => {
        $callback!($($args)* [
            claim_absent_then_in_flight,
            complete_then_replay,
            fencing_by_owner,
            release_frees_key,
            renew_keeps_key,
            lapsed_lease_is_fenced,
            stale_note_still_owns,
            record_ttl,
            bodies_round_trip,
            keys_are_independent,
            concurrent_claims,
        ]);
    };
}

/// A lease or TTL that never lapses during a test.
pub const LONG: Duration = Duration::from_secs(10);

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
        headers,
        Bytes::from_static(body),
        false,
    )
}

pub fn plain_record(
    fingerprint: Fingerprint,
    status: StatusCode,
    body: &'static [u8],
) -> CompletedRecord {
    CompletedRecord::new(
        fingerprint,
        status,
        HeaderMap::new(),
        Bytes::from_static(body),
        false,
    )
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

/// Claims `key` with `lock` and expects the key to have been free.
pub async fn expect_acquired<S: IdempotencyStore>(
    store: &S,
    key: &str,
    lock: &Lock,
    lease: Duration,
    what: &str,
) {
    match store.claim(key, lock, lease).await {
        Ok(Claim::Acquired) => {}
        other => panic!("{what}: expected Acquired, got {other:?}"),
    }
}

/// Claims `key` with a fresh lock and expects it to be held: returns the holder's fingerprint
/// and the time left on its lease.
pub async fn expect_in_flight<S: IdempotencyStore>(
    store: &S,
    key: &str,
    what: &str,
) -> (Fingerprint, Duration) {
    let probe = Lock::new(fp(0xee));
    match store.claim(key, &probe, LONG).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => (fingerprint, retry_after),
        other => panic!("{what}: expected InFlight, got {other:?}"),
    }
}

/// Claims `key` with a fresh lock and expects a completed record.
pub async fn expect_completed<S: IdempotencyStore>(
    store: &S,
    key: &str,
    what: &str,
) -> CompletedRecord {
    let probe = Lock::new(fp(0xee));
    match store.claim(key, &probe, LONG).await {
        Ok(Claim::Completed(record)) => record,
        other => panic!("{what}: expected Completed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The suite.
// ---------------------------------------------------------------------------------------------

/// 1. An absent key is acquired; later claims see it in flight with the holder's fingerprint.
pub async fn claim_absent_then_in_flight<S: IdempotencyStore>(store: S) {
    let key = "claim";
    let a = Lock::new(fp(1));
    expect_acquired(&store, key, &a, LONG, "first claim").await;

    let same = Lock::new(fp(1));
    match store.claim(key, &same, LONG).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => {
            assert_eq!(fingerprint, fp(1), "holder's fingerprint");
            assert!(retry_after > Duration::ZERO, "retry_after {retry_after:?}");
            assert!(retry_after <= LONG, "retry_after {retry_after:?} > lease");
            assert!(
                retry_after > LONG / 2,
                "retry_after {retry_after:?} right after a {LONG:?} claim"
            );
        }
        other => panic!("second claim: expected InFlight, got {other:?}"),
    }

    let other = Lock::new(fp(2));
    match store.claim(key, &other, LONG).await {
        Ok(Claim::InFlight {
            fingerprint,
            retry_after,
        }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "InFlight carries the original fingerprint"
            );
            assert!(retry_after > Duration::ZERO && retry_after <= LONG);
        }
        other => panic!("claim with another fingerprint: expected InFlight, got {other:?}"),
    }

    // The refused claims took nothing: the first owner still holds the key.
    assert!(store.renew(key, &a, LONG).await.unwrap(), "owner renews");
    let record = plain_record(fp(1), StatusCode::OK, b"done");
    assert!(store.complete(key, &a, &record, LONG).await.unwrap());
    // Another attempt's response is not stored over it.
    let theirs = plain_record(fp(1), StatusCode::OK, b"theirs");
    assert!(!store.complete(key, &same, &theirs, LONG).await.unwrap());
    assert!(!store.complete(key, &other, &theirs, LONG).await.unwrap());
}

/// 2. A completed record is replayed exactly as stored.
pub async fn complete_then_replay<S: IdempotencyStore>(store: S) {
    let key = "complete";
    let a = Lock::new(fp(3));
    expect_acquired(&store, key, &a, LONG, "claim").await;
    let record = rich_record(fp(3), b"{\"id\":42}");
    assert!(
        store.complete(key, &a, &record, LONG).await.unwrap(),
        "owner completes"
    );

    let got = expect_completed(&store, key, "claim after complete").await;
    assert_record_eq(&got, &record, "replayed record");
    let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two", "three"]);

    // A claim with another fingerprint still gets the record (with its original fingerprint),
    // and replaying does not consume it.
    let other = Lock::new(fp(4));
    match store.claim(key, &other, LONG).await {
        Ok(Claim::Completed(got)) => assert_record_eq(&got, &record, "replay to another fp"),
        other => panic!("claim with another fingerprint: expected Completed, got {other:?}"),
    }
    let got = expect_completed(&store, key, "third claim").await;
    assert_record_eq(&got, &record, "replay again");
}

/// 3. Only the owner may renew, complete or release; nobody may once the key completed.
pub async fn fencing_by_owner<S: IdempotencyStore>(store: S) {
    let key = "fencing";
    let owner = Lock::new(fp(5));
    expect_acquired(&store, key, &owner, LONG, "claim").await;

    // Non-owners: one with the owner's fingerprint (fencing is by owner token, not fingerprint)
    // and one with another fingerprint.
    let same_fp = Lock::new(fp(5));
    let other_fp = Lock::new(fp(6));
    let intruder = plain_record(fp(6), StatusCode::IM_A_TEAPOT, b"intruder");
    for (name, lock) in [
        ("same fingerprint", &same_fp),
        ("other fingerprint", &other_fp),
    ] {
        assert!(
            !store.complete(key, lock, &intruder, LONG).await.unwrap(),
            "non-owner ({name}) complete"
        );
        assert!(
            !store
                .renew(key, lock, Duration::from_millis(500))
                .await
                .unwrap(),
            "non-owner ({name}) renew"
        );
        assert!(
            !store.release(key, lock).await.unwrap(),
            "non-owner ({name}) release"
        );
    }

    // Unchanged: still running under the owner, with the owner's fingerprint and long lease
    // (an unfenced renew would have cut it to 500 ms).
    let (holder, retry_after) = expect_in_flight(&store, key, "after non-owner ops").await;
    assert_eq!(holder, fp(5));
    assert!(
        retry_after > LONG / 2,
        "lease shortened by a non-owner: {retry_after:?}"
    );

    let record = rich_record(fp(5), b"owner's body");
    assert!(
        store.complete(key, &owner, &record, LONG).await.unwrap(),
        "owner completes after the non-owner attempts"
    );

    // Completed: the old owner (and everyone else) can no longer touch the entry.
    assert!(
        !store.renew(key, &owner, LONG).await.unwrap(),
        "renew after complete"
    );
    assert!(
        !store.release(key, &owner).await.unwrap(),
        "release after complete"
    );
    let second = plain_record(fp(5), StatusCode::ACCEPTED, b"second");
    assert!(
        !store.complete(key, &owner, &second, LONG).await.unwrap(),
        "second complete"
    );
    assert!(!store.complete(key, &same_fp, &second, LONG).await.unwrap());
    assert!(!store.release(key, &other_fp).await.unwrap());

    let got = expect_completed(&store, key, "after completion").await;
    assert_record_eq(&got, &record, "record intact");
}

/// 4. Release frees the key for the next claim.
pub async fn release_frees_key<S: IdempotencyStore>(store: S) {
    let key = "release";
    let a = Lock::new(fp(7));
    expect_acquired(&store, key, &a, LONG, "claim").await;
    assert!(store.release(key, &a).await.unwrap(), "owner releases");

    let b = Lock::new(fp(8));
    expect_acquired(&store, key, &b, LONG, "claim after release").await;

    // The releasing attempt no longer owns anything.
    assert!(!store.release(key, &a).await.unwrap(), "second release");
    let stale = plain_record(fp(7), StatusCode::OK, b"stale");
    assert!(!store.complete(key, &a, &stale, LONG).await.unwrap());
    let (holder, _) = expect_in_flight(&store, key, "new owner holds").await;
    assert_eq!(holder, fp(8));
}

/// 5. Renewing keeps the key past the original lease; once renewals stop, it lapses.
pub async fn renew_keeps_key<S: IdempotencyStore>(store: S) {
    let key = "renew";
    let lease = Duration::from_millis(800);
    let a = Lock::new(fp(9));
    let start = Instant::now();
    expect_acquired(&store, key, &a, lease, "claim").await;

    tokio::time::sleep(lease / 2).await;
    assert!(store.renew(key, &a, lease).await.unwrap(), "first renew");
    tokio::time::sleep(lease / 2).await;
    assert!(store.renew(key, &a, lease).await.unwrap(), "second renew");
    let last_renew = Instant::now();

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        start.elapsed() > lease,
        "the check must come after the first lease"
    );
    let (holder, retry_after) = expect_in_flight(&store, key, "renewed past the lease").await;
    assert_eq!(holder, fp(9));
    assert!(
        retry_after > Duration::ZERO && retry_after <= lease,
        "retry_after {retry_after:?}"
    );

    // Stop renewing: once a full lease has passed since the last renewal, the key is free.
    tokio::time::sleep((last_renew + lease + Duration::from_millis(300)) - Instant::now()).await;
    let b = Lock::new(fp(10));
    expect_acquired(&store, key, &b, LONG, "claim after renewals stopped").await;
    assert!(
        !store.renew(key, &a, lease).await.unwrap(),
        "old owner renews"
    );
}

/// A renewal whose reply was lost leaves the lock's store note (see `Lock::store_note`) behind the
/// value in the store; here copies of the lock make renewals the original does not see. The owner
/// must still renew and complete, and once the key is completed no copy may write it.
pub async fn stale_note_still_owns<S: IdempotencyStore>(store: S) {
    let key = "stale-note";
    let a = Lock::new(fp(16));
    expect_acquired(&store, key, &a, LONG, "claim").await;
    // Deadlines are in milliseconds: wait so that each renewal writes a different value.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let twin = a.clone();
    assert!(
        store.renew(key, &twin, LONG).await.unwrap(),
        "renew by a copy"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        store.renew(key, &a, LONG).await.unwrap(),
        "renew with a stale note"
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        store.renew(key, &a.clone(), LONG).await.unwrap(),
        "renew by another copy"
    );

    let record = plain_record(fp(16), StatusCode::OK, b"done");
    assert!(
        store.complete(key, &a, &record, LONG).await.unwrap(),
        "complete with a stale note"
    );
    let got = expect_completed(&store, key, "replay").await;
    assert_record_eq(&got, &record, "the completed record");

    let other = plain_record(fp(16), StatusCode::OK, b"again");
    assert!(
        !store.complete(key, &twin, &other, LONG).await.unwrap(),
        "a copy completes a completed key"
    );
    assert!(
        !store.renew(key, &a, LONG).await.unwrap(),
        "renew a completed key"
    );
    assert!(
        !store.release(key, &a).await.unwrap(),
        "release a completed key"
    );
    let got = expect_completed(&store, key, "replay after the refused writes").await;
    assert_record_eq(&got, &record, "the record is unchanged");
}

/// 6. A lapsed lease lets another attempt in; the first attempt is fenced off.
pub async fn lapsed_lease_is_fenced<S: IdempotencyStore>(store: S) {
    let key = "lapsed";
    let a = Lock::new(fp(11));
    expect_acquired(&store, key, &a, Duration::from_millis(250), "A claims").await;
    tokio::time::sleep(Duration::from_millis(450)).await;

    let b = Lock::new(fp(12));
    expect_acquired(&store, key, &b, LONG, "B claims after A's lease lapsed").await;

    let a_record = plain_record(fp(11), StatusCode::OK, b"from A");
    assert!(
        !store.complete(key, &a, &a_record, LONG).await.unwrap(),
        "A completes after losing the key"
    );
    assert!(
        !store
            .renew(key, &a, Duration::from_millis(300))
            .await
            .unwrap(),
        "A renews after losing the key"
    );
    assert!(
        !store.release(key, &a).await.unwrap(),
        "A releases after losing the key"
    );

    let (holder, retry_after) = expect_in_flight(&store, key, "B holds the key").await;
    assert_eq!(holder, fp(12));
    assert!(
        retry_after > LONG / 2,
        "B's lease was changed: {retry_after:?}"
    );

    let b_record = rich_record(fp(12), b"from B");
    assert!(
        store.complete(key, &b, &b_record, LONG).await.unwrap(),
        "B completes"
    );
    let got = expect_completed(&store, key, "replay").await;
    assert_record_eq(&got, &b_record, "the replayed record is B's");
}

/// 7. A completed record lives for its TTL (from completion), not for the lease.
pub async fn record_ttl<S: IdempotencyStore>(store: S) {
    let ttl = Duration::from_millis(500);
    // Long lease, short record TTL: the record must lapse after its TTL.
    let short = "ttl-short";
    let a = Lock::new(fp(13));
    expect_acquired(&store, short, &a, LONG, "claim short").await;
    let record = plain_record(fp(13), StatusCode::OK, b"short-lived");
    assert!(store.complete(short, &a, &record, ttl).await.unwrap());
    let completed_at = Instant::now();
    let got = expect_completed(&store, short, "right after complete").await;
    assert_record_eq(&got, &record, "short-lived record");

    // Short lease, long record TTL: completing must outlive the lease.
    let long = "ttl-long";
    let b = Lock::new(fp(14));
    expect_acquired(&store, long, &b, Duration::from_millis(300), "claim long").await;
    let kept = plain_record(fp(14), StatusCode::OK, b"kept");
    assert!(store.complete(long, &b, &kept, LONG).await.unwrap());

    tokio::time::sleep((completed_at + ttl + Duration::from_millis(300)) - Instant::now()).await;
    let c = Lock::new(fp(15));
    expect_acquired(&store, short, &c, LONG, "claim after the record TTL").await;
    let got = expect_completed(&store, long, "record past the lease").await;
    assert_record_eq(&got, &kept, "long-lived record");
}

/// 8. Empty, omitted and large binary bodies round trip byte for byte.
pub async fn bodies_round_trip<S: IdempotencyStore>(store: S) {
    let empty = CompletedRecord::new(
        fp(16),
        StatusCode::NO_CONTENT,
        HeaderMap::new(),
        Bytes::new(),
        false,
    );
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99999999"));
    let omitted = CompletedRecord::new(fp(17), StatusCode::OK, headers, Bytes::new(), true);
    // 256 KiB; every 256-byte block is a permutation of all byte values.
    let big_body: Vec<u8> = (0..256 * 1024usize)
        .map(|i| (i % 256) as u8 ^ (i / 256) as u8)
        .collect();
    assert_eq!(big_body.iter().collect::<HashSet<_>>().len(), 256);
    let big = CompletedRecord::new(
        fp(18),
        StatusCode::OK,
        rich_record(fp(18), b"").headers,
        Bytes::from(big_body.clone()),
        false,
    );

    for (key, record) in [("empty", &empty), ("omitted", &omitted), ("big", &big)] {
        let lock = Lock::new(record.fingerprint);
        expect_acquired(&store, key, &lock, LONG, key).await;
        assert!(
            store.complete(key, &lock, record, LONG).await.unwrap(),
            "{key}"
        );
        let got = expect_completed(&store, key, key).await;
        assert_record_eq(&got, record, key);
    }
    let got = expect_completed(&store, "big", "big again").await;
    assert_eq!(got.body.len(), big_body.len());
    assert!(got.body[..] == big_body[..], "large body changed");
    let got = expect_completed(&store, "omitted", "omitted again").await;
    assert!(got.body_omitted && got.body.is_empty());
    let got = expect_completed(&store, "empty", "empty again").await;
    assert!(!got.body_omitted && got.body.is_empty());
}

/// 9. Operations on one key never affect another, even with the same lock.
pub async fn keys_are_independent<S: IdempotencyStore>(store: S) {
    let (k1, k2) = ("independent-1", "independent-2");
    let a = Lock::new(fp(19));
    let b = Lock::new(fp(20));
    expect_acquired(&store, k1, &a, LONG, "claim k1").await;
    expect_acquired(&store, k2, &b, LONG, "claim k2 while k1 is held").await;

    // A owns k1 only.
    let a_record = rich_record(fp(19), b"k1");
    assert!(
        !store.complete(k2, &a, &a_record, LONG).await.unwrap(),
        "A on k2"
    );
    assert!(!store.release(k2, &a).await.unwrap(), "A releases k2");
    assert!(!store.renew(k2, &a, LONG).await.unwrap(), "A renews k2");

    assert!(store.complete(k1, &a, &a_record, LONG).await.unwrap());
    let (holder, _) = expect_in_flight(&store, k2, "k2 after k1 completed").await;
    assert_eq!(holder, fp(20));

    assert!(store.release(k2, &b).await.unwrap());
    let c = Lock::new(fp(21));
    expect_acquired(&store, k2, &c, LONG, "claim k2 after release").await;
    let got = expect_completed(&store, k1, "k1 after k2 released").await;
    assert_record_eq(&got, &a_record, "k1's record");

    // An untouched key is still free.
    let d = Lock::new(fp(22));
    expect_acquired(&store, "independent-3", &d, LONG, "fresh key").await;
}

/// 10. Of many concurrent claims of one key, exactly one wins.
pub async fn concurrent_claims<S: IdempotencyStore>(store: S) {
    const N: usize = 50;
    let key = "concurrent";
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let lock = Lock::new(fp(100 + i as u8));
                barrier.wait().await;
                let claim = store.claim(key, &lock, LONG).await.unwrap();
                (lock, claim)
            })
        })
        .collect();

    let mut winners = Vec::new();
    let mut in_flight = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (lock, Claim::Acquired) => winners.push(lock),
            (_, Claim::InFlight { fingerprint, .. }) => in_flight.push(fingerprint),
            (_, other) => panic!("unexpected claim result {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim acquires the key");
    assert_eq!(in_flight.len(), N - 1);
    let winner = &winners[0];
    assert!(
        in_flight.iter().all(|f| f == winner.fingerprint()),
        "every loser sees the winner's fingerprint"
    );
    // The winner really owns it.
    let record = plain_record(*winner.fingerprint(), StatusCode::OK, b"winner");
    assert!(store.complete(key, winner, &record, LONG).await.unwrap());
}
