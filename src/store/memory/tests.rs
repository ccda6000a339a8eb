//! The store's own tests: sharding, sweeping, digest keys, bounds.

use super::digest::{digest, digest_bytes};
use super::*;
use crate::fingerprint::Fingerprint;

impl MemoryStore {
    /// The number of entries filed under digest keys.
    fn digests(&self) -> usize {
        self.shared
            .shards
            .iter()
            .map(|s| lock(s).digests.len())
            .sum()
    }
}

/// Entries spread over all shards, digests and other keys alike.
#[tokio::test]
async fn keys_spread_over_the_shards() {
    let store = MemoryStore::new();
    for i in 0..SHARDS * 64 {
        let key = if i % 2 == 0 {
            format!(
                "{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            )
        } else {
            format!("key-{i}")
        };
        let attempt = Attempt::new(Fingerprint([0; 32]));
        store
            .claim(&key, &attempt, Duration::from_secs(30))
            .await
            .unwrap();
    }
    for shard in &store.shared.shards {
        let n = lock(shard).len();
        assert!(
            (16..=112).contains(&n),
            "a shard holds {n} of {}",
            SHARDS * 64
        );
    }
    assert_counted(&store);
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_swept() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(1);
    // Half of the keys in the layer's digest form, half not: both kinds are swept.
    let key = |tag: &str, i: usize| match i % 2 {
        0 => format!("{tag}{i}"),
        _ => format!("{:032x}", (i as u128) << 8 | u128::from(tag.as_bytes()[0])),
    };
    for i in 0..100 {
        let attempt = Attempt::new(Fingerprint([0; 32]));
        store.claim(&key("k", i), &attempt, lease).await.unwrap();
    }
    assert_eq!(store.len(), 100);
    assert_eq!(store.digests(), 50);
    tokio::time::advance(Duration::from_secs(2)).await;
    // A shard is swept once it has seen `MIN_SWEEP_EVERY` claims since its last sweep:
    // 5,000 claims give each of the 64 shards about 78, so every shard is swept after the
    // old entries expired (shards are picked by a seeded hash; the chance that one gets
    // fewer than 8 is below 10^-20).
    let claims = 5_000;
    for i in 0..claims {
        let attempt = Attempt::new(Fingerprint([0; 32]));
        store.claim(&key("n", i), &attempt, lease).await.unwrap();
    }
    // The old 100 are gone; the new ones are all live.
    assert_eq!(store.len(), claims);
    assert_counted(&store);
}

#[test]
fn only_lowercase_32_digit_hex_is_filed_as_a_digest() {
    let lower = "0123456789abcdef0123456789abcdef";
    assert_eq!(digest(lower), Some(0x0123456789abcdef0123456789abcdef));
    assert_eq!(digest(&"f".repeat(32)), Some(u128::MAX));
    for other in [
        "0123456789ABCDEF0123456789abcdef",
        "0123456789abcdef0123456789abcde",
        "0123456789abcdef0123456789abcdef0",
        "0123456789abcdef0123456789abcdeg",
        "+123456789abcdef0123456789abcdef",
        "",
    ] {
        assert_eq!(digest(other), None, "{other:?}");
    }
    // Every number round trips, and a stray byte at any position is refused.
    let mut n = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835_u128;
    for _ in 0..1000 {
        n = n.rotate_left(7).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x1234;
        let hex = format!("{n:032x}");
        assert_eq!(digest(&hex), Some(n), "{hex}");
    }
    let hex = "0123456789abcdef0123456789abcdef";
    for at in 0..32 {
        for stray in ["g", "G", "A", "/", ":", "`", " ", "\0"] {
            let key = format!("{}{stray}{}", &hex[..at], &hex[at + 1..]);
            assert_eq!(digest(&key), None, "{key:?}");
        }
        // A two-byte character in place of two digits keeps the length at 32.
        if at < 31 {
            let key = format!("{}é{}", &hex[..at], &hex[at + 2..]);
            assert_eq!(key.len(), 32);
            assert_eq!(digest(&key), None, "{key:?}");
        }
    }
}

/// Every byte value at every position, against an independent reading: a digest exactly
/// when all 32 bytes are lowercase hex digits, and then the number `from_str_radix` reads.
#[test]
fn digest_agrees_with_from_str_radix_for_every_byte_at_every_position() {
    let base = *b"0123456789abcdef0123456789abcdef";
    for at in 0..32 {
        for byte in 0..=255u8 {
            let mut key = base;
            key[at] = byte;
            let expected = (byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)).then(|| {
                let text = std::str::from_utf8(&key).unwrap();
                u128::from_str_radix(text, 16).unwrap()
            });
            assert_eq!(digest_bytes(&key), expected, "byte {byte:#04x} at {at}");
        }
    }
}

