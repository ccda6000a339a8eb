//! End-to-end throughput of the idempotency layer over loopback HTTP, measured against its
//! ceiling (the same handler without the layer) and its floor (hand-written handlers doing the
//! fewest Redis commands a first delivery or a replay can take, on the same connection type,
//! and the least an in-memory first delivery can do: one map, claim then store).
//!
//! Run with `cargo bench --bench throughput`. It spawns its own `redis-server` on a free port
//! (never the one on 6379), starts one in-process axum server per variant on `127.0.0.1:0`, and
//! drives them with a small HTTP/1.1 keep-alive load generator on a thread of its own. Variants
//! are measured in the same run, interleaved, for several rounds; the table shows medians.
//!
//! Settings, from the environment:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `BENCH_ROUNDS` | rounds (each measures every variant once) | 7 |
//! | `BENCH_SECS` | measured seconds per variant per round | 1.5 |
//! | `BENCH_WARMUP_MS` | unmeasured warm-up before each measurement | 300 |
//! | `BENCH_CONCURRENCY` | requests in flight (one keep-alive connection each) | 64 |
//! | `BENCH_SERVER_THREADS` | worker threads of the servers' runtime (see below) | 1 |
//! | `BENCH_BODY` | response body size in bytes | 100 |
//! | `BENCH_VARIANTS` | comma-separated subset: plain, memory, redis-first, redis-replay, baseline-first, baseline-replay, baseline-fenced, cached-replay, baseline-memory | all |
//! | `BENCH_MEMORY` | `0` skips the memory-per-record measurement | 1 |
//! | `REDIS_SERVER` | the `redis-server` binary | `redis-server` |
//!
//! One server thread by default: with the load generator's thread beside it, that keeps one core
//! for the server on a two-core machine. With two server threads, three busy threads share two
//! cores and the scheduler's interleaving moves the rates by ±20 % from round to round (the
//! generator slows the server it measures); on larger machines raise it.

#![allow(clippy::print_stdout)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderValue, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use support::postgres::{self, PgBench};
use support::{
    KEY_HEADER, KEY_LEN, RECORD_TTL_MS, REQUEST_BODY, RedisServer, Variant, handler_router,
    redis_store, response_body, router_for, write_key,
};
use tower_idempotency::IdempotencyLayer;

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    rounds: usize,
    secs: f64,
    warmup: Duration,
    concurrency: usize,
    server_threads: usize,
    body: usize,
    variants: Vec<Variant>,
    memory: bool,
    redis_server: String,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        _ => default,
    }
}

impl Settings {
    fn from_env() -> Self {
        let variants = match std::env::var("BENCH_VARIANTS") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|name| {
                    Variant::ALL
                        .into_iter()
                        .chain(Variant::POSTGRES)
                        .find(|v| v.name() == name.trim())
                        .unwrap_or_else(|| panic!("unknown variant {name:?} in BENCH_VARIANTS"))
                })
                .collect(),
            _ => Variant::ALL.into_iter().chain(Variant::POSTGRES).collect(),
        };
        Self {
            rounds: env_or("BENCH_ROUNDS", 7usize).max(1),
            secs: env_or("BENCH_SECS", 1.5f64),
            warmup: Duration::from_millis(env_or("BENCH_WARMUP_MS", 300u64)),
            concurrency: env_or("BENCH_CONCURRENCY", 64usize).max(1),
            server_threads: env_or("BENCH_SERVER_THREADS", 1usize).max(1),
            body: env_or("BENCH_BODY", 100usize),
            variants,
            memory: env_or("BENCH_MEMORY", 1u8) != 0,
            redis_server: env_or("REDIS_SERVER", "redis-server".to_owned()),
        }
    }
}

/// Serves `router` on a fresh loopback port; returns the address.
async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The load generator

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, n: usize) -> Vec<Sender> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the bench server");
        tcp.set_nodelay(true).expect("nodelay");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("http handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        senders.push(sender);
    }
    senders
}

#[derive(Default)]
struct PhaseResult {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    /// Latencies in nanoseconds.
    latencies: Vec<u64>,
}

struct WorkerResult {
    sender: Sender,
    requests: u64,
    errors: u64,
    latencies: Vec<u64>,
}

