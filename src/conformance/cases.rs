//! The properties of the [`IdempotencyStore`] contract, one async function each: every one
//! takes a fresh store, drives it through one scenario and panics where the store breaks the
//! contract.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Barrier;

use super::{
    LONG, applied, assert_record_eq, describe, expect_acquired, expect_completed, expect_in_flight,
    fp, not_owner, plain_record, rich_record,
};
use crate::{Attempt, Claim, CompletedRecord, Fenced, IdempotencyStore};

/// An absent key is acquired; later claims see it in flight with the holder's fingerprint, and
/// take nothing from the holder.
pub async fn claim_absent_then_in_flight<S: IdempotencyStore>(store: S) {
    let key = "claim";
    let a = Attempt::new(fp(1));
    let mut token = expect_acquired(&store, key, &a, LONG, "first claim").await;
    for (name, other) in [("same fingerprint", fp(1)), ("other fingerprint", fp(2))] {
        let other = Attempt::new(other);
        match store.claim(key, &other, LONG).await {
            Ok(Claim::InFlight {
                fingerprint,
                retry_after,
            }) => {
                assert_eq!(fingerprint, fp(1), "{name}: the holder's fingerprint");
                assert!(
                    retry_after > LONG / 2 && retry_after <= LONG,
                    "{name}: retry_after {retry_after:?} right after a {LONG:?} claim"
                );
            }
            other => panic!("{name}: expected InFlight, got {}", describe(&other)),
        }
        not_owner(store.release(key, &other), "a refused claim releases").await;
    }
    applied(store.renew(key, &mut token, LONG), "the holder renews").await;
    let record = plain_record(fp(1), StatusCode::OK, b"done");
    applied(
        store.complete(key, &token, &record, LONG),
        "the holder completes",
    )
    .await;
    let got = expect_completed(&store, key, "after complete").await;
    assert_record_eq(&got, &record, "the holder's record");
}

/// A completed record is replayed exactly as stored, to any fingerprint, as often as asked.
pub async fn complete_then_replay<S: IdempotencyStore>(store: S) {
    let key = "complete";
    let a = Attempt::new(fp(3));
    let token = expect_acquired(&store, key, &a, LONG, "claim").await;
    let record = rich_record(fp(3), b"{\"id\":42}");
    applied(
        store.complete(key, &token, &record, LONG),
        "owner completes",
    )
    .await;

    let got = expect_completed(&store, key, "claim after complete").await;
    assert_record_eq(&got, &record, "replayed record");
    let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two", "three"]);
    match store.claim(key, &Attempt::new(fp(4)), LONG).await {
        Ok(Claim::Completed(got)) => assert_record_eq(&got, &record, "replay to another fp"),
        other => panic!(
            "another fingerprint: expected Completed, got {}",
            describe(&other)
        ),
    }
    let got = expect_completed(&store, key, "third claim").await;
    assert_record_eq(&got, &record, "replay again");
}

/// Only the holder may release; once the key completed, nobody may renew, release or write it.
pub async fn fencing_by_owner<S: IdempotencyStore>(store: S) {
    let key = "fencing";
    let owner = Attempt::new(fp(5));
    let mut token = expect_acquired(&store, key, &owner, LONG, "claim").await;
    // Fencing is by owner token, not by fingerprint.
    for other in [Attempt::new(fp(5)), Attempt::new(fp(6))] {
        not_owner(store.release(key, &other), "a non-owner releases").await;
    }
    let (holder, retry_after) = expect_in_flight(&store, key, "after non-owner releases").await;
    assert_eq!(holder, fp(5));
    assert!(retry_after > LONG / 2, "lease changed: {retry_after:?}");

    let record = rich_record(fp(5), b"owner's body");
    applied(
        store.complete(key, &token, &record, LONG),
        "owner completes",
    )
    .await;
    not_owner(store.renew(key, &mut token, LONG), "renew after complete").await;
    not_owner(store.release(key, &owner), "release after complete").await;
    let second = plain_record(fp(5), StatusCode::ACCEPTED, b"second");
    not_owner(
        store.complete(key, &token, &second, LONG),
        "another record over it",
    )
    .await;
    let got = expect_completed(&store, key, "after completion").await;
    assert_record_eq(&got, &record, "record intact");
}

/// Release frees the key for the next claim, and the releasing attempt holds nothing after.
pub async fn release_frees_key<S: IdempotencyStore>(store: S) {
    let key = "release";
    let a = Attempt::new(fp(7));
    let a_token = expect_acquired(&store, key, &a, LONG, "claim").await;
    applied(store.release(key, &a), "owner releases").await;

    let b = Attempt::new(fp(8));
    expect_acquired(&store, key, &b, LONG, "claim after release").await;
    not_owner(store.release(key, &a), "second release").await;
    let stale = plain_record(fp(7), StatusCode::OK, b"stale");
    not_owner(
        store.complete(key, &a_token, &stale, LONG),
        "complete after release",
    )
    .await;
    let (holder, _) = expect_in_flight(&store, key, "new owner holds").await;
    assert_eq!(holder, fp(8));
}

