//! An `ORDER_PAID` webhook sender: the other end of `examples/inventory.rs`.
//!
//! Each delivery is one logical operation with one idempotency key, sent (and, when the
//! network or the receiver fails, sent again) with that key and the same body by the client
//! layer of this crate. Then the first delivery is sent once more with its key, as a sender
//! does when it cannot tell whether a delivery arrived (it crashed before recording the
//! answer): the receiver replays its answer and the stock does not move.
//!
//! # Running
//!
//! ```text
//! cargo run --example inventory                              # the receiver, on 127.0.0.1:3000
//! cargo run --example sender --features reqwest              # in another terminal
//! FLAKY=1 cargo run --example sender --features reqwest      # through a proxy that loses responses
//! CLIENT=reqwest cargo run --example sender --features reqwest
//! ```
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `TARGET` | the inventory example's base URL | `http://127.0.0.1:3000` |
//! | `DELIVERIES` | how many orders to send | `5` |
//! | `FLAKY` | `1`: send through a proxy, started here, that loses the response of every third connection after the receiver got the request, and resets every third connection before it | unset |
//! | `CLIENT` | `hyper` (the Tower layer on hyper-util's client) or `reqwest` (the middleware) | `hyper` |
//!
//! Each delivery prints its key, its attempts and whether the answer was a replay:
//!
//! ```text
//! delivery 1  order o-1  key 0b6f…  attempts 2  replayed true   200 {"SKU123":99,"SKU456":100}
//! ```
//!
//! A replay on a first delivery means an earlier attempt ran and its answer was lost on the
//! way back: the retry got the stored answer instead of running the order twice.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::IdempotencyKey;
use tower_idempotency::client::{ClientOutcome, IdempotencyMiddleware, IdempotentClientLayer};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The two clients this crate wraps, each built the documented way.
enum Sender {
    Hyper(
        tower_idempotency::client::IdempotentClient<
            Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
        >,
    ),
    Reqwest(reqwest_middleware::ClientWithMiddleware),
}

impl Sender {
    fn new(kind: &str, flaky: bool) -> Result<Self, Error> {
        let layer = IdempotentClientLayer::new();
        match kind {
            "hyper" => {
                let mut client = Client::builder(TokioExecutor::new());
                if flaky {
                    // One connection per attempt, so that the proxy's faults hit attempts.
                    client.pool_max_idle_per_host(0);
                }
                let client = client.build_http();
                Ok(Self::Hyper(
                    ServiceBuilder::new().layer(layer).service(client),
                ))
            }
            "reqwest" => {
                let mut client = reqwest::Client::builder();
                if flaky {
                    client = client.pool_max_idle_per_host(0);
                }
                let client = reqwest_middleware::ClientBuilder::new(client.build()?)
                    .with(IdempotencyMiddleware::from(layer))
                    .build();
                Ok(Self::Reqwest(client))
            }
            other => Err(format!("CLIENT={other:?}: expected hyper or reqwest").into()),
        }
    }

