//! `SIGTERM` to the inventory example while a handler whose client already left is running:
//! the process stops accepting requests, waits for the detached handler (the layer's
//! `DetachedWork`), and exits once its response is stored, so a retry on another instance
//! replays it instead of meeting `409` and then running it again.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{RedisServer, scan_prefix};

/// The example's binary: `cargo test` builds the examples beside the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the whole suite (`cargo test --all-features`), which builds the \
         examples, or `cargo build --examples --all-features` first",
        path.display()
    );
    path
}

#[test]
fn sigterm_waits_for_a_handler_whose_client_left() {
    let redis = RedisServer::spawn();
    let mut child = Command::new(example("inventory"))
        .env("BIND", "127.0.0.1:0")
        .env("REDIS_URL", redis.url())
        .env("WORK_MS", "1500")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the inventory example");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();

    let body = r#"{"order_id":"o-1","items":[{"sku":"SKU123","qty":2}]}"#;
    let mut client = TcpStream::connect(&addr).unwrap();
    write!(
        client,
        "POST /webhooks/order-paid HTTP/1.1\r\nhost: test\r\nidempotency-key: evt-1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(client);
    std::thread::sleep(Duration::from_millis(100));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the example did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");

    let mut conn = redis.connection();
    let keys = scan_prefix(&mut conn, "idempotency:");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    assert_ne!(
        value.get(1),
        Some(&b'R'),
        "the key is still claimed: the handler was cut off at exit"
    );
}
