//! Encryption at rest (feature `encryption`), through the router: stored headers and bodies
//! are unreadable in the store, replayed as sent, bound to their key, and readable after a key
//! rotation; plaintext records are refused unless a migration accepts them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, KeyQuery, KeyRing, KeyState};

use common::backend::{Backend, send};
use common::{TestRedis, unique_prefix};

const SECRET: &str = "card-4242-4242-4242-4242";

/// An app whose handler answers with the secret, a run counter and a header; `runs` counts.
fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, runs: &Arc<AtomicUsize>) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/pay",
            post(move || {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    (
                        [("x-customer", "ada@example.com")],
                        format!("{SECRET} run {run}"),
                    )
                }
            }),
        )
        .route_layer(layer)
}

fn pay(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from("amount=10"))
        .unwrap()
}

fn ring() -> KeyRing {
    KeyRing::new(1, [0x11; 32])
}

/// The first delivery runs, the replay answers the same status, headers and body.
async fn encrypted_records_are_replayed<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(
        IdempotencyLayer::new(backend.store).encrypt_with(ring()),
        &runs,
    );
    let first = send(&app, pay("k")).await;
    assert_eq!(first.status, StatusCode::OK);
    let replay = send(&app, pay("k")).await;
    assert!(replay.replayed(), "{:?}", replay.text());
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers["x-customer"], "ada@example.com");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!((backend.entries)(), 1);
}

