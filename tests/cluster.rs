//! `RedisStore` on a real Redis Cluster (feature `cluster`): 3 masters and 3 replicas, started by
//! `common::cluster::RedisCluster` on free ports of 127.0.0.1.
//!
//! - the store conformance suite (`common/conformance.rs`), every case on a cluster of its own;
//! - many keys times many duplicates through several layer instances: every key runs once, and
//!   the keys spread over the three masters;
//! - the key layout: no hash tag, so the entries of different keys spread over slots and nodes;
//! - a master killed while requests flow: what callers get during the failover and after its
//!   replica is promoted.
//!
//! # At most once across a failover, not exactly once
//!
//! Redis replicates asynchronously: a master acknowledges a write before any replica has it. If
//! the master dies in that window and its replica is promoted, the write is gone. For this layer
//! that opens two windows on the keys of the failed master:
//!
//! - a record completed on the master just before it died may vanish, and a retry of that key
//!   then runs the handler a second time. Nothing on the client side tells such a write from a
//!   replicated one. `WAIT` after the write closes the window for the writes before it (the
//!   failover test issues `WAIT 1 1000` on purpose to make its first records durable), but the
//!   layer does not issue it, and even `WAIT` does not make Redis a consensus store;
//! - a handler that was running when the master died cannot store its response (its caller
//!   still gets it): the key is left running if the claim reached the replica (the retry gets
//!   `409` until the lease lapses, then runs it again), or free if not (the retry runs it again).
//!
//! So across a failover the guarantee is: a key whose completed record reached the promoted
//! replica, or lives on a master that did not fail, is never run again; a key of the failed
//! master that completed (or was running) in the moments before it died may run once more. The
//! failover test asserts the first part and counts the second.
//!
//! While the failed master's slots have no owner (from the kill until its replica is promoted,
//! a little over twice the node timeout here), every request for them is refused with `503`
//! within the store timeout: the layer fails closed, the handler does not run. Requests for the
//! other masters' slots are served meanwhile, but for the odd one that arrives while the cluster
//! client refreshes its slot map (every request of a cluster connection waits for the refresh):
//! it can time out and be refused too, so the test does not assert that none is.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::post;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use redis::cluster_async::ClusterConnection;
use tower::ServiceExt;
use tower_idempotency::{IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, RedisStore};

use common::cluster::{NODE_TIMEOUT, RedisCluster};
use common::stub::Stub;
use common::{bounded, unique_prefix};

type ClusterStore = RedisStore<ClusterConnection>;

/// Starts a cluster (a few seconds of blocking work) without stalling the runtime's other tasks.
fn start_cluster() -> RedisCluster {
    tokio::task::block_in_place(RedisCluster::start)
}

async fn cluster_store(cluster: &RedisCluster, prefix: &str) -> ClusterStore {
    RedisStore::cluster(cluster.client())
        .await
        .expect("connect to the cluster")
        .key_prefix(prefix)
}

// ---------------------------------------------------------------------------------------------
// The conformance suite.
// ---------------------------------------------------------------------------------------------

/// Every case on a cluster of its own; the guard keeps it alive until the test ends.
async fn conformance_store(
    test: &'static str,
) -> (
    tower_idempotency::RedisStore<redis::cluster_async::ClusterConnection>,
    RedisCluster,
) {
    let cluster = start_cluster();
    let prefix = unique_prefix(&format!("cluster:{test}"));
    let store = cluster_store(&cluster, &prefix).await;
    (store, cluster)
}

mod conformance_suite {
    tower_idempotency::store_conformance_tests!(super::conformance_store);
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// Handler executions per idempotency key.
#[derive(Clone, Default)]
struct Executions(Arc<Mutex<HashMap<String, usize>>>);

impl Executions {
    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

/// `POST /pay` behind `layer`: counts its executions per key, works for `work`, and answers
/// `200` with the key, the run number and the body.
fn router<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    runs: &Executions,
    work: Duration,
) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/pay",
            post(move |headers: HeaderMap, body: Bytes| {
                let runs = runs.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    let n = {
                        let mut runs = runs.0.lock().unwrap();
                        let n = runs.entry(key.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    tokio::time::sleep(work).await;
                    format!("paid {key} (run {n}): {}", String::from_utf8_lossy(&body))
                }
            }),
        )
        .route_layer(layer)
}