/// Renewing keeps the key past the original lease; once renewals stop, it lapses.
pub async fn renew_keeps_key<S: IdempotencyStore>(store: S) {
    let key = "renew";
    let lease = Duration::from_millis(800);
    let a = Attempt::new(fp(9));
    let start = Instant::now();
    let mut token = expect_acquired(&store, key, &a, lease, "claim").await;

    tokio::time::sleep(lease / 2).await;
    applied(store.renew(key, &mut token, lease), "first renew").await;
    tokio::time::sleep(lease / 2).await;
    applied(store.renew(key, &mut token, lease), "second renew").await;
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

    // Once a full lease has passed since the last renewal, the key is free.
    tokio::time::sleep((last_renew + lease + Duration::from_millis(300)) - Instant::now()).await;
    expect_acquired(
        &store,
        key,
        &Attempt::new(fp(10)),
        LONG,
        "claim after renewals stopped",
    )
    .await;
    not_owner(store.renew(key, &mut token, lease), "old owner renews").await;
}

/// A lapsed lease lets another attempt in; the first attempt is fenced off.
pub async fn lapsed_lease_is_fenced<S: IdempotencyStore>(store: S) {
    let key = "lapsed";
    let a = Attempt::new(fp(11));
    let mut a_token =
        expect_acquired(&store, key, &a, Duration::from_millis(250), "A claims").await;
    tokio::time::sleep(Duration::from_millis(450)).await;

    let b = Attempt::new(fp(12));
    let b_token = expect_acquired(&store, key, &b, LONG, "B claims after A's lease lapsed").await;
    let a_record = plain_record(fp(11), StatusCode::OK, b"from A");
    not_owner(
        store.complete(key, &a_token, &a_record, LONG),
        "A completes after losing the key",
    )
    .await;
    not_owner(
        store.renew(key, &mut a_token, Duration::from_millis(300)),
        "A renews after losing the key",
    )
    .await;
    not_owner(store.release(key, &a), "A releases after losing the key").await;

    let (holder, retry_after) = expect_in_flight(&store, key, "B holds the key").await;
    assert_eq!(holder, fp(12));
    assert!(
        retry_after > LONG / 2,
        "B's lease was changed: {retry_after:?}"
    );
    let b_record = rich_record(fp(12), b"from B");
    applied(
        store.complete(key, &b_token, &b_record, LONG),
        "B completes",
    )
    .await;
    let got = expect_completed(&store, key, "replay").await;
    assert_record_eq(&got, &b_record, "the replayed record is B's");
}

/// Operations repeated after they applied (as the layer repeats one whose outcome it never
/// learnt) find their effect: a second renew and a second complete of the same record answer
/// `Applied`, a second release `NotOwner`, and nothing changes.
pub async fn repeats_find_their_effect<S: IdempotencyStore>(store: S) {
    let key = "repeats";
    let a = Attempt::new(fp(23));
    let mut token = expect_acquired(&store, key, &a, LONG, "claim").await;
    applied(store.renew(key, &mut token, LONG), "renew").await;
    applied(store.renew(key, &mut token, LONG), "renew again").await;
    let record = rich_record(fp(23), b"once");
    applied(store.complete(key, &token, &record, LONG), "complete").await;
    applied(
        store.complete(key, &token, &record, LONG),
        "the same complete again",
    )
    .await;
    let other = plain_record(fp(23), StatusCode::OK, b"another");
    not_owner(store.complete(key, &token, &other, LONG), "another record").await;
    let got = expect_completed(&store, key, "after the repeats").await;
    assert_record_eq(&got, &record, "the first record");

    let released = "repeats-released";
    let b = Attempt::new(fp(24));
    expect_acquired(&store, released, &b, LONG, "claim").await;
    applied(store.release(released, &b), "release").await;
    not_owner(store.release(released, &b), "release again").await;
    expect_acquired(
        &store,
        released,
        &Attempt::new(fp(25)),
        LONG,
        "free after release",
    )
    .await;
}

