//! `SIGTERM` to the inventory example while a handler whose client already left is running:
//! the process stops accepting requests, waits for the detached handler (the layer's
//! `DetachedWork`), and exits once its response is stored, so a retry on another instance
//! replays it instead of meeting `409` and then running it again.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::example::Inventory;
use common::{RedisServer, scan_prefix};

#[test]
fn sigterm_waits_for_a_handler_whose_client_left() {
    let redis = RedisServer::spawn();
    let mut inventory = Inventory::start(&[("REDIS_URL", &redis.url()), ("WORK_MS", "1500")]);

    let body = r#"{"order_id":"o-1","items":[{"sku":"SKU123","qty":2}]}"#;
    let mut client = TcpStream::connect(inventory.addr()).unwrap();
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
    inventory.signal("TERM");
    let status = inventory.wait(Duration::from_secs(20));
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