/// Keys that spell the same number in another form are different keys.
#[tokio::test]
async fn digest_and_named_keys_do_not_collide() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(30);
    let keys = [
        "00000000000000000000000000000abc",
        "00000000000000000000000000000ABC",
        "abc",
        "0000000000000000000000000000000abc",
    ];
    for key in keys {
        let attempt = Attempt::new(Fingerprint([1; 32]));
        let claim = store.claim(key, &attempt, lease).await.unwrap();
        assert!(matches!(claim, Claim::Acquired(_)), "{key}: {claim:?}");
    }
    assert_eq!(store.len(), keys.len());
    assert_eq!(store.digests(), 1);
    for key in keys {
        let attempt = Attempt::new(Fingerprint([1; 32]));
        let claim = store.claim(key, &attempt, lease).await.unwrap();
        assert!(matches!(claim, Claim::InFlight { .. }), "{key}: {claim:?}");
    }
}

/// A record comes back as it was stored, through its encoding.
#[tokio::test]
async fn completed_records_round_trip() {
    let store = MemoryStore::new();
    let key = "0123456789abcdef0123456789abcdef";
    let attempt = Attempt::new(Fingerprint([2; 32]));
    store
        .claim(key, &attempt, Duration::from_secs(30))
        .await
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.append("x-a", http::HeaderValue::from_static("1"));
    headers.append("x-a", http::HeaderValue::from_static("2"));
    let record = CompletedRecord::new(
        Fingerprint([2; 32]),
        http::StatusCode::ACCEPTED,
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_234),
    )
    .with_headers(headers)
    .with_body(Bytes::from_static(b"done"));
    assert!(
        store
            .complete(key, &attempt, &record, Duration::from_secs(60))
            .await
            .unwrap()
            .applied()
    );
    let other = Attempt::new(Fingerprint([2; 32]));
    match store.claim(key, &other, Duration::from_secs(30)).await {
        Ok(Claim::Completed(stored)) => assert_eq!(stored, record),
        other => panic!("{other:?}"),
    }
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

/// The counts match the entries the shards hold.
fn assert_counted(store: &MemoryStore) {
    let (mut entries, mut bytes) = (0, 0);
    for shard in &store.shared.shards {
        let inner = lock(shard);
        for entry in inner.digests.values().chain(inner.named.values()) {
            entries += 1;
            bytes += entry.bytes();
        }
    }
    assert_eq!(
        (store.len(), store.bytes()),
        (entries, bytes),
        "counted, held"
    );
}

fn record(body: &'static [u8]) -> CompletedRecord {
    let headers = http::HeaderMap::new();
    CompletedRecord::new(
        Fingerprint([0; 32]),
        http::StatusCode::OK,
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    )
    .with_headers(headers)
    .with_body(Bytes::from_static(body))
}

async fn claim(store: &MemoryStore, key: &str) -> (Attempt, Result<Claim<Attempt>, StoreError>) {
    let attempt = Attempt::new(Fingerprint([0; 32]));
    let claim = store.claim(key, &attempt, LEASE).await;
    (attempt, claim)
}

async fn acquire(store: &MemoryStore, key: &str) -> Attempt {
    match claim(store, key).await {
        (attempt, Ok(Claim::Acquired(_))) => attempt,
        (_, other) => panic!("{key}: {other:?}"),
    }
}

