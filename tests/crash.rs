//! The inventory example in Postgres mode, crashed and stalled as real instances are: the stock
//! changes exactly once per delivery, because the change commits in the same transaction as the
//! stored response.
//!
//! `HOLD_MS` keeps the handler between its stock change and its answer, the window in which a
//! crash leaves the change applied and the key unstored with Redis or memory.

mod common;

use std::time::{Duration, Instant};

use common::example::{Answer, Inventory, deliver, get};
use common::postgres::{Schema, database_url, pool, wait_until};
use sqlx::PgPool;

const ORDER: &str = r#"{"order_id":"o-1","items":[{"sku":"SKU123","qty":2}]}"#;

/// The example's environment for `schema`, with a lease of one second.
fn env<'a>(schema: &'a Schema, url: &'a str, hold_ms: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", url),
        ("DATABASE_SCHEMA", schema.name()),
        ("LOCK_TTL_MS", "1000"),
        ("HOLD_MS", hold_ms),
    ]
}

async fn deliver_async(addr: &str, key: &'static str) -> Answer {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || deliver(&addr, key, ORDER))
        .await
        .unwrap()
}

async fn inventory(addr: &str) -> String {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || get(&addr, "/inventory").body)
        .await
        .unwrap()
}

/// Waits until a handler has changed the stock and is holding its answer: its transaction is
/// open after the read of the stock that follows the update (or, were the change not in the
/// request's transaction, the change is already visible).
async fn wait_for_hold(pool: &PgPool, schema: &Schema) {
    let name = schema.name();
    let sql = format!(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'
                 AND query LIKE '%\"{name}\".inventory_stock ORDER BY sku') = 1
             OR (SELECT qty FROM \"{name}\".inventory_stock WHERE sku = 'SKU123') < 100"
    );
    wait_until(pool, &sql, "a handler holding its stock change").await;
}

/// The owner of the key's row (there is one key per test).
async fn owner(pool: &PgPool, schema: &Schema) -> Vec<u8> {
    let sql = format!("SELECT owner FROM \"{}\".idempotency_keys", schema.name());
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Retries a delivery while the key is still claimed (`409`), as a sender does.
async fn deliver_until_not_in_flight(addr: &str, key: &'static str) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = deliver_async(addr, key).await;
        if answer.status != 409 {
            return answer;
        }
        assert!(Instant::now() < deadline, "still in flight: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kill -9` while the handler holds its uncommitted stock change: the change never happens;
/// the retry after the lease (on another instance, which does not reset the stock) runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_hold_leaves_no_side_effect_and_the_retry_runs_once() {
    let (schema, url, pool) = (Schema::reserve("crash-kill"), database_url(), pool().await);
    let mut a = Inventory::start(&env(&schema, &url, "10000"));
    let pending = tokio::spawn({
        let addr = a.addr().to_owned();
        async move { deliver_async(&addr, "evt-1").await }
    });
    wait_for_hold(&pool, &schema).await;
    a.signal("KILL");
    a.wait(Duration::from_secs(10));
    assert_eq!(
        pending.await.unwrap().status,
        0,
        "the killed instance answered"
    );

    let mut b_env = env(&schema, &url, "0");
    b_env.push(("INITIAL_STOCK", "7"));
    let b = Inventory::start(&b_env);
    assert_eq!(
        inventory(b.addr()).await,
        r#"{"SKU123":100,"SKU456":100}"#,
        "the killed handler's change rolled back, and the second instance kept the stock"
    );
    let retry = deliver_until_not_in_flight(b.addr(), "evt-1").await;
    assert_eq!((retry.status, retry.replayed), (200, false), "{retry:?}");
    assert!(retry.body.contains(r#""SKU123":98"#), "{retry:?}");
    let again = deliver_async(b.addr(), "evt-1").await;
    assert_eq!((again.status, again.replayed), (200, true), "{again:?}");
    assert_eq!(again.body, retry.body);
    assert_eq!(inventory(b.addr()).await, r#"{"SKU123":98,"SKU456":100}"#);
}

/// An instance stopped (`SIGSTOP`) in the hold until its lease lapses and another instance takes
/// the key over: once continued, its commit is fenced out and rolled back (its client gets
/// `409 LeaseLost`), and the stock changes once, by the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_lease_then_the_stalled_commit_is_fenced_out() {
    let (schema, url, pool) = (Schema::reserve("crash-stop"), database_url(), pool().await);
    let a = Inventory::start(&env(&schema, &url, "2000"));
    let b = Inventory::start(&env(&schema, &url, "0"));
    let pending_a = tokio::spawn({
        let addr = a.addr().to_owned();
        async move { deliver_async(&addr, "evt-1").await }
    });
    wait_for_hold(&pool, &schema).await;
    let a_owner = owner(&pool, &schema).await;
    a.signal("STOP");
    let keys = format!("\"{}\".idempotency_keys", schema.name());
    wait_until(
        &pool,
        &format!("SELECT expires_at < clock_timestamp() FROM {keys}"),
        "the stopped instance's lease to lapse",
    )
    .await;

    // The other instance takes the key over; its handler then waits for the stock rows, which
    // the stopped instance's transaction still holds.
    let pending_b = tokio::spawn({
        let addr = b.addr().to_owned();
        async move { deliver_async(&addr, "evt-1").await }
    });
    let sql = format!("SELECT owner <> $1 FROM {keys}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let moved: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .bind(&a_owner)
            .fetch_one(&pool)
            .await
            .unwrap();
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second instance never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.signal("CONT");

    let answer_a = pending_a.await.unwrap();
    assert_eq!(answer_a.status, 409, "{answer_a:?}");
    assert!(answer_a.body.contains("LeaseLost"), "{answer_a:?}");
    let answer_b = pending_b.await.unwrap();
    assert_eq!(
        (answer_b.status, answer_b.replayed),
        (200, false),
        "{answer_b:?}"
    );
    assert!(answer_b.body.contains(r#""SKU123":98"#), "{answer_b:?}");
    assert_eq!(
        inventory(b.addr()).await,
        r#"{"SKU123":98,"SKU456":100}"#,
        "the stock changed once"
    );
    let replay = deliver_async(a.addr(), "evt-1").await;
    assert_eq!((replay.status, replay.replayed), (200, true), "{replay:?}");
    assert_eq!(replay.body, answer_b.body);
}