#[derive(Clone, Debug)]
struct Reply {
    status: StatusCode,
    replayed: bool,
    body: Bytes,
    started: Instant,
    elapsed: Duration,
}

impl Reply {
    fn fresh(&self) -> bool {
        self.status == StatusCode::OK && !self.replayed
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `POST /pay` with idempotency key `key` (and the key as the body). A request that takes more
/// than 15 seconds fails the test: nothing may hang.
async fn send(app: &Router, key: &str) -> Reply {
    let req = Request::post("/pay")
        .header("idempotency-key", key)
        .body(Body::from(key.to_owned()))
        .unwrap();
    let started = Instant::now();
    let response = bounded(
        Duration::from_secs(15),
        &format!("request with key {key}"),
        app.clone().oneshot(req),
    )
    .await
    .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        replayed: parts
            .headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v == "true"),
        body,
        started,
        elapsed: started.elapsed(),
    }
}

/// The scoped key the layer hands the store for an idempotency key on `/pay`, learned by sending
/// the request through the same router over an in-memory store (the derivation depends only on
/// the route, the scope and the key).
struct ScopedKeys {
    app: Router,
    spy: Stub,
}

impl ScopedKeys {
    fn new() -> Self {
        let spy = Stub::memory();
        let app = router(
            IdempotencyLayer::new(spy.clone()),
            &Executions::default(),
            Duration::ZERO,
        );
        Self { app, spy }
    }

    async fn of(&self, key: &str) -> String {
        send(&self.app, key).await;
        self.spy.claimed().last().cloned().unwrap()
    }
}

/// Sends `keys` through `app` with at most 16 requests at a time, in order of `keys`.
async fn send_all(app: &Router, keys: &[String]) -> Vec<Reply> {
    futures_util::stream::iter(keys)
        .map(|key| send(app, key))
        .buffered(16)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// Layout.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_carry_no_hash_tag_and_spread_over_slots_and_masters() {
    const KEYS: usize = 64;
    let cluster = start_cluster();
    let prefix = unique_prefix("cluster:layout");
    assert!(!prefix.contains(['{', '}']), "{prefix}");
    let store = cluster_store(&cluster, &prefix).await;
    assert_eq!(store.redis_key("abc"), format!("{prefix}abc"));

    let runs = Executions::default();
    let app = router(IdempotencyLayer::new(store.clone()), &runs, Duration::ZERO);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("layout-{i}")).collect();
    for reply in send_all(&app, &keys).await {
        assert!(reply.fresh(), "{reply:?}");
    }

    // What the layer wrote: one entry per key, `<prefix><32 hex digits>`, on the master that owns
    // its slot.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters {masters:?}");
    let mut slots = HashMap::new();
    let mut per_master = BTreeMap::new();
    for &master in &masters {
        let on_master = cluster.keys_on(master, &prefix);
        per_master.insert(master, on_master.len());
        for redis_key in on_master {
            let digest = redis_key.strip_prefix(&prefix).unwrap();
            assert!(
                digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "entry {redis_key:?} is not <prefix><32 hex digits>"
            );
            assert!(!redis_key.contains(['{', '}']), "hash tag in {redis_key:?}");
            let slot = cluster.keyslot(&redis_key);
            assert_eq!(cluster.master_for_slot(slot), master, "{redis_key}");
            slots.insert(redis_key, slot);
        }
    }
    assert_eq!(slots.len(), KEYS, "entries per master: {per_master:?}");
    let distinct = slots
        .values()
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!("layout: {KEYS} keys in {distinct} slots; entries per master {per_master:?}");
    assert!(
        distinct > KEYS / 2,
        "{KEYS} keys share only {distinct} slots"
    );
    assert!(
        per_master.values().all(|&n| n > 0),
        "a master holds no entry: {per_master:?}"
    );

    // The counter-example: a hash tag in the prefix sends every entry to one slot.
    let tagged = store.clone().key_prefix(format!("{{{prefix}}}"));
    let tagged_slots: std::collections::HashSet<u16> = (0..16)
        .map(|i| cluster.keyslot(&tagged.redis_key(&format!("{i:032x}"))))
        .collect();
    assert_eq!(tagged_slots.len(), 1, "{tagged_slots:?}");
    let plain_slots: std::collections::HashSet<u16> = (0..16)
        .map(|i| cluster.keyslot(&store.redis_key(&format!("{i:032x}"))))
        .collect();
    assert!(plain_slots.len() > 8, "{plain_slots:?}");
    assert_eq!(runs.total(), KEYS);
}