/// A ring whose current key is new and which keeps the old one replays records the old key
/// sealed; a ring without the old key refuses them (500, handler not run).
async fn a_rotated_ring_reads_old_records<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = backend.store;
    let before = app(
        IdempotencyLayer::new(store.clone()).encrypt_with(ring()),
        &runs,
    );
    let first = send(&before, pay("k")).await;
    let rotated = KeyRing::new(2, [0x22; 32]).with_old(1, [0x11; 32]);
    let after = app(
        IdempotencyLayer::new(store.clone()).encrypt_with(rotated),
        &runs,
    );
    let replay = send(&after, pay("k")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    let forgotten = KeyRing::new(2, [0x22; 32]);
    let without_old = app(IdempotencyLayer::new(store).encrypt_with(forgotten), &runs);
    let refused = send(&without_old, pay("k")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        refused.problem()["type"]
            .as_str()
            .unwrap()
            .ends_with("CorruptRecord")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A record written before encryption was turned on is refused by default, and replayed by a
/// ring that accepts plaintext (a migration).
async fn plaintext_records_need_a_migration<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = backend.store;
    let plain = app(IdempotencyLayer::new(store.clone()), &runs);
    let first = send(&plain, pay("k")).await;
    let strict = app(
        IdempotencyLayer::new(store.clone()).encrypt_with(ring()),
        &runs,
    );
    let refused = send(&strict, pay("k")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!refused.replayed());
    let migrating = ring().accept_plaintext(true);
    let migrating = app(
        IdempotencyLayer::new(store.clone()).encrypt_with(migrating),
        &runs,
    );
    let replay = send(&migrating, pay("k")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    // A layer without encryption does not replay a sealed record as it is stored either.
    let sealed = send(&strict, pay("k2")).await;
    assert_eq!(sealed.status, StatusCode::OK);
    let refused = send(&plain, pay("k2")).await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!contains(&refused.body, SECRET));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// `inspect` reports the length of the body a replay sends (decrypted), and the stored size
/// (sealed: larger by the key id, nonce, tag and the encoded headers); a ring without the key
/// cannot report it.
async fn inspect_decrypts_to_report<St: IdempotencyStore>(backend: Backend<St>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(backend.store).encrypt_with(ring());
    let first = send(&app(layer.clone(), &runs), pay("k")).await;
    let query = KeyQuery::new("/pay", "k");
    match layer.inspect(&query).await.unwrap() {
        KeyState::Completed {
            status,
            body_len,
            stored_bytes,
            ..
        } => {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body_len, first.body.len());
            assert!(stored_bytes > body_len + 24 + 16, "{stored_bytes}");
        }
        other => panic!("expected Completed, got {other:?}"),
    }
    let other_ring = layer.encrypt_with(KeyRing::new(9, [0x99; 32]));
    assert!(matches!(
        other_ring.inspect(&query).await,
        Err(tower_idempotency::StoreError::Corrupt(_))
    ));
}

/// Records kept without their body (`status_only`, `StorePolicy::StatusAndHeaders`, a body
/// over `max_response_body`) are sealed and replayed like any other: the status (and headers
/// where kept) with an empty body.
async fn records_without_their_body_are_replayed<St: IdempotencyStore>(backend: Backend<St>) {
    use tower_idempotency::StorePolicy;
    let runs = Arc::new(AtomicUsize::new(0));
    let store = backend.store;
    let layers = [
        (
            "status only",
            IdempotencyLayer::new(store.clone()).status_only(true),
        ),
        (
            "too large",
            IdempotencyLayer::new(store.clone()).max_response_body(4),
        ),
    ];
    for (what, layer) in layers {
        let app = app(layer.namespace(what).encrypt_with(ring()), &runs);
        let first = send(&app, pay("k")).await;
        assert_eq!(first.status, StatusCode::OK, "{what}");
        let replay = send(&app, pay("k")).await;
        assert_eq!(replay.status, StatusCode::OK, "{what}: {:?}", replay.text());
        assert!(replay.replayed(), "{what}");
        assert!(replay.body.is_empty(), "{what}");
    }
    let policy = Router::new()
        .route(
            "/pay",
            post(|| async {
                (
                    StorePolicy::StatusAndHeaders,
                    [("x-customer", "ada")],
                    SECRET,
                )
            }),
        )
        .route_layer(IdempotencyLayer::new(store).encrypt_with(ring()));
    assert_eq!(send(&policy, pay("p")).await.status, StatusCode::OK);
    let replay = send(&policy, pay("p")).await;
    assert_eq!(replay.status, StatusCode::OK, "{:?}", replay.text());
    assert!(replay.replayed());
    assert!(replay.body.is_empty());
    assert_eq!(replay.headers["x-customer"], "ada");
}

/// The marker header of sealed records is reserved: a handler that sends it itself, on a layer
/// without encryption, still gets its answer replayed (without that header).
async fn the_reserved_header_is_never_stored<St: IdempotencyStore>(backend: Backend<St>) {
    let app = Router::new()
        .route(
            "/pay",
            post(|| async { ([("tower-idempotency-sealed", "1")], "paid") }),
        )
        .route_layer(IdempotencyLayer::new(backend.store));
    assert_eq!(send(&app, pay("k")).await.status, StatusCode::OK);
    let replay = send(&app, pay("k")).await;
    assert_eq!(replay.status, StatusCode::OK, "{:?}", replay.text());
    assert!(replay.replayed());
    assert_eq!(replay.text(), "paid");
    assert!(!replay.headers.contains_key("tower-idempotency-sealed"));
}

both_stores!(
    the_reserved_header_is_never_stored,
    records_without_their_body_are_replayed,
    inspect_decrypts_to_report,
    encrypted_records_are_replayed,
    a_rotated_ring_reads_old_records,
    plaintext_records_need_a_migration,
);

/// The raw values under `prefix`, by key.
fn raw_values(redis: &TestRedis, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = redis.client().get_connection().unwrap();
    redis
        .keys(prefix)
        .into_iter()
        .map(|key| {
            let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
            (key, value)
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A layer over the test Redis under a fresh prefix, with or without encryption.
async fn redis_layer(
    redis: &TestRedis,
    test: &str,
    encrypted: bool,
) -> (String, IdempotencyLayer<tower_idempotency::RedisStore>) {
    let prefix = unique_prefix(test);
    let store = tower_idempotency::RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(prefix.clone());
    let layer = IdempotencyLayer::new(store);
    let layer = if encrypted {
        layer.encrypt_with(ring())
    } else {
        layer
    };
    (prefix, layer)
}

/// What Redis holds has neither the body nor the headers in the clear; without encryption it
/// has both (so the check can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_plaintext() {
    let redis = TestRedis::get();
    for encrypted in [true, false] {
        let (prefix, layer) = redis_layer(&redis, "redis_holds_no_plaintext", encrypted).await;
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(
            send(&app(layer, &runs), pay("k")).await.status,
            StatusCode::OK
        );
        let values = raw_values(&redis, &prefix);
        assert_eq!(values.len(), 1);
        let value = &values[0].1;
        assert_eq!(
            contains(value, SECRET),
            !encrypted,
            "body, encrypted: {encrypted}"
        );
        assert_eq!(contains(value, "ada@example.com"), !encrypted, "header");
    }
}

/// A sealed record copied in Redis under another key (same route, same request, a key that
/// completed with another body) does not decrypt: the request with that key gets `500`
/// problem+json, not the other key's body, and the handler does not run. Without encryption the
/// same copy is replayed, which is what the binding prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_copied_under_another_key_is_not_replayed() {
    let redis = TestRedis::get();
    for encrypted in [true, false] {
        let (prefix, layer) = redis_layer(&redis, "copied_record", encrypted).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(layer, &runs);
        let a = send(&app, pay("key-a")).await;
        let (key_a, value_a) = raw_values(&redis, &prefix).remove(0);
        let b = send(&app, pay("key-b")).await;
        assert_ne!(a.body, b.body);
        let key_b = raw_values(&redis, &prefix)
            .into_iter()
            .map(|(key, _)| key)
            .find(|key| *key != key_a)
            .expect("key-b stored");
        let mut conn = redis.client().get_connection().unwrap();
        let _: () = redis::cmd("SET")
            .arg(&key_b)
            .arg(&value_a)
            .arg("KEEPTTL")
            .query(&mut conn)
            .unwrap();

        let reply = send(&app, pay("key-b")).await;
        if encrypted {
            assert_eq!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{}",
                reply.text()
            );
            assert!(
                reply.problem()["type"]
                    .as_str()
                    .unwrap()
                    .ends_with("CorruptRecord")
            );
            assert!(!reply.replayed());
            assert!(!contains(&reply.body, SECRET), "{}", reply.text());
            // The copied value is left as it is, and key-a still replays its own body.
            assert_eq!(raw_values(&redis, &prefix).len(), 2);
            assert_eq!(send(&app, pay("key-a")).await.body, a.body);
        } else {
            assert!(reply.replayed());
            assert_eq!(
                reply.body, a.body,
                "the copy is replayed without encryption"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2, "encrypted: {encrypted}");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    /// The row's record has neither the body nor the headers in the clear, and replays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_holds_no_plaintext_and_replays() {
        let (store, schema) = common::postgres::store("encryption").await;
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            IdempotencyLayer::new(store.clone()).encrypt_with(ring()),
            &runs,
        );
        let first = send(&app, pay("k")).await;
        let query = format!("SELECT record FROM \"{}\".idempotency_keys", schema.name());
        let rows: Vec<(Option<Vec<u8>>,)> = sqlx::query_as(sqlx::AssertSqlSafe(query))
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let record = rows[0].0.as_deref().expect("a completed record");
        assert!(!contains(record, SECRET) && !contains(record, "ada@example.com"));
        let replay = send(&app, pay("k")).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, first.body);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
