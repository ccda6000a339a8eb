//! `PgStore` against a real Postgres (see `common/postgres.rs`): the conformance kit, the schema
//! it creates, purging, the layer over it, and a database that cannot be reached.

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use sqlx::postgres::PgPoolOptions;
use tower::ServiceExt;
use tower_idempotency::conformance::{expect_acquired, fp, plain_record};
use tower_idempotency::{Attempt, IdempotencyLayer, IdempotencyStore, PgStore};

use common::postgres::{pool, store};

mod conformance {
    tower_idempotency::store_conformance_tests!(super::store);
}

/// The shipped migration is what `migrate` runs for the default names; `migrate` is safe to
/// run again, and from several instances at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_matches_the_shipped_sql() {
    let shipped = include_str!("../migrations/postgres.sql");
    let shipped: String = shipped
        .lines()
        .filter(|line| !line.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    let ddl = PgStore::new(pool().await).ddl();
    let statements: Vec<&str> = shipped
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        statements, ddl,
        "migrations/postgres.sql and PgStore::ddl differ"
    );

    let (store, _schema) = store("migrate").await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().expect("migrate again");
    }
}

/// Expired rows are deleted in bounded batches; live ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_expired_rows_only() {
    let (store, schema) = store("purge").await;
    for i in 0..5 {
        let attempt = Attempt::new(fp(i));
        expect_acquired(
            &store,
            &format!("short-{i}"),
            &attempt,
            Duration::from_millis(50),
            "short",
        )
        .await;
    }
    let live = Attempt::new(fp(9));
    let token = expect_acquired(&store, "live", &live, Duration::from_secs(60), "live").await;
    let record = plain_record(fp(9), StatusCode::OK, b"kept");
    assert!(
        store
            .complete("live", &token, &record, Duration::from_secs(60))
            .await
            .unwrap()
            .applied()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(store.purge_expired(3).await.unwrap(), 3);
    assert_eq!(store.purge_expired(3).await.unwrap(), 2);
    assert_eq!(store.purge_expired(3).await.unwrap(), 0);
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".idempotency_keys",
        schema.name()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(rows, 1, "the live record is kept");
}

async fn send(app: &Router, key: &str, body: &'static str) -> (StatusCode, bool, String) {
    answer(app, pay_with(key, body, &[])).await
}

fn app<St: IdempotencyStore>(store: St) -> Router {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Router::new()
        .route(
            "/pay",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if body == "slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    format!("run {n}")
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store).store_timeout(Duration::from_secs(2)))
}

/// Behind the layer: a first delivery runs, a retry replays, a duplicate in flight gets `409`,
/// the key reused with another body `422`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_over_postgres() {
    let (store, _schema) = store("layer").await;
    let app = app(store);
    assert_eq!(
        send(&app, "a", "x").await,
        (StatusCode::OK, false, "run 1".into())
    );
    assert_eq!(
        send(&app, "a", "x").await,
        (StatusCode::OK, true, "run 1".into())
    );
    assert_eq!(
        send(&app, "a", "y").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, "b", "slow").await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(send(&app, "b", "slow").await.0, StatusCode::CONFLICT);
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, false, "run 2".into()));
    assert_eq!(
        send(&app, "b", "slow").await,
        (StatusCode::OK, true, "run 2".into())
    );
}

/// A database that cannot be reached: `503`, the handler does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_closed() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap();
    let app = app(PgStore::new(pool));
    let (status, _, body) = send(&app, "down", "x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("StoreUnavailable"), "{body}");
}

/// Sixteen claims of `key` at once, with fingerprints from `first` on.
fn spawn_claims(
    store: &PgStore,
    key: &str,
    first: u8,
) -> Vec<
    tokio::task::JoinHandle<
        Result<tower_idempotency::Claim<tower_idempotency::PgToken>, tower_idempotency::StoreError>,
    >,
