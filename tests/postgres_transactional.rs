//! `PgStore`'s transactional mode against a real Postgres: the handler's writes (through `PgTx`)
//! and its stored response commit together or not at all, under takeovers, failed commits,
//! killed backends and an exhausted pool.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;
use tower_idempotency::{IdempotencyLayer, PgStore};

use common::orders::{answer, orders, orders_app, pay_with, transactional};
use common::postgres::{connect_options, pool, wait_until};

/// The handler's insert and the record commit together; the retry replays and inserts nothing.
/// A 5xx answer rolls the insert back and releases the key, so the retry runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_writes_commit_with_the_record_or_not_at_all() {
    let (store, _schema, table) = transactional("tx-commit").await;
    let app = orders_app(IdempotencyLayer::new(store.clone()), None, table.clone());
    let first = answer(&app, pay_with("k", "a", &[])).await;
    assert_eq!(first, (StatusCode::OK, false, "paid a".into()));
    let again = answer(&app, pay_with("k", "a", &[])).await;
    assert_eq!(again, (StatusCode::OK, true, "paid a".into()));
    assert_eq!(orders(&store, &table).await, ["a"]);

    let failed = answer(&app, pay_with("f", "b", &[("x-status", "500")])).await;
    assert_eq!(failed.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        orders(&store, &table).await,
        ["a"],
        "the 5xx's insert rolled back"
    );
    let retry = answer(&app, pay_with("f", "b", &[])).await;
    assert_eq!(retry, (StatusCode::OK, false, "paid b".into()));
    assert_eq!(orders(&store, &table).await, ["a", "b"]);
}

/// A stalled attempt (its renewals fail) loses its lease and another attempt takes the key over
/// and commits. When the stalled one completes, its complete finds the key taken: its insert
/// rolls back and its client gets `409 LeaseLost`. The other attempt's outcome stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_attempt_cannot_commit_after_a_takeover() {
    use common::stub::{Fault, Op, Stub};
    let (store, _schema, table) = transactional("tx-takeover").await;
    let stalled = Stub::new(store.clone()).with(Op::Renew, Fault::Fail);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let layer = IdempotencyLayer::new(stalled).lease_ttl(Duration::from_millis(300));
    let app = orders_app(layer, Some(gate.clone()), table.clone());

    let first = tokio::spawn({
        let app = app.clone();
        async move { answer(&app, pay_with("k", "x", &[("x-gate", "1")])).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = answer(&app, pay_with("k", "x", &[])).await;
    assert_eq!(
        second,
        (StatusCode::OK, false, "paid x".into()),
        "the takeover runs"
    );
    gate.add_permits(1);
    let (status, _, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("LeaseLost"), "{body}");
    assert_eq!(
        orders(&store, &table).await,
        ["x"],
        "one insert: the takeover's"
    );
    let replay = answer(&app, pay_with("k", "x", &[])).await;
    assert_eq!(replay, (StatusCode::OK, true, "paid x".into()));
}

/// The transaction's connection dies before the commit: `503 CommitFailed`, nothing was
/// written, the key is released, and the retry runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_answers_503_and_the_retry_runs_once() {
    let (store, _schema, table) = transactional("tx-commit-fails").await;
    let app = orders_app(IdempotencyLayer::new(store.clone()), None, table.clone());
    let (status, _, body) = answer(&app, pay_with("k", "y", &[("x-kill-backend", "1")])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("CommitFailed"), "{body}");
    assert!(orders(&store, &table).await.is_empty());
    let retry = answer(&app, pay_with("k", "y", &[])).await;
    assert_eq!(retry, (StatusCode::OK, false, "paid y".into()));
    assert_eq!(orders(&store, &table).await, ["y"]);
}

/// A commit that happened but whose answer was lost: the client gets `503 CommitFailed`, the
/// layer's release finds the key completed and leaves it, and the retry replays the committed
/// answer without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_replayed_by_the_retry() {
    use common::stub::{Fault, Op, Stub};
    let (store, _schema, table) = transactional("tx-lost-answer").await;
    let stub = Stub::new(store.clone()).with(Op::Complete, Fault::LoseAnswer);
    let app = orders_app(IdempotencyLayer::new(stub.clone()), None, table.clone());
    let (status, _, body) = answer(&app, pay_with("k", "w", &[])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("CommitFailed"), "{body}");
    assert_eq!(orders(&store, &table).await, ["w"], "the commit happened");
    let retry = answer(&app, pay_with("k", "w", &[])).await;
    assert_eq!(retry, (StatusCode::OK, true, "paid w".into()));
    assert_eq!(orders(&store, &table).await, ["w"], "and only once");
    assert_eq!(
        stub.calls(Op::Complete),
        1,
        "a transactional complete is not repeated"
    );
}