/// Keeps every connection busy with back-to-back requests until `duration` has passed.
/// `key_base` is a prefix for unique keys, or the one key every request repeats.
async fn phase(
    senders: Vec<Sender>,
    duration: Duration,
    key_base: &str,
    repeat_key: bool,
) -> (Vec<Sender>, PhaseResult) {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::with_capacity(senders.len());
    for (worker, mut sender) in senders.into_iter().enumerate() {
        let prefix = if repeat_key {
            key_base.to_owned()
        } else {
            format!("{key_base}-{worker}-")
        };
        tasks.push(tokio::spawn(async move {
            let mut key = String::with_capacity(KEY_LEN);
            write_key(&mut key, &prefix, 0);
            let fixed = HeaderValue::from_str(&key).expect("ascii key");
            let body = Bytes::from_static(REQUEST_BODY);
            let mut latencies = Vec::with_capacity(16 * 1024);
            let (mut requests, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                let key_value = if repeat_key {
                    fixed.clone()
                } else {
                    write_key(&mut key, &prefix, requests);
                    HeaderValue::from_str(&key).expect("ascii key")
                };
                let req = hyper::Request::post("/pay")
                    .header(header::HOST, "bench")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(KEY_HEADER, key_value)
                    .body(Full::new(body.clone()))
                    .expect("request");
                let sent = Instant::now();
                if sender.ready().await.is_err() {
                    errors += 1;
                    break;
                }
                match sender.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let drained = resp.into_body().collect().await.is_ok();
                        latencies.push(sent.elapsed().as_nanos() as u64);
                        requests += 1;
                        if !(ok && drained) {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            WorkerResult {
                sender,
                requests,
                errors,
                latencies,
            }
        }));
    }
    let mut result = PhaseResult::default();
    let mut senders = Vec::with_capacity(tasks.len());
    for task in tasks {
        let w = task.await.expect("load generator task");
        result.requests += w.requests;
        result.errors += w.errors;
        result.latencies.extend(w.latencies);
        senders.push(w.sender);
    }
    result.elapsed = start.elapsed();
    (senders, result)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1e6
}

fn info(conn: &mut redis::Connection, section: &str) -> BTreeMap<String, String> {
    let text: String = redis::cmd("INFO").arg(section).query(conn).expect("INFO");
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn info_f64(conn: &mut redis::Connection, section: &str, field: &str) -> f64 {
    info(conn, section)
        .get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no numeric {field}"))
}

fn redis_cpu_secs(conn: &mut redis::Connection) -> f64 {
    let cpu = info(conn, "cpu");
    let get = |k: &str| {
        cpu.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    get("used_cpu_user") + get("used_cpu_sys")
}

/// Calls and microseconds per command since the last `CONFIG RESETSTAT`, leaving out the
/// bench's own bookkeeping commands.
fn commandstats(conn: &mut redis::Connection) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for (name, value) in info(conn, "commandstats") {
        let Some(cmd) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        if matches!(
            cmd,
            "info" | "config|resetstat" | "config" | "flushall" | "ping" | "client|setinfo"
        ) {
            continue;
        }
        let field = |f: &str| {
            value
                .split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(cmd.to_owned(), (field("calls"), field("usec")));
    }
    out
}

/// The `total_commands_processed` that the bookkeeping of one measurement adds by itself.
fn bookkeeping_commands(conn: &mut redis::Connection) -> u64 {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(conn)
        .expect("CONFIG RESETSTAT");
    redis_cpu_secs(conn);
    redis_cpu_secs(conn);
    commandstats(conn);
    info_f64(conn, "stats", "total_commands_processed") as u64
}

fn flushall(conn: &mut redis::Connection) {
    let _: () = redis::cmd("FLUSHALL")
        .arg("SYNC")
        .query(conn)
        .expect("FLUSHALL");
}

// ---------------------------------------------------------------------------------------------
// Measurement

#[derive(Default)]
struct Totals {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    requests: u64,
    errors: u64,
    /// Per command: calls, microseconds.
    commands: BTreeMap<String, (u64, u64)>,
    /// Top-level commands (`total_commands_processed`).
    processed: u64,
    redis_cpu_secs: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Bench {
    settings: Settings,
    redis: RedisServer,
    stats: redis::Connection,
    servers: tokio::runtime::Runtime,
    client: tokio::runtime::Runtime,
    /// How many commands the bench's own bookkeeping adds to `total_commands_processed`.
    own_commands: u64,
    /// The Postgres variants' schema and pool, when any runs.
    pg: Option<PgBench>,
}

impl Bench {
    fn measure(&mut self, variant: Variant, addr: SocketAddr, round: usize, totals: &mut Totals) {
        let s = &self.settings;
        let duration = Duration::from_secs_f64(s.secs);
        let repeat = variant.repeats_key();
        let key_base = |phase: &str| {
            if repeat {
                format!("replay-{}", variant.name())
            } else {
                format!("{}-{round}-{phase}", variant.name())
            }
        };
        flushall(&mut self.stats);
        if let Some(pg) = self.pg.as_ref().filter(|_| variant.uses_postgres()) {
            self.servers.block_on(pg.reset());
        }
        let senders = self.client.block_on(connect(addr, s.concurrency));
        let (senders, _) =
            self.client
                .block_on(phase(senders, s.warmup, &key_base("warm"), repeat));
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.stats)
            .expect("CONFIG RESETSTAT");
        let cpu_before = redis_cpu_secs(&mut self.stats);
        let (senders, mut result) =
            self.client
                .block_on(phase(senders, duration, &key_base("run"), repeat));
        let cpu_after = redis_cpu_secs(&mut self.stats);
        drop(senders);

        result.latencies.sort_unstable();
        totals
            .rps
            .push(result.requests as f64 / result.elapsed.as_secs_f64());
        totals.p50.push(percentile(&result.latencies, 0.50));
        totals.p99.push(percentile(&result.latencies, 0.99));
        totals.requests += result.requests;
        totals.errors += result.errors;
        for (cmd, (calls, usec)) in commandstats(&mut self.stats) {
            let entry = totals.commands.entry(cmd).or_default();
            entry.0 += calls;
            entry.1 += usec;
        }
        // Less the commands the bench itself sent since the reset.
        let processed = info_f64(&mut self.stats, "stats", "total_commands_processed") as u64;
        totals.processed += processed.saturating_sub(self.own_commands);
        totals.redis_cpu_secs += cpu_after - cpu_before;
    }
}

fn main() {
    // `cargo bench` passes `--bench`; anything else (a test run of every target) skips the run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: skipped (run it with `cargo bench --bench throughput`)");
        return;
    }
    let settings = Settings::from_env();
    let redis = RedisServer::spawn(&settings.redis_server);
    let stats = redis.client().get_connection().expect("stats connection");
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.server_threads)
        .enable_all()
        .build()
        .expect("server runtime");
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut bench = Bench {
        settings,
        redis,
        stats,
        servers,
        client,
        own_commands: 0,
        pg: None,
    };
    if bench.settings.variants.iter().any(|v| v.uses_postgres()) {
        bench.pg = Some(bench.servers.block_on(PgBench::setup()));
    }
    bench.own_commands = bookkeeping_commands(&mut bench.stats);
    let s = &bench.settings;
    let version = info(&mut bench.stats, "server")
        .get("redis_version")
        .cloned()
        .unwrap_or_default();
    let fence: redis::RedisResult<redis::Value> = redis::cmd("SET")
        .arg("bench:ifeq-probe")
        .arg("v")
        .arg("IFEQ")
        .arg("v")
        .query(&mut bench.stats);
    let fence = if fence.is_ok() {
        "native SET .. IFEQ"
    } else {
        "EVALSHA replace.lua (no SET .. IFEQ before Redis 8.4)"
    };
    println!("load average before: {}", loadavg());
    println!(
        "throughput: {} rounds x {} s per variant (+{} ms warm-up), {} in flight, {} server \
         threads, {} B responses, redis {version} on port {}; fenced writes: {fence}",
        s.rounds,
        s.secs,
        s.warmup.as_millis(),
        s.concurrency,
        s.server_threads,
        s.body,
        bench.redis.port
    );

    let response = Bytes::from(response_body(s.body));
    let url = bench.redis.url();
    let variants = s.variants.clone();
    let addrs: Vec<(Variant, SocketAddr)> = variants
        .iter()
        .map(|&v| {
            let router = match &bench.pg {
                Some(pg) if v.uses_postgres() => {
                    let _runtime = bench.servers.enter();
                    postgres::router_for(v, pg, response.clone())
                }
                _ => bench
                    .servers
                    .block_on(router_for(v, &url, response.clone())),
            };
            (v, bench.servers.block_on(serve(router)))
        })
        .collect();

    let mut totals: BTreeMap<Variant, Totals> = BTreeMap::new();
    let rounds = bench.settings.rounds;
    // Variants that are compared run back to back, in groups; the groups rotate from round to
    // round and each group's order flips, so a change in the machine's load between two
    // measurements falls on both sides of a ratio alike.
    let groups: Vec<Vec<(Variant, SocketAddr)>> = [
        &[
            Variant::Plain,
            Variant::Memory,
            Variant::BaselineMemory,
            Variant::CachedReplay,
        ][..],
        &[
            Variant::RedisFirst,
            Variant::BaselineFirst,
            Variant::BaselineFenced,
        ],
        &[Variant::RedisReplay, Variant::BaselineReplay],
        &[Variant::PgFirst, Variant::BaselinePg],
        &[Variant::PgReplay, Variant::BaselinePgReplay],
        &[Variant::PgTxFirst, Variant::BaselinePgTx],
    ]
    .iter()
    .map(|group| {
        addrs
            .iter()
            .filter(|(v, _)| group.contains(v))
            .copied()
            .collect::<Vec<_>>()
    })
    .filter(|group| !group.is_empty())
    .collect();
    for round in 0..rounds {
        for g in 0..groups.len() {
            let mut group = groups[(g + round) % groups.len()].clone();
            if round % 2 == 1 {
                group.reverse();
            }
            for (variant, addr) in group {
                bench.measure(variant, addr, round, totals.entry(variant).or_default());
            }
        }
        let line: Vec<String> = addrs
            .iter()
            .map(|(v, _)| format!("{} {:.0}", v.name(), totals[v].rps[round]))
            .collect();
        println!("round {}/{rounds}: {}", round + 1, line.join(", "));
    }

    println!("load average after: {}", loadavg());
    print_table(&totals);
    print_redis_costs(&totals);
    if bench.settings.memory {
        memory_per_record(&mut bench);
    }
    if let Some(pg) = bench.pg.take() {
        bench.servers.block_on(postgres_extras(&pg, &response));
        bench.servers.block_on(pg.drop_schema());
    }
    bench.servers.shutdown_background();
}

/// `/proc/loadavg`, to tell a quiet machine from a busy one.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn print_table(totals: &BTreeMap<Variant, Totals>) {
    println!();
    println!(
        "{:<32} {:>10} {:>9} {:>9} {:>8}   req/s per round",
        "variant", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (variant, t) in totals {
        let rounds: Vec<String> = t.rps.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{:<32} {:>10.0} {:>9.3} {:>9.3} {:>8}   {}",
            variant.label(),
            median(&t.rps),
            median(&t.p50),
            median(&t.p99),
            t.errors,
            rounds.join(" ")
        );
    }
    let rps = |v: Variant| totals.get(&v).map_or(f64::NAN, |t| median(&t.rps));
    println!();
    println!(
        "ratios: paired = median over rounds of the ratio of two back-to-back measurements; \
         of rates = ratio of the medians above"
    );
    let ratios = [
        (
            "3 / 5a  first delivery vs SET NX + SET",
            Variant::RedisFirst,
            Variant::BaselineFirst,
            0.95,
        ),
        (
            "4 / 5b  replay vs GET",
            Variant::RedisReplay,
            Variant::BaselineReplay,
            1.0,
        ),
        (
            "2 / 1   MemoryStore vs no layer",
            Variant::Memory,
            Variant::Plain,
            0.9,
        ),
        (
            "2 / 5m  MemoryStore vs map by hand",
            Variant::Memory,
            Variant::BaselineMemory,
            f64::NAN,
        ),
        (
            "5m / 1  map by hand vs no layer",
            Variant::BaselineMemory,
            Variant::Plain,
            f64::NAN,
        ),
        (
            "6 / 1   cached replay vs no layer",
            Variant::CachedReplay,
            Variant::Plain,
            0.9,
        ),
        (
            "3 / 1   Redis first delivery vs no layer",
            Variant::RedisFirst,
            Variant::Plain,
            f64::NAN,
        ),
        (
            "3 / 5c  the layer vs its own commands by hand",
            Variant::RedisFirst,
            Variant::BaselineFenced,
            f64::NAN,
        ),
        (
            "5c / 5a fenced commands vs SET NX + SET",
            Variant::BaselineFenced,
            Variant::BaselineFirst,
            f64::NAN,
        ),
        (
            "7 / 7a  PgStore first vs its SQL by hand",
            Variant::PgFirst,
            Variant::BaselinePg,
            0.9,
        ),
        (
            "8 / 8a  PgStore replay vs its SQL by hand",
            Variant::PgReplay,
            Variant::BaselinePgReplay,
            0.9,
        ),
        (
            "9 / 9a  transactional vs the INSERT alone",
            Variant::PgTxFirst,
            Variant::BaselinePgTx,
            0.85,
        ),
    ];
    println!(
        "  {:<46} {:>8} {:>8} {:>15}",
        "", "paired", "of rates", "paired min-max"
    );
    for (label, a, b, target) in ratios {
        let (Some(ta), Some(tb)) = (totals.get(&a), totals.get(&b)) else {
            continue;
        };
        // Per round, the two measurements were taken back to back (when in the same group).
        let paired: Vec<f64> = ta.rps.iter().zip(&tb.rps).map(|(x, y)| x / y).collect();
        let r = median(&paired);
        let lo = paired.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = paired.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let verdict = if target.is_nan() || r.is_nan() {
            String::new()
        } else if r >= target {
            format!("  target >= {target:.2}: holds")
        } else {
            format!("  target >= {target:.2}: MISSED")
        };
        println!(
            "  {label:<46} {r:>8.3} {:>8.3} {:>7.3}-{:<7.3}{verdict}",
            rps(a) / rps(b),
            lo,
            hi
        );
    }
}

fn print_redis_costs(totals: &BTreeMap<Variant, Totals>) {
    println!();
    println!("Redis per request (measured phases, all rounds):");
    println!(
        "  round trips = top-level commands (a script's own GETRANGE and SET/DEL count inside it);"
    );
    println!(
        "  per command: calls per request (usec per call); command usec = Redis time in \
         top-level commands; CPU = redis-server process CPU (commands + network I/O)"
    );
    for (variant, t) in totals.iter().filter(|(v, _)| v.uses_redis()) {
        let n = t.requests.max(1) as f64;
        let calls = |c: &str| t.commands.get(c).map_or(0, |(calls, _)| *calls);
        let usec = |c: &str| t.commands.get(c).map_or(0, |(_, us)| *us);
        // The crate's scripts each run one GETRANGE and then (when the owner matches, as it
        // always does here) one SET or DEL; both are counted by Redis inside the script too.
        let scripts = calls("evalsha") + calls("eval");
        let nested_calls = calls("getrange") + scripts;
        let nested_usec = usec("getrange")
            + usec("del")
            + (usec("set") * scripts.min(calls("set")))
                .checked_div(calls("set"))
                .unwrap_or(0);
        let all_usec: u64 = t.commands.values().map(|(_, us)| *us).sum();
        let per_command: Vec<String> = t
            .commands
            .iter()
            .filter(|(_, (calls, _))| *calls > 0)
            .map(|(cmd, (calls, us))| {
                format!(
                    "{cmd} {:.2} ({:.2})",
                    *calls as f64 / n,
                    *us as f64 / *calls as f64
                )
            })
            .collect();
        println!(
            "  {:<32} {:.2} round trips; {}; {:.2} command usec; {:.1} CPU usec",
            variant.label(),
            t.processed.saturating_sub(nested_calls) as f64 / n,
            per_command.join(", "),
            all_usec.saturating_sub(nested_usec) as f64 / n,
            t.redis_cpu_secs * 1e6 / n
        );
    }
}

/// `n` first deliveries to `addr`, one after another on one connection (keys `prefix-0`, ...).
async fn first_deliveries(addr: SocketAddr, prefix: &str, n: usize) {
    let mut senders = connect(addr, 1).await;
    let sender = &mut senders[0];
    for i in 0..n {
        let req = hyper::Request::post("/pay")
            .header(header::HOST, "bench")
            .header(KEY_HEADER, format!("{prefix}-{i}"))
            .body(Full::new(Bytes::from_static(REQUEST_BODY)))
            .expect("request");
        sender.ready().await.expect("connection");
        let resp = sender.send_request(req).await.expect("response");
        assert!(resp.status().is_success(), "status {}", resp.status());
        resp.into_body().collect().await.expect("body");
    }
}

// ---------------------------------------------------------------------------------------------
// Memory per stored record

fn memory_per_record(bench: &mut Bench) {
    println!();
    println!(
        "Redis memory per stored record (MEMORY USAGE of one key; used_memory delta over N keys)"
    );
    println!(
        "{:>8} {:>6} | {:>12} {:>12} {:>12} | {:>14} {:>14} | {:>10}",
        "body B",
        "N",
        "record B",
        "MEMORY USAGE",
        "delta/key",
        "by hand: usage",
        "by hand: delta",
        "body+200"
    );
    let url = bench.redis.url();
    for (size, n) in [(100usize, 5000usize), (10 * 1024, 1000)] {
        let body = Bytes::from(response_body(size));
        let prefix = format!("mem{size}:");
        let store = bench.servers.block_on(redis_store(&url, &prefix));
        let router = handler_router(body.clone()).route_layer(IdempotencyLayer::new(store));
        let addr = bench.servers.block_on(serve(router));

        // Through the layer.
        flushall(&mut bench.stats);
        let before = info_f64(&mut bench.stats, "memory", "used_memory");
        bench.client.block_on(first_deliveries(addr, "mem", n));
        let after = info_f64(&mut bench.stats, "memory", "used_memory");
        let dbsize: u64 = redis::cmd("DBSIZE")
            .query(&mut bench.stats)
            .expect("DBSIZE");
        assert_eq!(dbsize, n as u64, "one key per request");
        let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(100)
            .query(&mut bench.stats)
            .expect("SCAN");
        let key = keys.first().expect("a stored record");
        let record: u64 = redis::cmd("STRLEN")
            .arg(key)
            .query(&mut bench.stats)
            .expect("STRLEN");
        let usage: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query(&mut bench.stats)
            .expect("MEMORY USAGE");
        let delta = (after - before) / n as f64;

        // By hand: the body alone under a key of the same length, same TTL.
        flushall(&mut bench.stats);
        let before = info_f64(&mut bench.stats, "memory", "used_memory");
        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.cmd("SET")
                .arg(format!("{prefix}{i:032}"))
                .arg(&body[..])
                .arg("PX")
                .arg(RECORD_TTL_MS)
                .ignore();
        }
        let _: () = pipe.query(&mut bench.stats).expect("SET pipeline");
        let after = info_f64(&mut bench.stats, "memory", "used_memory");
        let hand_usage: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("{prefix}{:032}", 0))
            .arg("SAMPLES")
            .arg(0)
            .query(&mut bench.stats)
            .expect("MEMORY USAGE");
        let hand_delta = (after - before) / n as f64;
        flushall(&mut bench.stats);

        println!(
            "{:>8} {:>6} | {:>12} {:>12} {:>12.0} | {:>14} {:>14.0} | {:>10}",
            body.len(),
            n,
            record,
            usage,
            delta,
            hand_usage,
            hand_delta,
            body.len() + 200
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres: bytes per stored record, purge rate

async fn postgres_extras(pg: &PgBench, response: &Bytes) {
    println!();
    println!("Postgres per stored record ({} B response)", response.len());
    pg.reset().await;
    let n = 5000;
    for variant in [Variant::PgFirst, Variant::BaselinePg] {
        let addr = serve(postgres::router_for(variant, pg, response.clone())).await;
        first_deliveries(addr, "size", n).await;
    }
    for (label, table) in [
        ("layer (idempotency_keys)", "idempotency_keys"),
        ("by hand (body only)", "base_keys"),
    ] {
        let (total, row) = pg.bytes_per_row(table).await;
        println!("  {label:<28} {total:>8.0} B per record with index and TOAST, {row:>6.0} B row");
    }
    pg.reset().await;
    for batch in [1_000u32, 10_000] {
        let rate = pg.purge_rate(100_000, batch).await;
        println!("  purge_expired({batch}): {rate:.0} expired rows per second (100,000 rows)");
    }
}
