//! Test support: a real Redis for the tests.
//!
//! `REDIS_URL`, when set, names a server to use (tests never flush it: every test uses a unique
//! key prefix). Otherwise, and always for tests that must stop and restart the server, a
//! `redis-server` is spawned on a free port and killed when the guard drops. `REDIS_SERVER`
//! names another binary to spawn (a Redis 8.4 build, or `valkey-server`; see
//! `scripts/valkey.sh`), and `REDIS_CLI` another `redis-cli` for the cluster tests.

#![allow(dead_code, unreachable_pub)]

pub mod backend;
pub mod cluster;
pub mod example;
#[cfg(all(feature = "postgres", feature = "axum"))]
pub mod orders;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod stub;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOW_TO_GET_REDIS: &str = "these tests need Redis: install redis-server \
    (`apt-get install redis-server`, `brew install redis`) so the tests can spawn it, \
    set REDIS_SERVER=/path/to/redis-server (or valkey-server) to spawn another binary, \
    or set REDIS_URL=redis://host:port to a server they may write to";

/// The server binary the tests spawn: `REDIS_SERVER` if set, else `redis-server` on `PATH`.
pub fn redis_server_binary() -> std::ffi::OsString {
    binary_from_env("REDIS_SERVER", "redis-server")
}

/// The client binary the cluster tests run: `REDIS_CLI` if set, else `redis-cli` on `PATH`.
pub fn redis_cli_binary() -> std::ffi::OsString {
    binary_from_env("REDIS_CLI", "redis-cli")
}

fn binary_from_env(var: &str, default: &str) -> std::ffi::OsString {
    match std::env::var_os(var) {
        Some(path) if !path.is_empty() => path,
        _ => default.into(),
    }
}

/// A `redis-server` process owned by a test.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// Data directory of a durable server (see [`RedisServer::spawn_durable`]), removed on drop.
    dir: Option<PathBuf>,
    /// More arguments for the server (see [`RedisServer::spawn_with`]).
    args: Vec<String>,
}

impl RedisServer {
    /// Spawns a server on a free port and waits until it answers.
    pub fn spawn() -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            child: None,
            dir: None,
            args: Vec::new(),
        };
        server.start();
        server
    }

    /// Spawns a server with more arguments, such as `["--replicaof", "127.0.0.1", "6379"]`.
    pub fn spawn_with(args: &[&str]) -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            child: None,
            dir: None,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.start();
        server
    }

    /// Spawns a server that keeps every acknowledged write across a kill and restart: an
    /// append-only file, fsynced before each reply (`appendfsync always`), in a directory of its
    /// own. A write Redis answered survives `stop()` (SIGKILL) and is there after `start()`.
    pub fn spawn_durable() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-redis-{}-{port}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the redis data directory");
        let mut server = Self {
            port,
            child: None,
            dir: Some(dir),
            args: Vec::new(),
        };
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
        let binary = redis_server_binary();
        let mut command = Command::new(&binary);
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--protected-mode", "no"]);
        match &self.dir {
            Some(dir) => command
                .arg("--dir")
                .arg(dir)
                .args(["--appendonly", "yes"])
                .args(["--appendfsync", "always"]),
            None => command.args(["--appendonly", "no"]),
        };
        command.args(&self.args);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {binary:?} ({e}); {HOW_TO_GET_REDIS}"));
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
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

static DIRS: AtomicU64 = AtomicU64::new(0);

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
        scan_prefix(
            &mut self.client().get_connection().expect("connect"),
            prefix,
        )
    }

    /// Number of keys under `prefix`.
    pub fn count_keys(&self, prefix: &str) -> usize {
        self.keys(prefix).len()
    }
}

/// The keys under `prefix` on one connection's server (SCAN, never KEYS).
pub fn scan_prefix(conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
    let iter: redis::Iter<'_, String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg(format!("{prefix}*"))
        .arg("COUNT")
        .arg(1000)
        .clone()
        .iter(conn)
        .expect("SCAN");
    iter.collect::<Result<_, _>>().expect("SCAN")
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

/// Awaits `fut`, failing the test if it takes longer than `limit`: a test that would hang fails
/// with a message instead.
pub async fn bounded<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: still not done after {limit:?}"),
    }
}

/// What a [`TcpProxy`] does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards both ways.
    Pass,
    /// Holds every byte in both directions (a partition, or a peer that stopped reading);
    /// new connections are accepted and held too. Held bytes are delivered when the mode
    /// returns to `Pass`, as TCP retransmission would after a partition heals.
    Stall,
    /// Forwards requests to the server but holds its replies: commands execute, their answers
    /// do not arrive.
    StallReplies,
    /// Closes every connection and every new one at once (connection refused or reset).
    Refuse,
}

#[derive(Clone, Copy, Debug)]
struct ProxyState {
    mode: ProxyMode,
    /// Bumped to close every open connection.
    generation: u64,
}

/// A TCP proxy on 127.0.0.1 in front of a server on 127.0.0.1, that can stall or cut the
/// connections going through it. Runs on the test's Tokio runtime; stops when dropped.
pub struct TcpProxy {
    port: u16,
    state: tokio::sync::watch::Sender<ProxyState>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `127.0.0.1:upstream_port`, passing traffic through.
    pub async fn start(upstream_port: u16) -> Self {
        Self::start_to("127.0.0.1", upstream_port).await
    }

    /// Starts a proxy to `host:port`, passing traffic through.
    pub async fn start_to(host: &str, port: u16) -> Self {
        let upstream = std::sync::Arc::<str>::from(format!("{host}:{port}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, _) = tokio::sync::watch::channel(ProxyState {
            mode: ProxyMode::Pass,
            generation: 0,
        });
        let watch = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let now = *watch.borrow();
                if now.mode == ProxyMode::Refuse {
                    drop(client);
                    continue;
                }
                let rx = watch.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&*upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(client_read, server_write, rx.clone(), Direction::Request);
                    let down = pump(server_read, client_write, rx.clone(), Direction::Reply);
                    let cut = cut(rx, now.generation);
                    // Whichever ends first (EOF, error, cut) closes both sockets.
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                        () = cut => {}
                    }
                });
            }
        });
        Self {
            port,
            state,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the proxied Redis.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn set(&self, mode: ProxyMode) {
        self.state.send_modify(|s| {
            s.mode = mode;
            if mode == ProxyMode::Refuse {
                s.generation += 1;
            }
        });
    }

    /// Closes every open connection (new ones are accepted as the mode says).
    pub fn cut_all(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Open connections see the sender gone and close.
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Reply,
}

fn flows(mode: ProxyMode, direction: Direction) -> bool {
    match mode {
        ProxyMode::Pass => true,
        ProxyMode::Stall | ProxyMode::Refuse => false,
        ProxyMode::StallReplies => direction == Direction::Request,
    }
}

/// Resolves once the connection of `generation` must close (or the proxy is gone).
async fn cut(mut rx: tokio::sync::watch::Receiver<ProxyState>, generation: u64) {
    let _ = rx
        .wait_for(|s| s.generation != generation || s.mode == ProxyMode::Refuse)
        .await;
}

/// Copies bytes from `from` to `to`, holding them while the mode says this direction stalls.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<ProxyState>,
    direction: Direction,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if rx.wait_for(|s| flows(s.mode, direction)).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
