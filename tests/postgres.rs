//! `PgStore` against a real Postgres (see `common/postgres.rs`): the conformance kit, the schema
//! it creates, purging, the layer over it, racing claims, and a database that cannot be reached.
//! The transactional mode has `postgres_transactional.rs`.

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use sqlx::postgres::PgPoolOptions;
use tower_idempotency::conformance::{expect_acquired, fp, plain_record};
use tower_idempotency::{Attempt, IdempotencyLayer, IdempotencyStore, PgStore};

use common::orders::{answer, pay_with};
use common::postgres::{connect_options, pool, store};
use common::{ProxyMode, TcpProxy};

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

/// A database that cannot be reached (connections refused through a proxy): `503`, the
/// handler does not run; once the database is back, the same key runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_closed_and_recovers() {
    let (_, schema) = store("unreachable").await;
    let direct = connect_options();
    let proxy = TcpProxy::start_to(direct.get_host(), direct.get_port()).await;
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(direct.host("127.0.0.1").port(proxy.port()));
    let app = app(PgStore::new(pool).schema(schema.name()).unwrap());

    proxy.set(ProxyMode::Refuse);
    for _ in 0..2 {
        let (status, _, body) = send(&app, "down", "x").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("StoreUnavailable"), "{body}");
    }
    proxy.set(ProxyMode::Pass);
    assert_eq!(
        send(&app, "down", "x").await,
        (StatusCode::OK, false, "run 1".into()),
        "the handler did not run while the database was away"
    );
    assert_eq!(
        send(&app, "down", "x").await,
        (StatusCode::OK, true, "run 1".into())
    );
}

/// A completion paused between its `UPDATE` and its commit (written here by hand, as
/// `PgStore::complete` writes it), after the lease lapsed: a claim of the key waits on the row
/// and then finds the record; it never takes the key over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_a_completion_paused_before_its_commit() {
    use tower_idempotency::Claim;
    let (store, schema) = store("paused").await;
    let holder = Attempt::new(fp(1));
    expect_acquired(&store, "k", &holder, Duration::from_millis(200), "holder").await;
    let record = plain_record(fp(1), StatusCode::OK, b"done");
    let mut completion = store.pool().begin().await.unwrap();
    let update = format!(
        "UPDATE \"{}\".idempotency_keys
         SET record = $3, expires_at = clock_timestamp() + interval '60 seconds'
         WHERE key = $1 AND owner = $2 AND record IS NULL",
        schema.name()
    );
    let updated = sqlx::query(sqlx::AssertSqlSafe(update))
        .bind("k")
        .bind(&holder.owner()[..])
        .bind(record.encode())
        .execute(&mut *completion)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let claim = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .claim("k", &Attempt::new(fp(2)), Duration::from_secs(30))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!claim.is_finished(), "the claim waits for the row lock");
    completion.commit().await.unwrap();
    match claim.await.unwrap() {
        Ok(Claim::Completed(got)) => assert_eq!(got.body, record.body),
        other => panic!("expected the committed record, got {:?}", other.map(|_| ())),
    }
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
