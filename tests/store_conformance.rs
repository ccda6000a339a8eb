//! One conformance suite for every `IdempotencyStore`: the claim/renew/complete/release state
//! machine, fencing by owner token, leases and record TTLs, and record round trips.
//!
//! The suite is the crate's conformance kit (feature `conformance`), run here through its public
//! entry, `store_conformance_tests!`, as a store written elsewhere would run it: for
//! `MemoryStore`, `RedisStore` with the native `SET .. NX GET` claim, with the Lua claim, and
//! with script fencing. Redis-specific behaviour
//! (corrupt values, TTLs on the server, key layout, the two claim paths sharing a prefix) is
//! tested below the suite.

mod common;

use std::time::Duration;

use http::StatusCode;
use tower_idempotency::conformance::*;
use tower_idempotency::{Attempt, Fenced, Fencing, IdempotencyStore, RedisStore, StoreError};

use common::{TestRedis, unique_prefix};

// ---------------------------------------------------------------------------------------------
// Instantiation.
// ---------------------------------------------------------------------------------------------

/// A Redis store under the test's own prefix, configured by `configure`, with the guard that
/// keeps a spawned server alive until the test ends.
async fn redis_store(
    test: &str,
    configure: fn(RedisStore) -> RedisStore,
) -> (RedisStore, TestRedis) {
    let redis = TestRedis::get();
    let store = RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(unique_prefix(test));
    (configure(store), redis)
}

/// A Redis store on `prefix`, shared with other stores of the same test.
async fn store_on(redis: &TestRedis, prefix: &str) -> RedisStore {
    RedisStore::new(redis.client())
        .await
        .unwrap()
        .key_prefix(prefix)
}

/// Two stores on the same prefix: one claiming natively, one with the Lua script.
async fn native_and_script(redis: &TestRedis, prefix: &str) -> (RedisStore, RedisStore) {
    let script = store_on(redis, prefix).await.claim_with_script(true);
    (store_on(redis, prefix).await, script)
}

mod memory {
    tower_idempotency::store_conformance_tests!(|_test| async {
        (tower_idempotency::MemoryStore::new(), ())
    });
}

mod redis_native_claim {
    tower_idempotency::store_conformance_tests!(|test| super::redis_store(test, |store| store));
}

mod redis_script_claim {
    tower_idempotency::store_conformance_tests!(|test| super::redis_store(test, |store| {
        store.claim_with_script(true)
    }));
}

mod redis_script_fence {
    tower_idempotency::store_conformance_tests!(|test| super::redis_store(test, |store| {
        store.fence_with_script(true)
    }));
}

// ---------------------------------------------------------------------------------------------
// Redis only.
// ---------------------------------------------------------------------------------------------

