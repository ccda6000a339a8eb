//! Sequential requests in process through an axum router (`oneshot`, no sockets): the driver
//! behind the instruction counts in BENCHMARKS.md, and a quick timing of the same paths.
//!
//! ```sh
//! cargo bench --bench instructions                  # time every in-process variant
//! cargo bench --bench instructions -- memory 20000  # time one variant over N requests
//! scripts/instructions.sh                           # instructions per request, under callgrind
//! ```
//!
//! Each request is the throughput benchmark's: `POST /pay` with a 73-byte JSON body and an
//! `Idempotency-Key`, new for each request or the same for all (replays), answered with a
//! 201 and a 100-byte body. The variants are the throughput benchmark's, plus `null` (the layer
//! over a store that does nothing: its request path alone) and `memory-replay`. The Redis ones
//! use `REDIS_URL` if set (keys under a prefix of their own, never flushed), else a
//! `redis-server` started on a free port.
//!
//! Under callgrind, `scripts/instructions.sh` runs each variant with N and with 2N requests and
//! divides the difference by N, so what a run costs once (start-up, connecting, the first
//! request of a replay variant) cancels out.

#![allow(clippy::print_stdout)]

mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::IdempotencyLayer;

use support::null_store::NullStore;
use support::{
    KEY_HEADER, KEY_LEN, REQUEST_BODY, RedisServer, Variant, handler_router, router_for, write_key,
};

/// A variant of the throughput benchmark, or one of the in-process extras.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Variant(Variant),
    Null,
    MemoryReplay,
}

impl Mode {
    /// The variants that need no Redis, timed when no variant is named.
    const IN_PROCESS: [Self; 5] = [
        Self::Variant(Variant::Plain),
        Self::Null,
        Self::Variant(Variant::Memory),
        Self::MemoryReplay,
        Self::Variant(Variant::BaselineMemory),
    ];

    fn parse(name: &str) -> Option<Self> {
        match name {
            "null" => Some(Self::Null),
            "memory-replay" => Some(Self::MemoryReplay),
            _ => Variant::ALL
                .into_iter()
                .find(|v| v.name() == name)
                .map(Self::Variant),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Variant(v) => v.name(),
            Self::Null => "null",
            Self::MemoryReplay => "memory-replay",
        }
    }

    fn repeats_key(self) -> bool {
        match self {
            Self::Variant(v) => v.repeats_key(),
            Self::Null => false,
            Self::MemoryReplay => true,
        }
    }

    fn uses_redis(self) -> bool {
        matches!(self, Self::Variant(v) if v.uses_redis())
    }

    async fn router(self, redis_url: Option<&str>, response: Bytes) -> Router {
        match self {
            Self::Null => handler_router(response).route_layer(IdempotencyLayer::new(NullStore)),
            Self::MemoryReplay => router_for(Variant::Memory, "", response).await,
            Self::Variant(v) => {
                let url = redis_url.unwrap_or("");
                assert!(!v.uses_redis() || !url.is_empty(), "no Redis for {v:?}");
                router_for(v, url, response).await
            }
        }
    }
}

fn request(key: &str) -> Request<Body> {
    Request::post("/pay")
        .header(header::CONTENT_TYPE, "application/json")
        .header(KEY_HEADER, key)
        .body(Body::from(REQUEST_BODY))
        .expect("request")
}

async fn call(router: &Router, key: &str) {
    let response = router
        .clone()
        .oneshot(request(key))
        .await
        .expect("infallible");
    let status = response.status();
    assert!(status.is_success(), "{status}");
    let body = response.into_body().collect().await.expect("body");
    std::hint::black_box(body.to_bytes());
}

/// What one run of a variant measured.
struct Timing {
    /// Per request over the second half (the first half warms caches and grows tables).
    per_request: Duration,
    slowest: Duration,
}

/// Sends `n` sequential requests; keys are unique to this run (`run_id`) unless the variant
/// repeats one, which is then stored by one request before the `n`.
async fn drive(router: &Router, mode: Mode, run_id: &str, n: usize) -> Timing {
    let mut repeated = String::new();
    write_key(&mut repeated, &format!("{run_id}-r-"), 0);
    if mode.repeats_key() {
        call(router, &repeated).await;
    }
    let prefix = format!("{run_id}-");
    let mut key = String::with_capacity(KEY_LEN);
    let mut second_half = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        if i == n / 2 {
            second_half = Instant::now();
        }
        let started = Instant::now();
        if mode.repeats_key() {
            call(router, &repeated).await;
        } else {
            write_key(&mut key, &prefix, i as u64);
            call(router, &key).await;
        }
        slowest = slowest.max(started.elapsed());
    }
    let half = (n - n / 2).max(1) as u32;
    Timing {
        per_request: second_half.elapsed() / half,
        slowest,
    }
}

fn main() {
    // Cargo appends `--bench`; the rest are `[VARIANT [N]]`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let modes: Vec<Mode> = match args.first() {
        Some(name) => vec![Mode::parse(name).unwrap_or_else(|| {
            panic!(
                "unknown variant {name:?}: one of null, memory-replay, {}",
                Variant::ALL.map(Variant::name).join(", ")
            )
        })],
        None => Mode::IN_PROCESS.to_vec(),
    };
    let n: usize = args.get(1).map_or(20_000, |n| {
        n.parse()
            .unwrap_or_else(|_| panic!("{n:?} is not a number of requests"))
    });
    let mut spawned = None;
    let redis_url = if modes.iter().any(|m| m.uses_redis()) {
        Some(std::env::var("REDIS_URL").unwrap_or_else(|_| {
            let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            spawned.insert(RedisServer::spawn(&binary)).url()
        }))
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let response = Bytes::from(support::response_body(100));
    let run_id = format!("instr-{}", std::process::id());
    for mode in modes {
        let timing = rt.block_on(async {
            // As `axum::serve` does: a router finalized with its state turns its handlers into
            // services once, where an unfinalized one does so (and applies its route layers) on
            // every request.
            let router = mode
                .router(redis_url.as_deref(), response.clone())
                .await
                .with_state(());
            drive(&router, mode, &format!("{run_id}-{}", mode.name()), n).await
        });
        println!(
            "{:<16} {n:>8} requests  {:>8.0} ns/request (second half)  slowest {:.2} ms",
            mode.name(),
            timing.per_request.as_nanos(),
            timing.slowest.as_secs_f64() * 1e3
        );
    }
    drop(spawned);
}
