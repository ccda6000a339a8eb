//! A bounded soak of the layer: a steady load of first deliveries, replays, in-flight
//! duplicates, reused keys and malformed keys, through a Redis-backed and a memory-backed layer
//! at once, for a fixed time. It checks that the process memory stays flat once the records'
//! lifetime is reached, that the memory store stays bounded, that every Redis key expires once
//! the load stops, and that no key ran twice while its record lived.
//!
//! ```text
//! scripts/soak.sh                           # 60 s, spawns its own redis-server
//! SOAK_SECS=600 scripts/soak.sh             # ten minutes
//! REDIS_URL=redis://127.0.0.1:6379/ scripts/soak.sh   # an existing server (keys under a unique prefix)
//! ```
//!
//! Environment (all optional):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `SOAK_SECS` | duration of the load | `60` |
//! | `SOAK_RPS` | requests per second, both layers together | `2000` |
//! | `SOAK_WORKERS` | concurrent clients | `32` |
//! | `SOAK_RECORD_TTL_MS` | record lifetime (and so the steady-state size) | `5000` |
//! | `SOAK_MAX_RSS_GROWTH_MB` | allowed growth of the resident set after warm-up | `16` |
//! | `REDIS_URL` | Redis to use; unset: a `redis-server` on a free port is spawned and killed | unset |
//! | `REDIS_SERVER` | the binary spawned when `REDIS_URL` is unset, e.g. `valkey-server` | `redis-server` |
//!
//! Prints one line per sample and a summary, and exits with status 1 if a check fails.

#![allow(clippy::print_stdout)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore, RedisStore};

/// Keys recently created, by id: duplicates only ever target the last `WINDOW` ids, so a slot
/// is reused long after its key stopped being sent.
const RING: usize = 1 << 14;
const WINDOW: u64 = 256;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|_| {
            eprintln!("soak: {name}={v} is not valid");
            std::process::exit(2)
        }),
        _ => default,
    }
}

/// Resident set size of this process, in bytes (`/proc/self/statm`, second field, in pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        Command::new("getconf")
            .arg("PAGESIZE")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096)
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A `redis-server` this program started, killed on drop.
struct OwnRedis(Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_redis() -> (String, OwnRedis) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let binary = std::env::var_os("REDIS_SERVER")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "redis-server".into());
    let child = Command::new(&binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("soak: cannot start {binary:?} ({e}); install redis-server, or set REDIS_SERVER or REDIS_URL");
            std::process::exit(2)
        });
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    (url, OwnRedis(child))
}

fn count_keys(url: &str, prefix: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().expect("connect to redis");
    let iter: redis::Iter<'_, String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(format!("{prefix}*"))
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(&mut conn)
        .expect("scan");
    iter.count()
}

/// What the handlers and clients count.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    created: AtomicU64,
    ok: AtomicU64,
    replayed: AtomicU64,
    conflict: AtomicU64,
    mismatch: AtomicU64,
    bad_request: AtomicU64,
    unexpected: AtomicU64,
    double_runs: AtomicU64,
}