/// `PgTx` without a transactional store behind the layer: the extractor answers `500`, and no
/// claim is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tx_needs_transactional_mode() {
    let (store, _schema, table) = transactional("tx-missing").await;
    let plain = store.clone().transactional(false);
    let app = orders_app(IdempotencyLayer::new(plain), None, table.clone());
    let (status, _, body) = answer(&app, pay_with("k", "z", &[])).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body.contains("transactional"), "{body}");
    assert!(orders(&store, &table).await.is_empty());
}

/// Every backend of the store's pool is killed (`pg_terminate_backend`) while six handlers hold
/// their uncommitted inserts: each request answers `503` with nothing written, and the
/// retries insert each order exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_killed_mid_handler_apply_each_order_once() {
    const BODIES: [&str; 6] = ["o0", "o1", "o2", "o3", "o4", "o5"];
    let (store, schema, table) = transactional("tx-terminate").await;
    let gate = Arc::new(Semaphore::new(0));
    let app = orders_app(
        IdempotencyLayer::new(store.clone()),
        Some(gate.clone()),
        table.clone(),
    );
    let pending: Vec<_> = BODIES
        .iter()
        .map(|body| {
            let app = app.clone();
            tokio::spawn(
                async move { answer(&app, pay_with(body, body, &[("x-gate", "1")])).await },
            )
        })
        .collect();
    let admin = pool().await;
    wait_until(
        &admin,
        &format!(
            "SELECT count(*) = 6 FROM pg_stat_activity WHERE state = 'idle in transaction'
             AND query LIKE 'INSERT INTO \"{}\".orders%'",
            schema.name()
        ),
        "six handlers holding their inserts",
    )
    .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1) AS killed",
    )
    .bind(schema.name())
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(killed >= 6, "killed {killed} backends");
    gate.add_permits(BODIES.len());
    for request in pending {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    assert!(orders(&store, &table).await.is_empty(), "nothing committed");

    for body in BODIES {
        let deadline = Instant::now() + Duration::from_secs(20);
        let retry = loop {
            let retry = answer(&app, pay_with(body, body, &[])).await;
            if retry.0 == StatusCode::OK {
                break retry;
            }
            assert!(Instant::now() < deadline, "{body}: {retry:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(retry, (StatusCode::OK, false, format!("paid {body}")));
        let replay = answer(&app, pay_with(body, body, &[])).await;
        assert_eq!(replay, (StatusCode::OK, true, format!("paid {body}")));
    }
    let mut written = orders(&store, &table).await;
    written.sort();
    assert_eq!(written, BODIES, "each order once");
}

/// A pool of one connection, held by a request's transaction: another request waits for a
/// connection only as long as the store timeout and gets `503` (never a hang); once the first
/// request is done, the second runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_answers_503_within_the_store_timeout() {
    let (migrated, schema, table) = transactional("tx-pool").await;
    let one = PgPoolOptions::new()
        .max_connections(1)
        // Longer than the test's bound: only the store timeout can end the wait.
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(connect_options())
        .await
        .unwrap();
    let store = PgStore::new(one)
        .schema(schema.name())
        .unwrap()
        .transactional(true);
    let gate = Arc::new(Semaphore::new(0));
    let layer = IdempotencyLayer::new(store).store_timeout(Duration::from_millis(300));
    let app = orders_app(layer, Some(gate.clone()), table.clone());

    let first = tokio::spawn({
        let app = app.clone();
        async move { answer(&app, pay_with("a", "a", &[("x-gate", "1")])).await }
    });
    wait_until(
        migrated.pool(),
        &format!(
            "SELECT count(*) = 1 FROM \"{}\".idempotency_keys WHERE record IS NULL",
            schema.name()
        ),
        "the first request's claim",
    )
    .await;
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        answer(&app, pay_with("b", "b", &[])),
    )
    .await
    .expect("a request waiting for a connection must end at the store timeout");
    assert_eq!(second.0, StatusCode::SERVICE_UNAVAILABLE, "{second:?}");
    assert!(second.2.contains("StoreUnavailable"), "{second:?}");

    gate.add_permits(1);
    assert_eq!(
        first.await.unwrap(),
        (StatusCode::OK, false, "paid a".into())
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let retry = loop {
        let retry = answer(&app, pay_with("b", "b", &[])).await;
        if retry.0 == StatusCode::OK {
            break retry;
        }
        assert!(Instant::now() < deadline, "{retry:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retry, (StatusCode::OK, false, "paid b".into()));
    assert_eq!(orders(&migrated, &table).await, ["a", "b"]);
}
