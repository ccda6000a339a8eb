//! Micro-benchmarks of the pure functions on the request path: key parsing, request
//! fingerprinting, and record encoding and decoding.
//!
//! Run with `cargo bench --bench micro` (add a filter such as `-- fingerprint` to run a group).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use tower_idempotency::{CompletedRecord, Fingerprint, IdempotencyKey};

fn key_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let bare: &[u8] = b"5104d412-11c9-42b7-832d-20d0469b2d2b";
    let quoted: &[u8] = b"\"5104d412-11c9-42b7-832d-20d0469b2d2b\"";
    let escaped: &[u8] = b"\"evt_\\\"5104d412\\\\11c9-42b7-832d-20d0469b2d2b\"";
    group.bench_function("parse/bare", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(bare)))
    });
    group.bench_function("parse/quoted", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(quoted)))
    });
    group.bench_function("parse/quoted_escapes", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(escaped)))
    });
    let long = vec![b'k'; 255];
    group.bench_function("parse/bare_255", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(&long)))
    });
    group.finish();
}

fn fingerprinting(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let uri: Uri = "/v1/payments?expand=customer".parse().expect("uri");
    for size in [0usize, 1024, 64 * 1024] {
        let body = vec![0x5a; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| Fingerprint::of(black_box(&Method::POST), black_box(&uri), black_box(body)))
        });
    }
    group.finish();
}

fn record(body: usize) -> CompletedRecord {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("req_01HZX3V9Q8J6T7K2M4N5P6R7S8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    CompletedRecord::new(
        Fingerprint::from_bytes([7; 32]),
        StatusCode::CREATED,
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    )
    .with_headers(headers)
    .with_body(Bytes::from(vec![b'x'; body]))
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for size in [100usize, 10 * 1024] {
        let rec = record(size);
        let encoded = Bytes::from(rec.encode());
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &rec, |b, rec| {
            b.iter(|| black_box(rec).encode())
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, enc| {
            b.iter(|| CompletedRecord::decode(black_box(enc.clone())).expect("decodes"))
        });
    }
    group.finish();
}

criterion_group!(benches, key_parsing, fingerprinting, records);
criterion_main!(benches);