// ---------------------------------------------------------------------------------------------
// Concurrency.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_over_three_masters_run_each_key_once() {
    const KEYS: usize = 60;
    const DUPLICATES: usize = 8;
    const INSTANCES: usize = 3;
    let cluster = start_cluster();
    let prefix = unique_prefix("cluster:concurrency");
    let runs = Executions::default();
    let mut apps = Vec::new();
    for _ in 0..INSTANCES {
        // Each instance with a cluster connection of its own, as separate processes would have.
        let store = cluster_store(&cluster, &prefix).await;
        apps.push(router(
            IdempotencyLayer::new(store),
            &runs,
            Duration::from_millis(100),
        ));
    }

    let wave = |apps: Vec<Router>| async move {
        let barrier = Arc::new(tokio::sync::Barrier::new(KEYS * DUPLICATES));
        let mut tasks = Vec::new();
        for k in 0..KEYS {
            for d in 0..DUPLICATES {
                let app = apps[(k + d) % INSTANCES].clone();
                let barrier = barrier.clone();
                let key = format!("order-{k}");
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let reply = send(&app, &key).await;
                    (key, reply)
                }));
            }
        }
        let mut by_key: BTreeMap<String, Vec<Reply>> = BTreeMap::new();
        for task in tasks {
            let (key, reply) = task.await.unwrap();
            by_key.entry(key).or_default().push(reply);
        }
        by_key
    };

    let started = Instant::now();
    let first = wave(apps.clone()).await;
    let took = started.elapsed();
    let mut conflicts = 0;
    let mut replays = 0;
    let mut bodies = HashMap::new();
    for (key, replies) in &first {
        for reply in replies {
            assert!(
                reply.status == StatusCode::OK || reply.status == StatusCode::CONFLICT,
                "{key}: {} {}",
                reply.status,
                reply.text()
            );
        }
        conflicts += replies
            .iter()
            .filter(|r| r.status == StatusCode::CONFLICT)
            .count();
        replays += replies.iter().filter(|r| r.replayed).count();
        let fresh: Vec<&Reply> = replies.iter().filter(|r| r.fresh()).collect();
        assert_eq!(fresh.len(), 1, "{key}: fresh responses {fresh:?}");
        for reply in replies.iter().filter(|r| r.status == StatusCode::OK) {
            assert_eq!(reply.body, fresh[0].body, "{key}: a replay differs");
        }
        assert_eq!(runs.of(key), 1, "{key} ran {} times", runs.of(key));
        bodies.insert(key.clone(), fresh[0].body.clone());
    }
    assert_eq!(runs.total(), KEYS);

    // The entries are spread over all three masters.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters {masters:?}");
    let per_master: BTreeMap<u16, usize> = masters
        .iter()
        .map(|&m| (m, cluster.keys_on(m, &prefix).len()))
        .collect();
    eprintln!(
        "concurrency: {} requests in {took:?}: {KEYS} ran, {conflicts} got 409, {replays} \
         replayed; entries per master {per_master:?}",
        KEYS * DUPLICATES
    );
    assert!(
        per_master.values().all(|&n| n > 0),
        "keys not spread over every master: {per_master:?}"
    );
    assert_eq!(per_master.values().sum::<usize>(), KEYS, "{per_master:?}");

    // A second storm of the same keys: every request replays the first response.
    let second = wave(apps).await;
    for (key, replies) in &second {
        for reply in replies {
            assert!(
                reply.status == StatusCode::OK && reply.replayed,
                "{key}: {reply:?}"
            );
            assert_eq!(reply.body, bodies[key], "{key}");
        }
    }
    assert_eq!(runs.total(), KEYS);
}

// ---------------------------------------------------------------------------------------------
// Failover.
// ---------------------------------------------------------------------------------------------