    /// POSTs `body` as JSON, with the caller's `key` if given; the status, the JSON answer and
    /// the client's outcome.
    async fn post(
        &self,
        url: &str,
        body: &Value,
        key: Option<IdempotencyKey>,
    ) -> Result<(u16, Value, ClientOutcome), Error> {
        let body = serde_json::to_vec(body)?;
        let (status, bytes, outcome) = match self {
            Self::Hyper(client) => {
                let mut req = http::Request::post(url)
                    .header("content-type", "application/json")
                    .body(Full::from(body))?;
                if let Some(key) = key {
                    req.extensions_mut().insert(key);
                }
                let res = client.clone().oneshot(req).await?;
                let outcome = res.extensions().get::<ClientOutcome>().cloned();
                let status = res.status().as_u16();
                (status, res.into_body().collect().await?.to_bytes(), outcome)
            }
            Self::Reqwest(client) => {
                let mut req = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(key) = key {
                    req = req.with_extension(key);
                }
                let res = req.send().await?;
                let outcome = res.extensions().get::<ClientOutcome>().cloned();
                (res.status().as_u16(), res.bytes().await?, outcome)
            }
        };
        let outcome = outcome.ok_or("the client layer sets an outcome on every response")?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            outcome,
        ))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sender: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let target = env("TARGET").unwrap_or_else(|| "http://127.0.0.1:3000".to_owned());
    let target = target.trim_end_matches('/').to_owned();
    let deliveries: usize = match env("DELIVERIES") {
        None => 5,
        Some(n) => n
            .parse()
            .map_err(|_| format!("DELIVERIES={n:?} is not a number"))?,
    };
    let flaky = env("FLAKY").is_some_and(|v| v != "0");
    let sender = Sender::new(env("CLIENT").as_deref().unwrap_or("hyper"), flaky)?;

    let inventory = format!("{target}/inventory");
    let before = get_json(&inventory).await.map_err(|err| {
        format!("cannot reach the inventory example at {target} ({err}); start it with `cargo run --example inventory`")
    })?;
    println!("stock before: {before}");

    // Deliveries go to the receiver directly, or through a flaky proxy in front of it.
    let base = if flaky {
        let upstream = target
            .strip_prefix("http://")
            .ok_or("FLAKY=1 needs an http:// TARGET")?;
        let proxy = flaky_proxy(upstream.to_owned()).await?;
        println!("sending through a flaky proxy on {proxy}");
        format!("http://{proxy}")
    } else {
        target.clone()
    };
    let url = format!("{base}/webhooks/order-paid");

    let mut first = None;
    let mut ordered = 0;
    for i in 1..=deliveries {
        let order =
            json!({ "order_id": format!("o-{i}"), "items": [{ "sku": "SKU123", "qty": 1 }] });
        let (status, answer, outcome) = sender.post(&url, &order, None).await?;
        report(&format!("delivery {i}"), &order, status, &answer, &outcome);
        if status == 200 {
            ordered += 1;
        }
        if first.is_none() {
            first = outcome.key().cloned().map(|key| (key, order));
        }
    }

    // The first delivery again, with its key: a sender that could not tell whether it arrived.
    if let Some((key, order)) = first {
        let (status, answer, outcome) = sender.post(&url, &order, Some(key)).await?;
        report("redelivery 1", &order, status, &answer, &outcome);
    }

    let after = get_json(&inventory).await?;
    println!("stock after: {after}");
    let sold = before["SKU123"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(after["SKU123"].as_u64().unwrap_or(0));
    println!("{ordered} order(s) applied, SKU123 went down by {sold}");
    if sold != ordered as u64 {
        return Err(
            "the stock moved by more than the orders applied: some delivery ran twice".into(),
        );
    }
    Ok(())
}

fn report(what: &str, order: &Value, status: u16, answer: &Value, outcome: &ClientOutcome) {
    let key = outcome.key().map_or("-", |k| k.as_str());
    println!(
        "{what:<13} order {:<5} key {key}  attempts {}  replayed {:<5}  {status} {}",
        order["order_id"].as_str().unwrap_or("?"),
        outcome.attempts(),
        outcome.replayed(),
        if status == 200 {
            answer["stock"].clone()
        } else {
            answer.clone()
        },
    );
}

/// `GET url` as JSON, without retries or keys: a plain reqwest call.
async fn get_json(url: &str) -> Result<Value, Error> {
    let body = reqwest::get(url).await?.error_for_status()?.bytes().await?;
    Ok(serde_json::from_slice(&body)?)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A proxy on 127.0.0.1 in front of `upstream` (`host:port`). Of every three connections, the
/// first passes, the second reaches the receiver but loses its response, the third is reset
/// before anything is forwarded.
async fn flaky_proxy(upstream: String) -> Result<std::net::SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::Relaxed);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = match n % 3 {
                    0 => pass(client, &upstream).await,
                    1 => lose_response(client, &upstream).await,
                    _ => client.set_zero_linger(),
                };
            });
        }
    });
    Ok(addr)
}

async fn pass(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// Forwards the request; once the response starts, closes the client's connection instead.
async fn lose_response(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    let (mut up, mut down) = ([0u8; 8192], [0u8; 1]);
    loop {
        tokio::select! {
            n = client.read(&mut up) => match n? {
                0 => return Ok(()),
                n => server.write_all(&up[..n]).await?,
            },
            _ = server.read(&mut down) => return Ok(()),
        }
    }
}
