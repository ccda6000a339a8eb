//! Test support: a real Redis for the tests.
//!
//! `REDIS_URL`, when set, names a server to use (tests never flush it: every test uses a unique
//! key prefix). Otherwise, and always for tests that must stop and restart the server, a
//! `redis-server` is spawned on a free port and killed when the guard drops.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOW_TO_GET_REDIS: &str = "these tests need Redis: install redis-server \
    (`apt-get install redis-server`, `brew install redis`) so the tests can spawn it, \
    or set REDIS_URL=redis://host:port to a server they may write to";

/// A `redis-server` process owned by a test.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Spawns a server on a free port and waits until it answers.
    pub fn spawn() -> Self {
        let port = free_port();
        let mut server = Self { port, child: None };
        server.start();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (or restarts) the server on its port.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start redis-server ({e}); {HOW_TO_GET_REDIS}"));
        self.child = Some(child);
        wait_until_up(&self.url());
    }

    /// Kills the server (SIGKILL: no chance to finish anything).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A synchronous client connection, for inspecting or preparing the server.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_connection()
            .expect("connect to the spawned redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

fn wait_until_up(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = redis::Client::open(url).expect("valid url");
    loop {
        if let Ok(mut conn) = client.get_connection()
            && redis::cmd("PING").query::<String>(&mut conn).is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis at {url} did not come up; {HOW_TO_GET_REDIS}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Redis the test should use: `REDIS_URL` if set (no guard), else a spawned server.
pub struct TestRedis {
    pub url: String,
    pub server: Option<RedisServer>,
}

impl TestRedis {
    pub fn get() -> Self {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => {
                let client = redis::Client::open(url.as_str())
                    .unwrap_or_else(|e| panic!("REDIS_URL={url} is not a valid url: {e}"));
                let mut conn = client.get_connection().unwrap_or_else(|e| {
                    panic!("cannot connect to REDIS_URL={url}: {e}; {HOW_TO_GET_REDIS}")
                });
                let _: String = redis::cmd("PING").query(&mut conn).expect("PING");
                Self { url, server: None }
            }
            _ => {
                let server = RedisServer::spawn();
                Self {
                    url: server.url(),
                    server: Some(server),
                }
            }
        }
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url.as_str()).expect("valid url")
    }

    /// The keys under `prefix` (SCAN, never KEYS: the server may be shared).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut conn = self.client().get_connection().expect("connect");
        let iter: redis::Iter<'_, String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut conn)
            .expect("scan");
        iter.collect::<Result<_, _>>().expect("scan")
    }

    /// Number of keys under `prefix`.
    pub fn count_keys(&self, prefix: &str) -> usize {
        self.keys(prefix).len()
    }
}

/// A key prefix no other test (or earlier run against the same REDIS_URL) uses.
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "test:{test}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