/// One request of the load that runs across the failover.
struct Sample {
    key: String,
    /// A key completed before the kill (a replay is expected), not a new one.
    old: bool,
    reply: Reply,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_gives_503_during_and_correct_behaviour_after() {
    const STORE_TIMEOUT: Duration = Duration::from_secs(1);
    const WORK: Duration = Duration::from_millis(10);
    const BEFORE: usize = 48;
    const WORKERS: usize = 6;
    let slack = Duration::from_secs(1);

    let mut cluster = start_cluster();
    let prefix = unique_prefix("cluster:failover");
    let store = cluster_store(&cluster, &prefix).await;
    let spy = Stub::new(store.clone());
    let runs = Executions::default();
    // The default lease (30 s) outlasts the test: a key whose claim reached Redis but whose
    // request failed stays claimed (409) rather than running again.
    let app = router(
        IdempotencyLayer::new(spy.clone()).store_timeout(STORE_TIMEOUT),
        &runs,
        WORK,
    );
    let scoped = ScopedKeys::new();

    // Before: keys completed on a healthy cluster.
    let mut originals: BTreeMap<String, Bytes> = BTreeMap::new();
    for i in 0..BEFORE {
        let key = format!("before-{i}");
        let reply = send(&app, &key).await;
        assert!(reply.fresh(), "{key}: {reply:?}");
        originals.insert(key, reply.body);
    }
    let masters_before = cluster.masters();
    assert_eq!(masters_before.len(), 3);
    let first_key = store.redis_key(&scoped.of("before-0").await);
    let victim = cluster.master_for_key(&first_key);
    let victim_slots = cluster
        .cluster_nodes(victim)
        .into_iter()
        .find(|l| l.port == victim)
        .unwrap()
        .slots;
    let in_victim = |slot: u16| victim_slots.iter().any(|&(a, b)| a <= slot && slot <= b);
    let mut slot_of: HashMap<String, u16> = HashMap::new();
    for key in originals.keys() {
        let slot = cluster.keyslot(&store.redis_key(&scoped.of(key).await));
        slot_of.insert(key.clone(), slot);
    }
    let old_on_victim = originals.keys().filter(|k| in_victim(slot_of[*k])).count();
    assert!(
        old_on_victim > 0 && old_on_victim < BEFORE,
        "{old_on_victim} of {BEFORE} keys on the victim"
    );
    // Make the records of these keys durable on the victim's replica before it is promoted:
    // without this, the last of them could be lost with the master (see the module docs).
    let acked = tokio::task::block_in_place(|| cluster.replicate(victim));
    assert!(acked >= 1, "WAIT: {acked} replicas acknowledged");

    // Keys of the victim's slots, to probe when the clients reach the promoted replica.
    let mut probes = Vec::new();
    for i in 0.. {
        if probes.len() == 40 {
            break;
        }
        let key = format!("probe-{i}");
        let slot = cluster.keyslot(&store.redis_key(&scoped.of(&key).await));
        if in_victim(slot) {
            slot_of.insert(key.clone(), slot);
            probes.push(key);
        }
    }

    // During: workers send new keys and replays of the old ones, while the victim is killed and
    // its replica promoted.
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let old_keys: Arc<Vec<String>> = Arc::new(originals.keys().cloned().collect());
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (app, stop, counter) = (app.clone(), stop.clone(), counter.clone());
            let (samples, old_keys) = (samples.clone(), old_keys.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let old = n % 2 == 1;
                    let key = if old {
                        old_keys[(n / 2) % old_keys.len()].clone()
                    } else {
                        format!("during-{n}")
                    };
                    let reply = send(&app, &key).await;
                    samples.lock().unwrap().push(Sample { key, old, reply });
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill_started = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(victim));
    let killed = Instant::now();
    let promoted =
        tokio::task::block_in_place(|| cluster.wait_for_failover(victim, Duration::from_secs(20)));
    let failed_over = Instant::now();
    // The layer reaches the victim's slots again once its cluster connection has learnt the new
    // topology: probe with new keys of those slots until one runs.
    let mut probes = probes.into_iter();
    let recovered = loop {
        let key = probes
            .next()
            .expect("recovered before running out of probe keys");
        let reply = send(&app, &key).await;
        let ran = reply.fresh();
        samples.lock().unwrap().push(Sample {
            key,
            old: false,
            reply,
        });
        if ran {
            break Instant::now();
        }
        assert!(
            failed_over.elapsed() < Duration::from_secs(10),
            "the failed master's slots are still unavailable 10 s after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("a load worker failed");
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    for sample in &samples {
        if !slot_of.contains_key(&sample.key) {
            let slot = cluster.keyslot(&store.redis_key(&scoped.of(&sample.key).await));
            slot_of.insert(sample.key.clone(), slot);
        }
    }
    let on_victim = |key: &str| in_victim(slot_of[key]);

    // What callers got: (phase the request started in, key of the failed master's slots?) ->
    // (200s, 503s).
    let phase = |at: Instant| match at {
        at if at < killed => "1 before the kill",
        at if at < failed_over => "2 kill to promotion",
        _ => "3 after promotion",
    };
    let mut table: BTreeMap<(&str, &str), (usize, usize)> = BTreeMap::new();
    let mut unavailable_before_kill = 0;
    let mut max_503 = Duration::ZERO;
    let mut max_elapsed = Duration::ZERO;
    let mut others_refused = Vec::new();
    for Sample { key, old, reply } in &samples {
        let slots = if on_victim(key) {
            "failed master's slots"
        } else {
            "other masters' slots"
        };
        let cell = table.entry((phase(reply.started), slots)).or_default();
        match reply.status {
            StatusCode::OK => cell.0 += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                cell.1 += 1;
                max_503 = max_503.max(reply.elapsed);
                // Refused within the store timeout: the layer never hangs on a dead node.
                assert!(
                    reply.elapsed <= STORE_TIMEOUT + slack,
                    "{key}: 503 after {:?}",
                    reply.elapsed
                );
                if reply.started + reply.elapsed < kill_started {
                    unavailable_before_kill += 1;
                }
                if !on_victim(key) {
                    // `saturating_duration_since` is zero for the earlier instant of the two.
                    let since_kill = reply
                        .started
                        .saturating_duration_since(killed)
                        .as_secs_f64()
                        - killed
                            .saturating_duration_since(reply.started)
                            .as_secs_f64();
                    others_refused.push(format!(
                        "{key}: sent at kill {since_kill:+.3} s, refused after {:?}",
                        reply.elapsed
                    ));
                }
            }
            other => panic!("{key}: unexpected {other}: {}", reply.text()),
        }
        max_elapsed = max_elapsed.max(reply.elapsed);
        // Claim and completion each within the store timeout: no request waits longer.
        assert!(
            reply.elapsed <= 2 * STORE_TIMEOUT + WORK + slack,
            "{key}: took {:?}",
            reply.elapsed
        );
        if *old && reply.status == StatusCode::OK {
            // A key completed (and replicated) before the kill is replayed, never run again.
            assert!(reply.replayed, "{key} ran again during the failover");
            assert_eq!(reply.body, originals[key], "{key}");
        }
    }
    eprintln!(
        "failover of master {victim} (node timeout {NODE_TIMEOUT:?}, store timeout \
         {STORE_TIMEOUT:?}, {WORKERS} clients): {} requests; every node agreed on replica \
         {promoted} {:?} after the kill; the layer ran a key of the failed master's slots again \
         {:?} after the kill; slowest 503 {max_503:?}, slowest request {max_elapsed:?}",
        samples.len(),
        failed_over - killed,
        recovered - killed,
    );
    for ((phase, slots), (ok, refused)) in &table {
        eprintln!("  {phase:20} {slots:22} {ok:5} x 200 {refused:4} x 503");
    }
    if !others_refused.is_empty() {
        eprintln!("  503s on the other masters' slots: {others_refused:?}");
    }
    assert_eq!(
        unavailable_before_kill, 0,
        "503s before the master was killed"
    );
    let refused_on_victim: usize = table
        .iter()
        .filter(|((p, s), _)| !p.starts_with('1') && s.starts_with("failed"))
        .map(|(_, (_, refused))| refused)
        .sum();
    assert!(
        refused_on_victim > 0,
        "no request for the failed master's slots was refused"
    );
    for key in originals.keys() {
        assert_eq!(runs.of(key), 1, "{key} ran again");
    }
    for Sample { key, reply, .. } in &samples {
        if reply.status == StatusCode::SERVICE_UNAVAILABLE && !originals.contains_key(key) {
            // A refused request never ran its handler.
            assert_eq!(runs.of(key), 0, "{key} ran although refused");
        }
    }

    // After: the cluster works again, with the promoted replica as master.
    let masters_after = cluster.masters();
    assert_eq!(masters_after.len(), 3, "{masters_after:?}");
    assert!(masters_after.contains(&promoted) && !masters_after.contains(&victim));

    // Every record made durable before the kill replays, on every master.
    let old: Vec<String> = originals.keys().cloned().collect();
    for (key, reply) in old.iter().zip(send_all(&app, &old).await) {
        assert!(
            reply.status == StatusCode::OK && reply.replayed,
            "{key}: {reply:?}"
        );
        assert_eq!(reply.body, originals[key], "{key}");
        assert_eq!(runs.of(key), 1, "{key}");
    }

    // New keys work on every master, the promoted one included: run once, then replay.
    let mut fresh_per_master: BTreeMap<u16, usize> = BTreeMap::new();
    let mut new_keys = Vec::new();
    for i in 0.. {
        if fresh_per_master.len() == 3 && fresh_per_master.values().all(|&n| n >= 3) {
            break;
        }
        let key = format!("after-{i}");
        let redis_key = store.redis_key(&scoped.of(&key).await);
        let master = cluster.master_for_key(&redis_key);
        let n = fresh_per_master.entry(master).or_default();
        if *n < 3 {
            *n += 1;
            new_keys.push(key);
        }
    }
    for (key, reply) in new_keys.iter().zip(send_all(&app, &new_keys).await) {
        assert!(reply.fresh(), "{key}: {reply:?}");
    }
    for (key, reply) in new_keys.iter().zip(send_all(&app, &new_keys).await) {
        assert!(
            reply.status == StatusCode::OK && reply.replayed,
            "{key}: {reply:?}"
        );
        assert_eq!(runs.of(key), 1, "{key}");
    }

    // Retries of the keys first sent during the load.
    let mut first_replies: BTreeMap<&str, &Reply> = BTreeMap::new();
    for Sample { key, old, reply } in &samples {
        if !old {
            first_replies.insert(key, reply);
        }
    }
    let keys: Vec<String> = first_replies.keys().map(|k| (*k).to_owned()).collect();
    let retries = send_all(&app, &keys).await;
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, retry) in keys.iter().zip(&retries) {
        let first = first_replies[key.as_str()];
        let acked = spy.completed_at(&scoped.of(key).await);
        let outcome = if first.status == StatusCode::SERVICE_UNAVAILABLE {
            // Refused, so never run; a retry runs it now, or finds the key claimed (409) when the
            // claim reached Redis but its answer did not reach the layer in time.
            assert!(
                retry.fresh() || retry.status == StatusCode::CONFLICT,
                "{key}: refused, then {retry:?}"
            );
            assert!(runs.of(key) <= 1, "{key}");
            if retry.fresh() {
                "refused; the retry ran it"
            } else {
                "refused; the retry found it claimed (409)"
            }
        } else if acked.is_some_and(|at| !on_victim(key) || at > killed) {
            // Completed on a master that did not fail, or on the promoted replica: durable.
            assert!(
                retry.status == StatusCode::OK && retry.replayed,
                "{key}: completed on a live master, then {retry:?}"
            );
            assert_eq!(retry.body, first.body, "{key}");
            assert_eq!(runs.of(key), 1, "{key}");
            "completed on a live master; replayed"
        } else {
            // Completed on the failed master shortly before it died (not known to be
            // replicated), or run but never completed because the master died meanwhile: the
            // at-most-once caveat. The retry may replay, find the key claimed until its lease
            // lapses (and then run it again), or run it again at once.
            assert!(
                retry.status == StatusCode::OK || retry.status == StatusCode::CONFLICT,
                "{key}: {retry:?}"
            );
            assert!(runs.of(key) <= 2, "{key}");
            match (acked.is_some(), retry.replayed, retry.fresh()) {
                (true, true, _) => "completed on the failed master before the kill; replayed",
                (true, _, true) => {
                    "completed on the failed master before the kill; LOST, ran again"
                }
                (false, true, _) => "completion unacknowledged; replayed",
                (false, _, true) => "completion unacknowledged; ran again",
                _ => "completion unacknowledged; claimed (409) until the lease lapses",
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("  retries of the {} new keys:", keys.len());
    for (outcome, n) in &outcomes {
        eprintln!("    {n:5} {outcome}");
    }
    // Only keys of the failed master may have run twice.
    for key in &keys {
        if runs.of(key) > 1 {
            assert!(
                on_victim(key),
                "{key} ran twice on a master that did not fail"
            );
        }
    }
}