/// A completed record lives for its TTL (from completion), not for the lease.
pub async fn record_ttl<S: IdempotencyStore>(store: S) {
    let ttl = Duration::from_millis(500);
    // Long lease, short record TTL: the record must lapse after its TTL.
    let short = "ttl-short";
    let token = expect_acquired(&store, short, &Attempt::new(fp(13)), LONG, "claim short").await;
    let record = plain_record(fp(13), StatusCode::OK, b"short-lived");
    applied(
        store.complete(short, &token, &record, ttl),
        "complete short",
    )
    .await;
    let completed_at = Instant::now();
    let got = expect_completed(&store, short, "right after complete").await;
    assert_record_eq(&got, &record, "short-lived record");

    // Short lease, long record TTL: completing must outlive the lease.
    let long = "ttl-long";
    let lease = Duration::from_millis(300);
    let token = expect_acquired(&store, long, &Attempt::new(fp(14)), lease, "claim long").await;
    let kept = plain_record(fp(14), StatusCode::OK, b"kept");
    applied(store.complete(long, &token, &kept, LONG), "complete long").await;

    tokio::time::sleep((completed_at + ttl + Duration::from_millis(300)) - Instant::now()).await;
    expect_acquired(
        &store,
        short,
        &Attempt::new(fp(15)),
        LONG,
        "claim after the record TTL",
    )
    .await;
    let got = expect_completed(&store, long, "record past the lease").await;
    assert_record_eq(&got, &kept, "long-lived record");
}

/// Empty, omitted and large binary bodies round trip byte for byte.
pub async fn bodies_round_trip<S: IdempotencyStore>(store: S) {
    let empty = CompletedRecord::new(
        fp(16),
        StatusCode::NO_CONTENT,
        SystemTime::now() + LONG * 100,
    );
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99999999"));
    let omitted = CompletedRecord::new(fp(17), StatusCode::OK, SystemTime::now() + LONG * 100)
        .with_headers(headers)
        .with_body_omitted();
    // 256 KiB; every 256-byte block is a permutation of all byte values.
    let big_body: Vec<u8> = (0..256 * 1024usize)
        .map(|i| (i % 256) as u8 ^ (i / 256) as u8)
        .collect();
    assert_eq!(big_body.iter().collect::<HashSet<_>>().len(), 256);
    let big = CompletedRecord::new(fp(18), StatusCode::OK, SystemTime::now() + LONG * 100)
        .with_headers(rich_record(fp(18), b"").headers)
        .with_body(Bytes::from(big_body.clone()));

    for (key, record) in [("empty", &empty), ("omitted", &omitted), ("big", &big)] {
        let attempt = Attempt::new(record.fingerprint);
        let token = expect_acquired(&store, key, &attempt, LONG, key).await;
        assert_eq!(
            store.complete(key, &token, record, LONG).await.unwrap(),
            Fenced::Applied,
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

/// Operations on one key never affect another.
pub async fn keys_are_independent<S: IdempotencyStore>(store: S) {
    let (k1, k2) = ("independent-1", "independent-2");
    let a = Attempt::new(fp(19));
    let b = Attempt::new(fp(20));
    let a_token = expect_acquired(&store, k1, &a, LONG, "claim k1").await;
    expect_acquired(&store, k2, &b, LONG, "claim k2 while k1 is held").await;

    // A holds k1 only.
    let a_record = rich_record(fp(19), b"k1");
    not_owner(
        store.complete(k2, &a_token, &a_record, LONG),
        "A completes k2",
    )
    .await;
    not_owner(store.release(k2, &a), "A releases k2").await;
    applied(
        store.complete(k1, &a_token, &a_record, LONG),
        "A completes k1",
    )
    .await;
    let (holder, _) = expect_in_flight(&store, k2, "k2 after k1 completed").await;
    assert_eq!(holder, fp(20));

    applied(store.release(k2, &b), "B releases k2").await;
    expect_acquired(
        &store,
        k2,
        &Attempt::new(fp(21)),
        LONG,
        "claim k2 after release",
    )
    .await;
    let got = expect_completed(&store, k1, "k1 after k2 released").await;
    assert_record_eq(&got, &a_record, "k1's record");
    expect_acquired(
        &store,
        "independent-3",
        &Attempt::new(fp(22)),
        LONG,
        "fresh key",
    )
    .await;
}

/// Of many concurrent claims of one key, exactly one wins.
pub async fn concurrent_claims<S: IdempotencyStore>(store: S) {
    const N: usize = 50;
    let key = "concurrent";
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let attempt = Attempt::new(fp(100 + i as u8));
                barrier.wait().await;
                let claim = store.claim(key, &attempt, LONG).await;
                (attempt, claim)
            })
        })
        .collect();

    let mut winners = Vec::new();
    let mut in_flight = Vec::new();
    for task in tasks {
        match task.await.expect("claim task") {
            (attempt, Ok(Claim::Acquired(token))) => winners.push((attempt, token)),
            (_, Ok(Claim::InFlight { fingerprint, .. })) => in_flight.push(fingerprint),
            (_, other) => panic!("unexpected claim result {}", describe(&other)),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim acquires the key");
    assert_eq!(in_flight.len(), N - 1);
    let (winner, token) = &winners[0];
    assert!(
        in_flight.iter().all(|f| f == winner.fingerprint()),
        "every loser sees the winner's fingerprint"
    );
    let record = plain_record(*winner.fingerprint(), StatusCode::OK, b"winner");
    applied(
        store.complete(key, token, &record, LONG),
        "the winner completes",
    )
    .await;
}
