//! Hostile input: malformed, oversized and repeated keys, bodies over the limit or dripped
//! slowly, raw bytes on the wire that `http`'s builders refuse to produce, and callers that try
//! to reach each other's responses. Each case is run against both stores where the store could
//! be touched, and every case checks that nothing ran and nothing was stored.
//!
//! The network cases talk to a real server (`axum::serve` on 127.0.0.1) over raw TCP, so the
//! bytes are exactly what an attacker could send; they also show that nothing panics on network
//! input and that the server keeps serving afterwards.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, IdempotencyStore, RedisStore};

use common::backend::{Backend, send};
use common::{TestRedis, bounded, unique_prefix};

/// The request body limit of every layer here.
const LIMIT: usize = 1024;

both_stores!(
    hostile_keys_are_400_and_leave_the_store_untouched,
    odd_but_valid_keys_never_collide,
    hostile_header_bytes_on_the_wire_are_400,
    bodies_over_the_limit_on_the_wire_are_413,
    broken_bodies_on_the_wire_are_refused_before_the_store,
    slow_drip_body_holds_no_key_and_completes,
    slow_drip_over_the_limit_is_cut_at_the_limit,
    stalled_body_waits_without_holding_the_key,
    scope_values_cannot_be_forged_into_another_callers_scope,
);

/// `POST /echo`: counts its executions, answers `run N for TENANT: BODY` (the tenant from the
/// `x-tenant` header).
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>, counter: &Counter) -> Router {
    let runs = counter.0.clone();
    let echo = move |_key: IdempotencyKey, headers: HeaderMap, body: Bytes| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let tenant = headers
                .get("x-tenant")
                .map_or("nobody", |t| t.to_str().unwrap());
            format!("run {n} for {tenant}: {}", String::from_utf8_lossy(&body))
        }
    };
    Router::new().route("/echo", post(echo)).route_layer(layer)
}

fn tenant_scope<St>(layer: IdempotencyLayer<St>) -> IdempotencyLayer<St> {
    layer.scope_with(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

/// Asserts a problem+json answer with `status` whose type names `kind`.
fn assert_problem(status: u16, headers: &[(String, String)], body: &[u8], want: u16, kind: &str) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, want, "{text}");
    let content_type = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str());
    assert_eq!(content_type, Some("application/problem+json"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(json["status"], want, "{json}");
    assert!(
        json["type"].as_str().unwrap().ends_with(kind),
        "expected {kind}: {json}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keys, through the service.
// ---------------------------------------------------------------------------------------------

/// Keys `http` lets through that the layer must refuse, beyond those in tests/layer.rs: very
/// long, quoted and too long once unquoted, opaque bytes, stray or unbalanced quotes, invalid
/// escapes, sf-string parameters and lists, surrounding whitespace, and header sets that
/// repeat or disagree. All `400` problem+json, nothing run, nothing stored.
async fn hostile_keys_are_400_and_leave_the_store_untouched<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(b.store), &counter);
    let huge = "k".repeat(10_000);
    let quoted_256 = format!("\"{}\"", "q".repeat(256));
    let escaped_256 = format!("\"{}\"", "\\\\".repeat(256));
    let ik = "idempotency-key";
    let xik = "x-idempotency-key";
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![(ik, huge.as_bytes())],
        vec![(ik, quoted_256.as_bytes())],
        vec![(ik, escaped_256.as_bytes())],
        vec![(ik, b"\x80")],
        vec![(ik, b"key\xff")],
        vec![(ik, b"\xe2\x98\x83")],
        vec![(ik, b"\"")],
        vec![(ik, b"\"\"")],
        vec![(ik, b"\"\\\"")],
        vec![(ik, b"\"a\\x\"")],
        vec![(ik, b"k\"")],
        vec![(ik, b"\"k\"x")],
        vec![(ik, b"\"k\" ")],
        vec![(ik, b" k")],
        vec![(ik, b"k ")],
        vec![(ik, b"\tk")],
        vec![(ik, b"\"k\";a")],
        vec![(ik, b"\"k\"; a=?1")],
        vec![(ik, b"\"k\", \"l\"")],
        vec![(ik, b"\"k\" \"l\"")],
        vec![(xik, b"k"), (xik, b"k")],
        vec![(ik, b"k"), (ik, b"l")],
        vec![(ik, b"k"), (ik, b"k"), (ik, b"k")],
        vec![(ik, b"k"), (xik, b"K")],
        vec![(ik, b"k"), (xik, b"bad key")],
        vec![(ik, b"bad key"), (xik, b"k")],
        vec![(ik, b"\"k\""), (xik, b"\"k \"")],
    ];
    for headers in cases {
        let mut req = Request::post("/echo");
        for (name, value) in &headers {
            req = req.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        let reply = send(&app, req.body(Body::from("x")).unwrap()).await;
        let pairs: Vec<(String, String)> = reply
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let shown: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n, String::from_utf8_lossy(&v[..v.len().min(40)])))
            .collect();
        assert!(!reply.replayed(), "{shown:?}");
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{shown:?}: {}",
            reply.text()
        );
        assert_problem(400, &pairs, &reply.body, 400, "InvalidKey");
    }
    assert_eq!(counter.runs(), 0);
    assert_eq!((b.entries)(), 0, "store touched by invalid keys");
}

