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
    let request = Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap();
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
        let claims: Vec<_> = (0..16)
            .map(|i| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    store
                        .claim(&key, &Attempt::new(fp(10 + i)), Duration::from_secs(30))
                        .await
                })
            })
            .collect();
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
        let claims: Vec<_> = (0..16)
            .map(|i| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    store
                        .claim(&key, &Attempt::new(fp(40 + i)), Duration::from_secs(30))
                        .await
                })
            })
            .collect();
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