> {
    (0..16)
        .map(|i| {
            let (store, key) = (store.clone(), key.to_owned());
            tokio::spawn(async move {
                store
                    .claim(&key, &Attempt::new(fp(first + i)), Duration::from_secs(30))
                    .await
            })
        })
        .collect()
}

/// READ COMMITTED and the one-statement claim: many claims of an expired key, and many claims
/// racing the holder's complete, each get an answer (never an error, never two owners).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_get_one_owner_and_always_an_answer() {
    use tower_idempotency::Claim;
    let (store, _schema) = store("race").await;
    for round in 0..5 {
        let key = format!("expired-{round}");
        let old = Attempt::new(fp(1));
        expect_acquired(&store, &key, &old, Duration::from_millis(20), "old").await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        let claims = spawn_claims(&store, &key, 10);
        let mut acquired = 0;
        for claim in claims {
            match claim.await.unwrap() {
                Ok(Claim::Acquired(_)) => acquired += 1,
                Ok(Claim::InFlight { .. }) => {}
                other => panic!("round {round}: {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(acquired, 1, "round {round}: one owner of the expired key");
    }

    for round in 0..5 {
        let key = format!("completing-{round}");
        let holder = Attempt::new(fp(2));
        let token = expect_acquired(&store, &key, &holder, Duration::from_secs(30), "holder").await;
        let claims = spawn_claims(&store, &key, 40);
        let record = plain_record(fp(2), StatusCode::OK, b"done");
        assert!(
            store
                .complete(&key, &token, &record, Duration::from_secs(60))
                .await
                .unwrap()
                .applied()
        );
        for claim in claims {
            match claim.await.unwrap() {
                Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(fingerprint, fp(2)),
                Ok(Claim::Completed(got)) => assert_eq!(got.body, record.body),
                other => panic!("round {round}: {:?}", other.map(|_| ())),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transactional mode: the handler's writes and the stored response commit together.
// ---------------------------------------------------------------------------------------------

/// A router whose handler inserts `body` into `orders` through the request's transaction, then
/// answers as `x-status` says (200 by default), after waiting at `gate` when one is set.
fn orders_app<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    gate: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    table: String,
) -> Router {
    use axum::http::HeaderMap;
    use tower_idempotency::PgTx;
    Router::new()
        .route(
            "/pay",
            post(move |tx: PgTx, headers: HeaderMap, body: String| {
                let (gate, table) = (gate.clone(), table.clone());
                async move {
                    let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
                    sqlx::query(sqlx::AssertSqlSafe(insert))
                        .bind(&body)
                        .execute(&mut *tx.conn().await.unwrap())
                        .await
                        .unwrap();
                    if headers.contains_key("x-gate")
                        && let Some(gate) = gate
                    {
                        let _ = gate.acquire().await.unwrap();
                    }
                    if headers.contains_key("x-kill-backend") {
                        // The transaction's connection dies before the layer commits.
                        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                            .fetch_one(&mut *tx.conn().await.unwrap())
                            .await
                            .unwrap();
                        let other = pool().await;
                        let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                            .bind(pid)
                            .fetch_one(&other)
                            .await
                            .unwrap();
                    }
                    let status = headers
                        .get("x-status")
                        .map_or(StatusCode::OK, |s| s.to_str().unwrap().parse().unwrap());
                    (status, format!("paid {body}"))
                }
            }),
        )
        .route_layer(layer)
}

async fn orders(store: &PgStore, table: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT body FROM {table} ORDER BY id"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A transactional store in a fresh schema, with its `orders` table.
async fn transactional(test: &str) -> (PgStore, common::postgres::Schema, String) {
    let (store, schema) = store(test).await;
    let table = format!("\"{}\".orders", schema.name());
    let create = format!("CREATE TABLE {table} (id serial PRIMARY KEY, body text NOT NULL)");
    sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(store.pool())
        .await
        .unwrap();
    (store.transactional(true), schema, table)
}

fn pay_with(key: &str, body: &'static str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post("/pay").header("idempotency-key", key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body)).unwrap()
}

async fn answer(app: &Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

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