/// Keys at the edges of what is valid, and pairs that an unquoting or a careless join could
/// confuse, are each a key of their own: one run and one entry per distinct key, each replayed
/// to its own sender.
async fn odd_but_valid_keys_never_collide<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let app = app(IdempotencyLayer::new(b.store), &counter);
    let max = "~".repeat(255);
    let max_escaped = format!("\"{}\"", "\\\\".repeat(255));
    // (header value, the key it stands for)
    let keys: Vec<(Vec<u8>, String)> = vec![
        (b"'k'".to_vec(), "'k'".into()),
        (b"k".to_vec(), "k".into()),
        (b"K".to_vec(), "K".into()),
        (b"k,l".to_vec(), "k,l".into()),
        (b"\"k,l\"".to_vec(), "k,l".into()),
        (b"\"k\\\\\"".to_vec(), "k\\".into()),
        (b"k\\".to_vec(), "k\\".into()),
        (b"\"a\\\"b\"".to_vec(), "a\"b".into()),
        (b"%00".to_vec(), "%00".into()),
        (b"../../etc/passwd".to_vec(), "../../etc/passwd".into()),
        (b"*".to_vec(), "*".into()),
        (max.clone().into_bytes(), max.clone()),
        (max_escaped.into_bytes(), "\\".repeat(255)),
        (b"\"k l\"".to_vec(), String::new()), // refused: space
    ];
    let mut distinct = std::collections::BTreeMap::new();
    for (value, key) in &keys {
        let req = Request::post("/echo")
            .header("idempotency-key", HeaderValue::from_bytes(value).unwrap())
            .body(Body::from(format!("body for {key}")))
            .unwrap();
        let reply = send(&app, req).await;
        if key.is_empty() {
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
            continue;
        }
        assert_eq!(reply.status, StatusCode::OK, "{key}: {}", reply.text());
        match distinct.get(key) {
            None => {
                assert!(!reply.replayed(), "{key} collided with another key");
                distinct.insert(key.clone(), reply.body.clone());
            }
            Some(first) => {
                assert!(reply.replayed(), "{key} sent another way is the same key");
                assert_eq!(reply.body, *first);
            }
        }
    }
    assert_eq!(counter.runs(), distinct.len());
    assert_eq!((b.entries)(), distinct.len());
}