async fn assert_full(store: &MemoryStore, key: &str) {
    match claim(store, key).await.1 {
        Err(StoreError::Backend(err)) if err.to_string().starts_with("memory store full") => {}
        other => panic!("{key}: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_store_refuses_new_keys_and_answers_held_ones() {
    let store = MemoryStore::new().max_entries(4);
    let mut attempts = Vec::new();
    for i in 0..4 {
        attempts.push(acquire(&store, &format!("k{i}")).await);
    }
    assert_full(&store, "k4").await;
    assert_eq!(store.len(), 4);
    // Keys the store holds are answered as usual.
    assert!(matches!(
        claim(&store, "k0").await.1,
        Ok(Claim::InFlight { .. })
    ));
    let completed = record(b"done");
    assert!(
        store
            .complete("k1", &attempts[1], &completed, TTL)
            .await
            .unwrap()
            .applied()
    );
    assert!(matches!(claim(&store, "k1").await.1, Ok(Claim::Completed(r)) if r == completed));
    // A release makes room for one new key.
    assert!(store.release("k2", &attempts[2]).await.unwrap().applied());
    acquire(&store, "k4").await;
    assert_full(&store, "k5").await;
    assert_counted(&store);
    // Everything expired: the store is swept, whichever shards hold the old keys.
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    for i in 5..9 {
        acquire(&store, &format!("k{i}")).await;
    }
    assert_full(&store, "k9").await;
    assert_eq!(store.len(), 4);
    assert_counted(&store);
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_refuses_new_keys_but_stores_every_record() {
    let record = record(&[b'x'; 1000]);
    let size = record.encode().len();
    let store = MemoryStore::new().max_bytes(2 * size + RUNNING_BYTES);
    for key in ["a", "b"] {
        let attempt = acquire(&store, key).await;
        assert!(
            store
                .complete(key, &attempt, &record, TTL)
                .await
                .unwrap()
                .applied()
        );
    }
    assert_eq!(store.bytes(), 2 * size);
    // Room for one running claim, not two.
    let c = acquire(&store, "c").await;
    assert_eq!(store.bytes(), 2 * size + RUNNING_BYTES);
    assert_full(&store, "d").await;
    // The running claim's record passes the bound, and is stored all the same.
    assert!(
        store
            .complete("c", &c, &record, TTL)
            .await
            .unwrap()
            .applied()
    );
    assert_eq!(store.bytes(), 3 * size);
    assert!(matches!(claim(&store, "c").await.1, Ok(Claim::Completed(r)) if r == record));
    assert_full(&store, "d").await;
    assert_counted(&store);
    let debug = format!("{store:?}");
    assert!(debug.contains(&format!("bytes: {}", 3 * size)), "{debug}");
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    acquire(&store, "d").await;
    assert_eq!((store.len(), store.bytes()), (1, RUNNING_BYTES));
    assert_counted(&store);
}

/// Claims, renewals, completions, releases, expiry and replaced expired entries, counted
/// through several fills of the store.
#[tokio::test(start_paused = true)]
async fn counts_follow_every_change() {
    let bound = 16;
    let store = MemoryStore::new().max_entries(bound);
    // Digest keys and named keys, as the store files them apart.
    let key = |i: usize| match i % 2 {
        0 => format!("{i:032x}"),
        _ => format!("key-{i}"),
    };
    let completed = record(b"done");
    for round in 0..3 {
        let base = round * 1000;
        let mut attempts = Vec::new();
        for i in 0..bound {
            attempts.push(acquire(&store, &key(base + i)).await);
        }
        assert_full(&store, &key(base + bound)).await;
        assert_counted(&store);
        for (i, attempt) in attempts.iter().enumerate() {
            assert!(
                store
                    .renew(&key(base + i), &mut attempt.clone(), LEASE)
                    .await
                    .unwrap()
                    .applied()
            );
        }
        // Half completed, half released.
        for (i, attempt) in attempts.iter().enumerate() {
            if i % 2 == 0 {
                assert!(
                    store
                        .complete(&key(base + i), attempt, &completed, TTL)
                        .await
                        .unwrap()
                        .applied()
                );
            } else {
                assert!(
                    store
                        .release(&key(base + i), attempt)
                        .await
                        .unwrap()
                        .applied()
                );
            }
        }
        assert_eq!(store.len(), bound / 2);
        assert_counted(&store);
        // Fill again; the new claims lapse, and their keys are claimed anew in place.
        for i in bound..bound + bound / 2 {
            acquire(&store, &key(base + i)).await;
        }
        assert_full(&store, &key(base + 2 * bound)).await;
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        let mut attempts = Vec::new();
        for i in bound..bound + bound / 2 {
            attempts.push(acquire(&store, &key(base + i)).await);
        }
        assert_eq!(store.len(), bound);
        assert_counted(&store);
        for (i, attempt) in (bound..).zip(&attempts) {
            assert!(
                store
                    .release(&key(base + i), attempt)
                    .await
                    .unwrap()
                    .applied()
            );
        }
        // The completed records expire and are swept as the store fills up.
        tokio::time::advance(TTL).await;
        assert_eq!(store.len(), bound / 2);
        for i in 0..bound {
            acquire(&store, &key(base + 500 + i)).await;
        }
        assert_counted(&store);
        // Empty for the next round.
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        store.sweep_expired(Instant::now());
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}

/// Concurrent claims never take the store past its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_stay_within_the_bound() {
    let bound = 100;
    let store = MemoryStore::new().max_entries(bound);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut acquired = 0;
                for i in 0..100 {
                    if let (_, Ok(Claim::Acquired(_))) = claim(&store, &format!("{t}-{i}")).await {
                        acquired += 1;
                    }
                }
                acquired
            })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        acquired += task.await.unwrap();
    }
    assert!((1..=bound).contains(&acquired), "{acquired}");
    assert_eq!(store.len(), acquired);
    assert_counted(&store);
}

#[tokio::test]
async fn the_full_warning_is_due_once_a_second() {
    let store = MemoryStore::new();
    let shared = &store.shared;
    let start = shared.created;
    assert!(shared.warning_due(start));
    assert!(!shared.warning_due(start));
    assert!(!shared.warning_due(start + WARN_EVERY - Duration::from_millis(1)));
    assert!(shared.warning_due(start + WARN_EVERY));
    assert!(!shared.warning_due(start + WARN_EVERY));
}