/// The app: `POST /work/{store}` with the key `k{id}`; counts executions per key id.
fn app<St: tower_idempotency::IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    runs: Arc<Vec<AtomicU32>>,
    stats: Arc<Stats>,
) -> Router {
    let handler = move |key: IdempotencyKey, body: Bytes| {
        let runs = runs.clone();
        let stats = stats.clone();
        async move {
            let id: u64 = key.as_str()[1..].parse().unwrap_or(0);
            if runs[(id as usize) % RING].fetch_add(1, Ordering::SeqCst) > 0 {
                stats.double_runs.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            format!("{{\"key\":\"{}\",\"bytes\":{}}}", key.as_str(), body.len())
        }
    };
    Router::new()
        .route("/work", post(handler))
        .route_layer(layer)
}

/// A small, fast random source (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[tokio::main]
async fn main() {
    let secs: u64 = env("SOAK_SECS", 60);
    let rps: u64 = env("SOAK_RPS", 2000);
    let workers: u64 = env("SOAK_WORKERS", 32);
    let record_ttl = Duration::from_millis(env("SOAK_RECORD_TTL_MS", 5000));
    let max_growth_mb: f64 = env("SOAK_MAX_RSS_GROWTH_MB", 16.0);
    let lease = Duration::from_secs(2);

    let (url, _own) = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let (url, own) = spawn_redis();
            (url, Some(own))
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("soak:{}:{nanos}:", std::process::id());

    let stats = Arc::new(Stats::default());
    let ring = || Arc::new((0..RING).map(|_| AtomicU32::new(0)).collect::<Vec<_>>());
    let (redis_runs, memory_runs) = (ring(), ring());
    let redis_store = RedisStore::new(redis::Client::open(url.as_str()).unwrap())
        .await
        .unwrap_or_else(|e| {
            eprintln!("soak: cannot connect to {url}: {e}");
            std::process::exit(2)
        })
        .key_prefix(prefix.clone());
    let memory = MemoryStore::new();
    let apps = [
        app(
            IdempotencyLayer::new(redis_store)
                .record_ttl(record_ttl)
                .lease_ttl(lease),
            redis_runs.clone(),
            stats.clone(),
        ),
        app(
            IdempotencyLayer::new(memory.clone())
                .record_ttl(record_ttl)
                .lease_ttl(lease),
            memory_runs.clone(),
            stats.clone(),
        ),
    ];
    let rings = [redis_runs, memory_runs];
    // Next key id, per store.
    let next_id: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(1), AtomicU64::new(1)]);

    println!(
        "soak: {secs} s at {rps} req/s over {workers} clients; record TTL {record_ttl:?}, \
         lease {lease:?}; redis {url} prefix {prefix}"
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_secs_f64(workers as f64 / rps.max(1) as f64);
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let apps = apps.clone();
        let rings = rings.clone();
        let next_id = next_id.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(worker.wrapping_mul(0x1234_5678_9abc_def1) ^ 0x5eed);
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                let which = (rng.next() % 2) as usize;
                let roll = rng.next() % 100;
                let newest = next_id[which].load(Ordering::SeqCst);
                let (key, body) = if roll < 45 || newest <= WINDOW {
                    // A first delivery.
                    let id = next_id[which].fetch_add(1, Ordering::SeqCst);
                    rings[which][(id as usize) % RING].store(0, Ordering::SeqCst);
                    (format!("k{id}"), "payload")
                } else if roll < 90 {
                    // A retry of a recent key (a replay, or a 409 while it runs).
                    let id = newest - 1 - rng.next() % WINDOW.min(newest - 1);
                    (format!("k{id}"), "payload")
                } else if roll < 95 {
                    // A recent key reused for another payload.
                    let id = newest - 1 - rng.next() % WINDOW.min(newest - 1);
                    (format!("k{id}"), "another payload")
                } else {
                    ("bad key".to_owned(), "payload")
                };
                let req = Request::post("/work")
                    .header("idempotency-key", key)
                    .body(Body::from(body))
                    .unwrap();
                stats.requests.fetch_add(1, Ordering::Relaxed);
                let Ok(response) = apps[which].clone().oneshot(req).await;
                let counter = match response.status() {
                    StatusCode::OK if response.headers().contains_key("idempotent-replayed") => {
                        &stats.replayed
                    }
                    StatusCode::OK => &stats.created,
                    StatusCode::CONFLICT => &stats.conflict,
                    StatusCode::UNPROCESSABLE_ENTITY => &stats.mismatch,
                    StatusCode::BAD_REQUEST => &stats.bad_request,
                    _ => &stats.unexpected,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if response.status() == StatusCode::OK {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Warm-up: the record lifetime twice over (the steady state), at least a tenth of the run.
    let warm_up = (record_ttl * 2).max(Duration::from_secs(secs) / 10);
    let mut baseline = None;
    let mut peak = 0u64;
    let mut memory_peak = 0usize;
    let sample_every = Duration::from_secs(5).min(Duration::from_secs(secs.max(1)) / 4);
    while Instant::now() < deadline {
        tokio::time::sleep(sample_every.min(deadline - Instant::now())).await;
        let rss = rss_bytes();
        let t = started.elapsed();
        if baseline.is_none() && t >= warm_up {
            baseline = Some(rss);
        }
        if baseline.is_some() {
            peak = peak.max(rss);
            memory_peak = memory_peak.max(memory.len());
        }
        println!(
            "t={:>5.1}s rss={:>7.1} MiB requests={} created={} replayed={} 409={} 422={} 400={} \
             other={} memory-store entries={}",
            t.as_secs_f64(),
            mib(rss),
            stats.requests.load(Ordering::Relaxed),
            stats.created.load(Ordering::Relaxed),
            stats.replayed.load(Ordering::Relaxed),
            stats.conflict.load(Ordering::Relaxed),
            stats.mismatch.load(Ordering::Relaxed),
            stats.bad_request.load(Ordering::Relaxed),
            stats.unexpected.load(Ordering::Relaxed),
            memory.len(),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a client task failed");
    }
    let end_rss = rss_bytes();
    let elapsed = started.elapsed();
    let requests = stats.requests.load(Ordering::Relaxed);
    let created = stats.created.load(Ordering::Relaxed);
    let keys_at_end = count_keys(&url, &prefix);

    // Every record and every claim lapses once the load stops.
    let linger = record_ttl + lease + Duration::from_secs(1);
    println!(
        "load stopped: {requests} requests in {:.1} s; waiting {linger:?} for the TTLs",
        elapsed.as_secs_f64()
    );
    tokio::time::sleep(linger).await;
    let keys_after_ttl = count_keys(&url, &prefix);

    let baseline = baseline.unwrap_or(end_rss);
    let growth = mib(end_rss.saturating_sub(baseline));
    // Live memory-store entries are at most the keys created within a record lifetime (plus
    // running claims); between sweeps the store may hold as many again, expired.
    let created_per_sec = created as f64 / elapsed.as_secs_f64();
    let memory_bound = (3.0 * created_per_sec * (record_ttl + lease).as_secs_f64()) as usize + 256;
    println!("summary:");
    println!(
        "  rss: start of steady state {:.1} MiB, peak {:.1} MiB, end {:.1} MiB, growth {growth:.1} MiB (allowed {max_growth_mb} MiB)",
        mib(baseline),
        mib(peak.max(end_rss)),
        mib(end_rss),
    );
    println!(
        "  redis keys under the prefix: {keys_at_end} when the load stopped, {keys_after_ttl} after the TTLs"
    );
    println!(
        "  memory store: peak {memory_peak} entries after warm-up (bound {memory_bound}), {} at the end",
        memory.len()
    );
    let double_runs = stats.double_runs.load(Ordering::Relaxed);
    let unexpected = stats.unexpected.load(Ordering::Relaxed);
    println!(
        "  answers: {} ok ({created} first runs, {} replays), {} 409, {} 422, {} 400, {unexpected} other; {double_runs} keys ran twice",
        stats.ok.load(Ordering::Relaxed),
        stats.replayed.load(Ordering::Relaxed),
        stats.conflict.load(Ordering::Relaxed),
        stats.mismatch.load(Ordering::Relaxed),
        stats.bad_request.load(Ordering::Relaxed),
    );

    let mut failures = Vec::new();
    if growth > max_growth_mb {
        failures.push(format!(
            "resident memory grew {growth:.1} MiB after warm-up"
        ));
    }
    if keys_after_ttl != 0 {
        failures.push(format!("{keys_after_ttl} Redis keys outlived their TTL"));
    }
    if memory_peak > memory_bound {
        failures.push(format!(
            "the memory store held {memory_peak} entries (bound {memory_bound})"
        ));
    }
    if double_runs != 0 {
        failures.push(format!("{double_runs} keys ran twice"));
    }
    if unexpected != 0 {
        failures.push(format!("{unexpected} unexpected answers"));
    }
    if created == 0 || stats.replayed.load(Ordering::Relaxed) == 0 {
        failures.push("the load produced no runs or no replays".to_owned());
    }
    if failures.is_empty() {
        println!("soak: ok");
    } else {
        for failure in &failures {
            println!("soak: FAILED: {failure}");
        }
        std::process::exit(1);
    }
}