async fn connection(redis: &TestRedis) -> redis::aio::MultiplexedConnection {
    redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

async fn get_raw(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_corrupt_value_is_an_error_and_left_alone() {
    let redis = TestRedis::get();
    let mut conn = connection(&redis).await;
    let prefix = unique_prefix("corrupt");
    let (native, script) = native_and_script(&redis, &prefix).await;
    // Tokens of claims on other keys: fenced operations on garbage find no claim of theirs.
    let holder = Attempt::new(fp(2));
    let native_token = expect_acquired(&native, "held-native", &holder, LONG, "native").await;
    let script_token = expect_acquired(&script, "held-script", &holder, LONG, "script").await;

    let mut truncated_done = rich_record(fp(1), b"body").encode();
    truncated_done.truncate(20);
    let garbage: [&[u8]; 6] = [
        b"hello world",
        b"x",
        b"\x01R",
        b"\x02D0123456789",
        b"\x01Zzzzzzzzzzzzz",
        &truncated_done,
    ];
    for (i, value) in garbage.iter().enumerate() {
        for (name, store, token) in [
            ("native", &native, &native_token),
            ("script", &script, &script_token),
        ] {
            let key = format!("garbage-{name}-{i}");
            let redis_key = store.redis_key(&key);
            let _: () = redis::cmd("SET")
                .arg(&redis_key)
                .arg(*value)
                .query_async(&mut conn)
                .await
                .unwrap();

            let res = store.claim(&key, &holder, LONG).await;
            assert!(
                matches!(res, Err(StoreError::Corrupt(_))),
                "{name} claim of {value:?}: {res:?}"
            );
            // Fenced operations do not own garbage either.
            let record = plain_record(fp(2), StatusCode::OK, b"over");
            let fenced = store.complete(&key, token, &record, LONG).await.unwrap();
            assert_eq!(fenced, Fenced::NotOwner);
            let fenced = store.renew(&key, &mut token.clone(), LONG).await.unwrap();
            assert_eq!(fenced, Fenced::NotOwner);
            assert_eq!(
                store.release(&key, &holder).await.unwrap(),
                Fenced::NotOwner
            );

            assert_eq!(
                get_raw(&mut conn, &redis_key).await.as_deref(),
                Some(*value),
                "{name}: garbage overwritten"
            );
            assert_eq!(
                pttl(&mut conn, &redis_key).await,
                -1,
                "{name}: TTL set on garbage"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ttls_follow_lease_and_record_ttl() {
    let redis = TestRedis::get();
    let mut conn = connection(&redis).await;
    let prefix = unique_prefix("ttls");
    let (native, script) = native_and_script(&redis, &prefix).await;
    let lease = Duration::from_secs(5);
    let renewed = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let ms = |d: Duration| d.as_millis() as i64;

    for (name, store) in [("native", &native), ("script", &script)] {
        let key = format!("ttl-{name}");
        let redis_key = store.redis_key(&key);
        let mut token = expect_acquired(store, &key, &Attempt::new(fp(3)), lease, name).await;
        let t = pttl(&mut conn, &redis_key).await;
        assert!(
            t > ms(lease) - 1000 && t <= ms(lease),
            "{name}: PTTL after claim {t}"
        );

        assert!(
            store
                .renew(&key, &mut token, renewed)
                .await
                .unwrap()
                .applied()
        );
        let t = pttl(&mut conn, &redis_key).await;
        assert!(
            t > ms(renewed) - 1000 && t <= ms(renewed),
            "{name}: PTTL after renew {t}"
        );

        let record = rich_record(fp(3), b"ttl");
        assert!(
            store
                .complete(&key, &token, &record, ttl)
                .await
                .unwrap()
                .applied()
        );
        let t = pttl(&mut conn, &redis_key).await;
        assert!(
            t > ms(ttl) - 1000 && t <= ms(ttl),
            "{name}: PTTL after complete {t}"
        );

        // A replay leaves the TTL alone.
        expect_completed(store, &key, name).await;
        let t = pttl(&mut conn, &redis_key).await;
        assert!(
            t > ms(ttl) - 1000 && t <= ms(ttl),
            "{name}: PTTL after replay {t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_native_and_script_claims_interoperate() {
    let redis = TestRedis::get();
    let prefix = unique_prefix("interop");
    let (native, script) = native_and_script(&redis, &prefix).await;
    assert_eq!(native.redis_key("k"), script.redis_key("k"));

    for (first_name, first, second_name, second) in [
        ("native", &native, "script", &script),
        ("script", &script, "native", &native),
    ] {
        let what = format!("{first_name} then {second_name}");
        let key = format!("interop-{first_name}");
        let token = expect_acquired(first, &key, &Attempt::new(fp(4)), LONG, &what).await;
        let (holder, retry_after) = expect_in_flight(second, &key, &what).await;
        assert_eq!(holder, fp(4), "{what}");
        assert!(retry_after > LONG / 2 && retry_after <= LONG, "{what}");

        // The owner may finish through either configuration.
        let record = rich_record(fp(4), b"interop");
        assert!(
            second
                .complete(&key, &token, &record, LONG)
                .await
                .unwrap()
                .applied()
        );
        let got = expect_completed(first, &key, &what).await;
        assert_record_eq(&got, &record, &what);
        let got = expect_completed(second, &key, &what).await;
        assert_record_eq(&got, &record, &what);

        let key = format!("interop-release-{first_name}");
        let attempt = Attempt::new(fp(5));
        expect_acquired(first, &key, &attempt, LONG, &what).await;
        assert!(
            second.release(&key, &attempt).await.unwrap().applied(),
            "{what}"
        );
        expect_acquired(second, &key, &Attempt::new(fp(6)), LONG, &what).await;
        let (holder, _) = expect_in_flight(first, &key, &what).await;
        assert_eq!(holder, fp(6), "{what}");
    }
}

/// Whether the server has `SET .. IFEQ`: Redis 8.4 and later, Valkey 8.1 and later (Valkey
/// reports a frozen `redis_version` and its own `valkey_version`).
fn server_has_set_ifeq(info: &str) -> (bool, String) {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let parse = |v: &str| -> (u32, u32) {
        let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    match (field("valkey_version"), field("redis_version")) {
        (Some(valkey), _) => (parse(&valkey) >= (8, 1), format!("valkey {valkey}")),
        (None, Some(redis)) => (parse(&redis) >= (8, 4), format!("redis {redis}")),
        (None, None) => panic!("INFO server names no version:\n{info}"),
    }
}

/// The store fences with the native `SET .. IFEQ` where the server has it and with the script
/// elsewhere, deciding when it is made (`RedisStore::new` asks the server); a store made from a
/// connection fences with the script until a probe sent in the background has found out;
/// stores fenced either way work on the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fencing_follows_the_server() {
    let redis = TestRedis::get();
    let mut conn = connection(&redis).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (native_expected, server) = server_has_set_ifeq(&info);
    let prefix = unique_prefix("fencing");
    let want = if native_expected {
        Fencing::Native
    } else {
        Fencing::Script
    };
    let auto = store_on(&redis, &prefix).await;
    let script = store_on(&redis, &prefix).await.fence_with_script(true);
    assert_eq!(auto.fencing(), want, "decided when made; {server}");
    assert_eq!(script.fencing(), Fencing::Script);
    assert_eq!(script.detect_fencing().await.unwrap(), Fencing::Script);

    // Made from a connection: undecided, fenced with the script, until the background probe
    // that its first complete starts has answered.
    let from_connection = RedisStore::from_connection(connection(&redis).await).key_prefix(&prefix);
    assert_eq!(from_connection.fencing(), Fencing::Undecided);
    let token = expect_acquired(
        &from_connection,
        "first",
        &Attempt::new(fp(7)),
        LONG,
        "claim",
    )
    .await;
    let record = rich_record(fp(7), b"fenced");
    let fenced = from_connection
        .complete("first", &token, &record, LONG)
        .await;
    assert_eq!(fenced.unwrap(), Fenced::Applied);
    let probed = tokio::time::Instant::now() + Duration::from_secs(5);
    while from_connection.fencing() == Fencing::Undecided && tokio::time::Instant::now() < probed {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(from_connection.fencing(), want, "after the probe; {server}");
    assert_eq!(script.fencing(), Fencing::Script, "{server}");

    for (name, first, second) in [
        ("auto-script", &auto, &script),
        ("script-auto", &script, &auto),
    ] {
        let key = format!("mixed-{name}");
        let mut token = expect_acquired(first, &key, &Attempt::new(fp(8)), LONG, name).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let renewed = second.renew(&key, &mut token, LONG).await.unwrap();
        assert_eq!(renewed, Fenced::Applied, "{name}: renew");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let renewed = first.renew(&key, &mut token, LONG).await.unwrap();
        assert_eq!(renewed, Fenced::Applied, "{name}: renew back");
        let record = rich_record(fp(8), b"mixed");
        let completed = second.complete(&key, &token, &record, LONG).await.unwrap();
        assert_eq!(completed, Fenced::Applied, "{name}: complete");
        let got = expect_completed(first, &key, name).await;
        assert_record_eq(&got, &record, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_stay_under_the_prefix() {
    let redis = TestRedis::get();
    let mut conn = connection(&redis).await;
    let prefix = unique_prefix("layout");
    let (store, script) = native_and_script(&redis, &prefix).await;
    let (k1, k2, k3) = (
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
        "00000000000000000000000000000000",
    );
    assert_eq!(store.redis_key(k1), format!("{prefix}{k1}"));
    assert!(store.redis_key(k2).starts_with(&prefix));

    let before = redis.count_keys("");
    assert_eq!(redis.count_keys(&prefix), 0);

    // Completed, running (renewed), and released entries, through both claim paths.
    let mut a = expect_acquired(&store, k1, &Attempt::new(fp(7)), LONG, "k1").await;
    assert!(store.renew(k1, &mut a, LONG).await.unwrap().applied());
    let record = rich_record(fp(7), b"layout");
    assert!(
        store
            .complete(k1, &a, &record, LONG)
            .await
            .unwrap()
            .applied()
    );
    let mut b = expect_acquired(&script, k2, &Attempt::new(fp(8)), LONG, "k2").await;
    assert!(script.renew(k2, &mut b, LONG).await.unwrap().applied());
    let c = Attempt::new(fp(9));
    expect_acquired(&store, k3, &c, LONG, "k3").await;
    assert!(store.release(k3, &c).await.unwrap().applied());
    expect_in_flight(&store, k2, "k2").await;
    expect_completed(&script, k1, "k1").await;

    let mut keys: Vec<String> = Vec::new();
    {
        let scan = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .clone();
        let mut iter = scan.iter_async::<String>(&mut conn).await.unwrap();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
    }
    keys.sort();
    let mut want = vec![store.redis_key(k1), store.redis_key(k2)];
    want.sort();
    assert_eq!(keys, want, "keys under the prefix");
    assert_eq!(redis.count_keys(&prefix), 2);

    if redis.server.is_some() {
        // A server of our own: nothing else may exist at all.
        let size: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(size, 2, "keys written outside the prefix");
    } else {
        // A shared server: at least no new keys beyond ours appeared alongside them.
        assert!(redis.count_keys("") >= before + 2);
    }
}

/// A renewal whose reply was lost leaves the token's deadline behind the running record in
/// Redis; here copies of the token make renewals the original does not see. The original must
/// still renew and complete (the store reads the record back and fences on it), and once the
/// key is completed no copy may write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stale_token_still_owns() {
    let redis = TestRedis::get();
    let prefix = unique_prefix("stale-token");
    let native = store_on(&redis, &prefix).await;
    let script = store_on(&redis, &prefix).await.fence_with_script(true);
    for (name, store) in [("native", &native), ("script", &script)] {
        let key = format!("stale-{name}");
        let attempt = Attempt::new(fp(16));
        let mut token = expect_acquired(store, &key, &attempt, LONG, name).await;
        // Deadlines are in milliseconds: wait so that each renewal writes a different value.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut twin = token.clone();
        assert!(
            store.renew(&key, &mut twin, LONG).await.unwrap().applied(),
            "{name}: copy renews"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            store.renew(&key, &mut token, LONG).await.unwrap().applied(),
            "{name}: stale renews"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            store.renew(&key, &mut twin, LONG).await.unwrap().applied(),
            "{name}: stale copy renews"
        );

        let record = plain_record(fp(16), http::StatusCode::OK, b"done");
        let completed = store.complete(&key, &token, &record, LONG).await.unwrap();
        assert_eq!(
            completed,
            Fenced::Applied,
            "{name}: complete with a stale deadline"
        );
        let got = expect_completed(store, &key, name).await;
        assert_record_eq(&got, &record, name);

        let other = plain_record(fp(16), http::StatusCode::OK, b"again");
        let again = store.complete(&key, &twin, &other, LONG).await.unwrap();
        assert_eq!(
            again,
            Fenced::NotOwner,
            "{name}: a copy completes a completed key"
        );
        assert_eq!(
            store.renew(&key, &mut token, LONG).await.unwrap(),
            Fenced::NotOwner
        );
        assert_eq!(
            store.release(&key, &attempt).await.unwrap(),
            Fenced::NotOwner
        );
        let got = expect_completed(store, &key, name).await;
        assert_record_eq(&got, &record, name);
    }
}