// ---------------------------------------------------------------------------------------------
// Raw bytes on the wire.
// ---------------------------------------------------------------------------------------------

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A response read off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_problem(&self) -> bool {
        self.header("content-type") == Some("application/problem+json")
    }

    fn assert_problem(&self, want: u16, kind: &str) {
        assert_problem(self.status, &self.headers, &self.body, want, kind);
    }
}

/// Parses one complete response from `buf`, if it holds one. Bodies are framed by
/// `Content-Length` or chunked, as hyper sends them.
fn parse_response(buf: &[u8]) -> Option<Wire> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &buf[end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = find("content-length") {
        let len: usize = len.parse().ok()?;
        rest.get(..len)?.to_vec()
    } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = rest;
        loop {
            let line_end = at.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&at[..line_end]).ok()?, 16).ok()?;
            at = &at[line_end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(at.get(..size)?);
            at = at.get(size + 2..)?;
        }
        body
    } else {
        Vec::new()
    };
    Some(Wire {
        status,
        headers,
        body,
    })
}

/// Reads until one complete response has arrived (without waiting for the connection to
/// close, so a reset after the response cannot lose it).
async fn read_response(read: &mut (impl AsyncReadExt + Unpin), what: &str) -> Wire {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    bounded(Duration::from_secs(10), what, async {
        loop {
            if let Some(wire) = parse_response(&buf) {
                return wire;
            }
            match read.read(&mut chunk).await {
                Ok(0) => panic!(
                    "{what}: connection closed before a full response: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(err) => panic!(
                    "{what}: {err} before a full response: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            }
        }
    })
    .await
}

/// Sends `request` as it is and reads the response.
async fn exchange(addr: SocketAddr, request: &[u8], what: &str) -> Wire {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything (413): ignore write errors.
    let _ = stream.write_all(request).await;
    read_response(&mut stream, what).await
}

/// A `POST /echo` with the given header lines (each ending in CRLF) and body.
fn raw_post(header_lines: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n".to_vec();
    out.extend_from_slice(header_lines);
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// Header bytes `http`'s builders refuse, and others, sent raw. Line folding, control
/// characters, DEL, a bare CR and a space before the colon are refused by hyper's parser
/// (`400`, before the layer sees the request), as is a head with more headers than hyper takes
/// (`431`); everything else reaches the layer, which refuses it (`400` problem+json,
/// `InvalidKey`). Nothing runs, nothing is stored, the server keeps serving.
async fn hostile_header_bytes_on_the_wire_are_400<St: IdempotencyStore>(b: Backend<St>) {
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum By {
        /// Reaches the layer, which refuses it: `400` problem+json.
        Layer,
        /// Refused by hyper's parser with this status, before the layer.
        Parser(u16),
    }
    let counter = Counter::default();
    let addr = serve(app(IdempotencyLayer::new(b.store), &counter)).await;
    let long = format!("Idempotency-Key: {}\r\n", "k".repeat(256));
    let huge = format!("Idempotency-Key: {}\r\n", "k".repeat(64 * 1024));
    let many = "Idempotency-Key: k\r\n".repeat(150);
    let parser = By::Parser(400);
    let cases: Vec<(&str, Vec<u8>, By)> = vec![
        (
            "obs-fold",
            b"Idempotency-Key: abc\r\n def\r\n".to_vec(),
            parser,
        ),
        (
            "obs-fold, tab",
            b"Idempotency-Key: abc\r\n\tdef\r\n".to_vec(),
            parser,
        ),
        (
            "obs-fold, empty first line",
            b"Idempotency-Key:\r\n abc\r\n".to_vec(),
            parser,
        ),
        ("NUL", b"Idempotency-Key: a\x00b\r\n".to_vec(), parser),
        (
            "control char",
            b"Idempotency-Key: a\x01b\r\n".to_vec(),
            parser,
        ),
        (
            "escape char",
            b"Idempotency-Key: \x1b[31mred\r\n".to_vec(),
            parser,
        ),
        ("DEL", b"Idempotency-Key: a\x7fb\r\n".to_vec(), parser),
        ("bare CR", b"Idempotency-Key: a\rb\r\n".to_vec(), parser),
        (
            "space before colon",
            b"Idempotency-Key : k\r\n".to_vec(),
            parser,
        ),
        (
            "latin-1",
            b"Idempotency-Key: caf\xe9\r\n".to_vec(),
            By::Layer,
        ),
        (
            "utf-8",
            "Idempotency-Key: caf\u{e9}\r\n".as_bytes().to_vec(),
            By::Layer,
        ),
        (
            "invalid utf-8",
            b"Idempotency-Key: \xc3\x28\xff\r\n".to_vec(),
            By::Layer,
        ),
        ("empty", b"Idempotency-Key:\r\n".to_vec(), By::Layer),
        ("blank", b"Idempotency-Key:    \t \r\n".to_vec(), By::Layer),
        (
            "inner space",
            b"Idempotency-Key: a b\r\n".to_vec(),
            By::Layer,
        ),
        ("256 chars", long.into_bytes(), By::Layer),
        ("64 KiB", huge.into_bytes(), By::Layer),
        (
            "repeated",
            b"Idempotency-Key: k\r\nIdempotency-Key: k\r\n".to_vec(),
            By::Layer,
        ),
        (
            "repeated, case",
            b"Idempotency-Key: k\r\nIDEMPOTENCY-KEY: k\r\n".to_vec(),
            By::Layer,
        ),
        ("150 times", many.into_bytes(), By::Parser(431)),
        (
            "names differ",
            b"Idempotency-Key: k1\r\nX-Idempotency-Key: k2\r\n".to_vec(),
            By::Layer,
        ),
        (
            "sf parameters",
            b"Idempotency-Key: \"k\";a=1\r\n".to_vec(),
            By::Layer,
        ),
        (
            "sf list",
            b"Idempotency-Key: \"k\", \"l\"\r\n".to_vec(),
            By::Layer,
        ),
        (
            "unterminated",
            b"Idempotency-Key: \"k\r\n".to_vec(),
            By::Layer,
        ),
        (
            "stray quote",
            b"Idempotency-Key: k\"\r\n".to_vec(),
            By::Layer,
        ),
        (
            "invalid escape",
            b"Idempotency-Key: \"\\x\"\r\n".to_vec(),
            By::Layer,
        ),
    ];
    for (what, lines, by) in cases {
        let wire = exchange(addr, &raw_post(&lines, b"x"), what).await;
        match by {
            By::Layer => wire.assert_problem(400, "InvalidKey"),
            By::Parser(status) => {
                assert_eq!(wire.status, status, "{what}: {wire:?}");
                assert!(
                    !wire.is_problem(),
                    "{what}: expected hyper to refuse it: {wire:?}"
                );
            }
        }
        assert!(wire.header("idempotent-replayed").is_none(), "{what}");
    }
    // A garbage request line never reaches the layer.
    let wire = exchange(addr, b"\x00\x01\x02 /echo HTTP/1.1\r\n\r\n", "garbage").await;
    assert_eq!(wire.status, 400, "{wire:?}");

    assert_eq!(counter.runs(), 0, "a handler ran");
    assert_eq!((b.entries)(), 0, "store touched");
    // The server is still up and the layer still works.
    let ok = exchange(addr, &raw_post(b"Idempotency-Key: fine\r\n", b"x"), "valid").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(counter.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

/// Bodies over the limit, sent raw: declared too large (refused from the head alone: the body
/// is never sent), chunked past the limit, one huge declared chunk. All `413` problem+json,
/// nothing run, nothing stored. A chunked body within the limit goes through.
async fn bodies_over_the_limit_on_the_wire_are_413<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(b.store).max_request_body(LIMIT);
    let addr = serve(app(layer, &counter)).await;

    // Content-Length far over the limit and no body at all: answered from the head.
    let head = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
                 Idempotency-Key: big\r\nContent-Length: 1000000000\r\n\r\n";
    let started = Instant::now();
    let wire = exchange(addr, head, "declared too large").await;
    wire.assert_problem(413, "PayloadTooLarge");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let chunked = |key: &str, chunks: &[&[u8]]| {
        let mut out = format!(
            "POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
             Idempotency-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in chunks {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    };
    let part = vec![b'a'; 600];
    let wire = exchange(addr, &chunked("chunks", &[&part, &part]), "chunked over").await;
    wire.assert_problem(413, "PayloadTooLarge");

    // One chunk that declares 4 GiB - 1 and sends past the limit.
    let mut huge = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
                     Idempotency-Key: huge-chunk\r\nTransfer-Encoding: chunked\r\n\r\n\
                     ffffffff\r\n"
        .to_vec();
    huge.extend_from_slice(&[b'a'; 2 * LIMIT]);
    let wire = exchange(addr, &huge, "one huge chunk").await;
    wire.assert_problem(413, "PayloadTooLarge");

    assert_eq!(counter.runs(), 0);
    assert_eq!((b.entries)(), 0, "store touched by bodies over the limit");

    let within = vec![b'b'; LIMIT / 2];
    let wire = exchange(
        addr,
        &chunked("fits", &[&within, &within]),
        "chunked within",
    )
    .await;
    assert_eq!(wire.status, 200, "{wire:?}");
    assert_eq!(counter.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

/// Bodies that break on the wire: a body shorter than its Content-Length whose sender stops
/// sending, and invalid chunk framing. The layer answers `400` (`BodyUnreadable`) where the
/// connection still lets it answer; either way nothing runs and nothing is stored.
async fn broken_bodies_on_the_wire_are_refused_before_the_store<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(b.store).max_request_body(LIMIT);
    let addr = serve(app(layer, &counter)).await;

    // Declares 100 bytes, sends 10, then closes its sending side.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
              Idempotency-Key: short\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let wire = read_response(&mut stream, "short body").await;
    wire.assert_problem(400, "BodyUnreadable");

    let bad_chunk = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
                      Idempotency-Key: bad-chunk\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n";
    let wire = exchange(addr, bad_chunk, "invalid chunk size").await;
    wire.assert_problem(400, "BodyUnreadable");

    assert_eq!(counter.runs(), 0);
    assert_eq!((b.entries)(), 0, "store touched by broken bodies");
}

/// Writes `head`, then the chunks of a chunked body one every `every`, then the last chunk,
/// on its own task; returns the reading half, and the task, which hands back the writing half
/// (dropping it would half-close the connection, which hyper takes for a client gone).
async fn drip(
    addr: SocketAddr,
    key: &str,
    chunks: usize,
    chunk: &'static [u8],
    every: Duration,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Idempotency-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..chunks {
            tokio::time::sleep(every).await;
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(chunk);
            framed.extend_from_slice(b"\r\n");
            if write.write_all(&framed).await.is_err() {
                return write; // The server answered and closed.
            }
        }
        let _ = write.write_all(b"0\r\n\r\n").await;
        write
    });
    (read, writer)
}

/// A client that drips its body slowly. The layer has no read timeout of its own: it waits for
/// the whole body (bounded in size by the limit), and only then fingerprints and claims. So a
/// slow client holds no key while it drips: another client with the same key and body is
/// served meanwhile, and when the drip completes, the slow client gets the replay of that
/// response. Bounding the time a body may take is the server's job (a body read timeout).
async fn slow_drip_body_holds_no_key_and_completes<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(b.store).max_request_body(LIMIT);
    let app = app(layer, &counter);
    let addr = serve(app.clone()).await;

    const CHUNK: &[u8] = b"0123456789";
    let chunks = 20;
    let every = Duration::from_millis(40);
    let started = Instant::now();
    let (mut read, writer) = drip(addr, "drip", chunks, CHUNK, every).await;

    tokio::time::sleep(every * 5).await;
    assert_eq!((b.entries)(), 0, "a dripping body holds no claim");
    let fast = send(
        &app,
        Request::post("/echo")
            .header("idempotency-key", "drip")
            .body(Body::from(CHUNK.repeat(chunks)))
            .unwrap(),
    )
    .await;
    assert_eq!(fast.status, StatusCode::OK);
    assert!(!fast.replayed(), "the fast client ran the handler");

    let wire = read_response(&mut read, "the dripped request").await;
    assert!(
        started.elapsed() >= every * chunks as u32,
        "answered before the body was complete"
    );
    drop(writer.await.unwrap());
    assert_eq!(wire.status, 200, "{wire:?}");
    assert_eq!(wire.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        wire.body, fast.body,
        "the slow client gets the stored response"
    );
    assert_eq!(counter.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

/// A client that drips a body over the limit is answered `413` as soon as the limit is passed,
/// not when it would have finished; nothing runs, nothing is stored.
async fn slow_drip_over_the_limit_is_cut_at_the_limit<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(b.store).max_request_body(LIMIT);
    let addr = serve(app(layer, &counter)).await;

    const CHUNK: &[u8] = &[b'z'; 100];
    let every = Duration::from_millis(40);
    let chunks = 60; // 6000 bytes over 2.4 s; the limit is passed at the 11th chunk.
    let started = Instant::now();
    let (mut read, writer) = drip(addr, "drip-over", chunks, CHUNK, every).await;
    let wire = read_response(&mut read, "the dripped request").await;
    let took = started.elapsed();
    wire.assert_problem(413, "PayloadTooLarge");
    assert!(
        took < every * chunks as u32 / 2,
        "413 only after {took:?}: the layer read past its limit"
    );
    drop(read);
    bounded(Duration::from_secs(10), "the dripping writer", writer)
        .await
        .unwrap();
    assert_eq!(counter.runs(), 0);
    assert_eq!((b.entries)(), 0);
}

/// A body that stops halfway and stays open. The layer has no read timeout of its own, so this
/// request waits as long as the connection lives (the server's timeouts, not the layer's, bound
/// it); meanwhile it holds no key: the same key from another client is served. When the
/// client gives up, nothing has run for it and nothing is stored for it.
async fn stalled_body_waits_without_holding_the_key<St: IdempotencyStore>(b: Backend<St>) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(b.store).max_request_body(LIMIT);
    let app = app(layer, &counter);
    let addr = serve(app.clone()).await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
              Idempotency-Key: stall\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(800), stream.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the stalled request was answered: {waited:?}"
    );
    assert_eq!((b.entries)(), 0, "the stalled request holds a claim");

    let other = send(
        &app,
        Request::post("/echo")
            .header("idempotency-key", "stall")
            .body(Body::from("complete body"))
            .unwrap(),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.text(), "run 1 for nobody: complete body");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counter.runs(), 1);
    assert_eq!((b.entries)(), 1);
}

// ---------------------------------------------------------------------------------------------
// Scope isolation.
// ---------------------------------------------------------------------------------------------

/// Caller scopes that a naive concatenation of scope and key would confuse: no caller vs an
/// empty caller, (`ab`, `c`) vs (`a`, `bc`) and (`a:b`, `c`) vs (`a`, `b:c`) for (caller, key).
/// Each is a scope of its own.
async fn scope_values_cannot_be_forged_into_another_callers_scope<St: IdempotencyStore>(
    b: Backend<St>,
) {
    let counter = Counter::default();
    let app = app(tenant_scope(IdempotencyLayer::new(b.store)), &counter);
    let req = |tenant: Option<&str>, key: &str| {
        let mut req = Request::post("/echo").header("idempotency-key", key);
        if let Some(tenant) = tenant {
            req = req.header("x-tenant", tenant);
        }
        req.body(Body::from("same body")).unwrap()
    };
    let cases = [
        (None, "k"),
        (Some(""), "k"),
        (Some("ab"), "c"),
        (Some("a"), "bc"),
        (Some("a:b"), "c"),
        (Some("a"), "b:c"),
    ];
    let mut first = Vec::new();
    for (tenant, key) in cases {
        let reply = send(&app, req(tenant, key)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{tenant:?} {key}: {}",
            reply.text()
        );
        assert!(
            !reply.replayed(),
            "{tenant:?}/{key} reached another caller's record"
        );
        first.push((tenant, key, reply.body));
    }
    for (tenant, key, body) in &first {
        let reply = send(&app, req(*tenant, key)).await;
        assert!(reply.replayed());
        assert_eq!(reply.body, *body, "{tenant:?}/{key}");
    }
    assert_eq!(counter.runs(), cases.len());
    assert_eq!((b.entries)(), cases.len());
}

/// Four callers use the same 50 keys at once, each request sent 3 times through each of 3
/// instances sharing one Redis. Every answer a caller gets (the run, a replay) names that
/// caller and is identical across its duplicates; each (caller, key) ran exactly once; later
/// retries replay the caller's own answer through every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_never_see_each_others_responses_under_concurrency() {
    const TENANTS: [&str; 4] = ["alice", "bob", "carol", "mallory"];
    const KEYS: usize = 50;
    let redis = TestRedis::get();
    let prefix = unique_prefix("scope-storm");
    let counter = Counter::default();
    let mut apps = Vec::new();
    for _ in 0..3 {
        let store = RedisStore::new(redis.client())
            .await
            .unwrap()
            .key_prefix(prefix.clone());
        apps.push(app(tenant_scope(IdempotencyLayer::new(store)), &counter));
    }
    let mut tasks = Vec::new();
    for _ in 0..3 {
        for key in 0..KEYS {
            for tenant in TENANTS {
                for app in &apps {
                    let app = app.clone();
                    tasks.push(tokio::spawn(async move {
                        // Every caller sends the same body: only the scope tells them apart.
                        let req = Request::post("/echo")
                            .header("idempotency-key", format!("order-{key}"))
                            .header("x-tenant", tenant)
                            .body(Body::from("same body"))
                            .unwrap();
                        (tenant, key, send(&app, req).await)
                    }));
                }
            }
        }
    }
    let mut seen: std::collections::HashMap<(&str, usize), Bytes> = Default::default();
    for task in tasks {
        let (tenant, key, reply) = task.await.unwrap();
        match reply.status {
            StatusCode::OK => {
                let text = reply.text();
                assert!(
                    text.ends_with(&format!(" for {tenant}: same body")),
                    "{tenant} got {text}"
                );
                let first = seen
                    .entry((tenant, key))
                    .or_insert_with(|| reply.body.clone());
                assert_eq!(*first, reply.body, "{tenant}/{key} answered differently");
            }
            StatusCode::CONFLICT => {}
            other => panic!("{tenant}/{key}: {other} {}", reply.text()),
        }
    }
    assert_eq!(seen.len(), TENANTS.len() * KEYS, "a caller never got a 200");
    assert_eq!(counter.runs(), TENANTS.len() * KEYS);
    assert_eq!(redis.count_keys(&prefix), TENANTS.len() * KEYS);
    // Afterwards, each caller's retry through any instance replays that caller's own answer.
    for ((tenant, key), body) in &seen {
        for app in &apps {
            let req = Request::post("/echo")
                .header("idempotency-key", format!("order-{key}"))
                .header("x-tenant", *tenant)
                .body(Body::from("same body"))
                .unwrap();
            let reply = send(app, req).await;
            assert!(reply.replayed(), "{tenant}/{key}: {}", reply.text());
            assert_eq!(reply.body, *body, "{tenant}/{key}");
        }
    }
    assert_eq!(counter.runs(), TENANTS.len() * KEYS);
}
