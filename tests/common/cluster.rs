//! A local Redis Cluster for the tests: 3 masters and 3 replicas, each a `redis-server` process on
//! free ports of 127.0.0.1, created with `redis-cli --cluster create` and killed when the guard
//! drops.
//!
//! Nodes keep nothing on disk (`--save ''`, no append-only file); each has a directory of its own
//! (cluster config, log) under one temporary directory, removed on drop. The cluster bus of a node
//! listens on its port + 10000, as Redis requires on servers older than 7.0, so both ports are
//! picked free.

#![cfg(feature = "cluster")]

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;

const HOW_TO_GET_REDIS_CLUSTER: &str = "the cluster tests need redis-server and redis-cli: \
    `apt-get install redis-server redis-tools` (Debian, Ubuntu) or `brew install redis` (macOS)";

/// How long starting a cluster may take, all attempts together.
const START_LIMIT: Duration = Duration::from_secs(30);

/// Masters, and replicas per master.
const MASTERS: usize = 3;
const REPLICAS_PER_MASTER: usize = 1;
const NODES: usize = MASTERS * (1 + REPLICAS_PER_MASTER);

/// The cluster bus of a node listens on its port plus this offset.
const BUS_OFFSET: u16 = 10000;

/// Redis Cluster's number of hash slots.
pub const SLOTS: usize = 16384;

/// The cluster's node timeout: a master unreachable for this long is suspected, then failed over.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

struct Node {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster of `redis-server` processes owned by a test.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Ports of the masters that owned slots when [`RedisCluster::kill`] was last called.
    masters_before_kill: Vec<u16>,
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges, inclusive (migrating/importing markers skipped).
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    pub fn is_replica(&self) -> bool {
        self.flags.iter().any(|f| f == "slave")
    }

    pub fn is_failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }
}

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

impl RedisCluster {
    /// Starts the cluster and waits until every node reports `cluster_state:ok`, all slots are
    /// assigned, and every replica is in sync with its master. Panics with the reason (and the
    /// nodes' log tails) if that takes longer than 30 seconds.
    pub fn start() -> Self {
        require_binaries();
        let deadline = Instant::now() + START_LIMIT;
        let mut failures = Vec::new();
        // A port picked free can be taken by someone else before redis-server binds it; such an
        // attempt fails fast and the next one picks other ports.
        for attempt in 1..=3 {
            match Self::try_start(deadline) {
                Ok(cluster) => return cluster,
                Err(err) => {
                    failures.push(format!("attempt {attempt}: {err}"));
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        panic!(
            "could not start a Redis Cluster within {START_LIMIT:?}:\n{}",
            failures.join("\n")
        );
    }

    fn try_start(deadline: Instant) -> Result<Self, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-cluster-{}-{}-{nanos}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
            masters_before_kill: Vec::new(),
        };
        // From here on, dropping `cluster` (on any error) kills what was started.
        for port in free_port_pairs(NODES)? {
            let child = cluster.spawn_node(port)?;
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_node_up(i, deadline)?;
        }
        cluster.create(deadline)?;
        cluster.wait_ready(deadline)?;
        Ok(cluster)
    }

    fn node_dir(&self, port: u16) -> PathBuf {
        self.dir.join(port.to_string())
    }

    fn spawn_node(&self, port: u16) -> Result<Child, String> {
        let node_dir = self.node_dir(port);
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| format!("create {}: {e}", node_dir.display()))?;
        let conf = self.dir.join(format!("nodes-{port}.conf"));
        Command::new(super::redis_server_binary())
            .args(["--port", &port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args([
                "--cluster-node-timeout",
                &NODE_TIMEOUT.as_millis().to_string(),
            ])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "no"])
            // A replica's first sync starts at once instead of after the default 5 s wait for
            // more replicas.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&node_dir)
            .arg("--logfile")
            .arg(node_dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("could not start redis-server: {e}; {HOW_TO_GET_REDIS_CLUSTER}"))
    }

    /// Waits until node `i` answers, and is the process this guard started (not another server
    /// that took the port first).
    fn wait_node_up(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let port = self.nodes[i].port;
        let pid = self.nodes[i].child.as_ref().map(Child::id);
        loop {
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "redis-server on port {port} exited ({status}); log:\n{}",
                    self.log_tail(port)
                ));
            }
            if let Ok(mut conn) = connect(port)
                && let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut conn)
            {
                let their_pid = info_field(&info, "process_id").and_then(|p| p.parse().ok());
                if their_pid == pid {
                    return Ok(());
                }
                return Err(format!(
                    "port {port} is served by another process ({their_pid:?})"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {port} did not answer; log:\n{}",
                    self.log_tail(port)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli --cluster create`, bounded by `deadline`.
    fn create(&self, deadline: Instant) -> Result<(), String> {
        let out_path = self.dir.join("create.out");
        let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(super::redis_cli_binary())
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &REPLICAS_PER_MASTER.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not run redis-cli: {e}; {HOW_TO_GET_REDIS_CLUSTER}"))?;
        let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "redis-cli --cluster create failed ({status}):\n{}",
                        output()
                    ));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "redis-cli --cluster create did not finish in time:\n{}",
                        output()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("redis-cli: {e}")),
            }
        }
    }

    /// Waits until every node sees a healthy cluster: state ok, all slots assigned to the
    /// masters, all nodes known, and every replica attached and in sync.
    fn wait_ready(&self, deadline: Instant) -> Result<(), String> {
        loop {
            let problem = match self.readiness_problem() {
                None => return Ok(()),
                Some(problem) => problem,
            };
            if Instant::now() >= deadline {
                let mut logs = String::new();
                for node in &self.nodes {
                    let _ = write!(
                        logs,
                        "\n--- node {} ---\n{}",
                        node.port,
                        self.log_tail(node.port)
                    );
                }
                return Err(format!("the cluster did not become ready: {problem}{logs}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn readiness_problem(&self) -> Option<String> {
        for node in &self.nodes {
            let port = node.port;
            let info = match cluster_info(port) {
                Ok(info) => info,
                Err(e) => return Some(format!("CLUSTER INFO on {port}: {e}")),
            };
            let slots_ok = SLOTS.to_string();
            let nodes = NODES.to_string();
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", slots_ok.as_str()),
                ("cluster_slots_ok", slots_ok.as_str()),
                ("cluster_known_nodes", nodes.as_str()),
            ] {
                let got = info_field(&info, field);
                if got != Some(want) {
                    return Some(format!("node {port}: {field} is {got:?}, want {want}"));
                }
            }
            let lines = match cluster_nodes(port) {
                Ok(lines) => lines,
                Err(e) => return Some(format!("CLUSTER NODES on {port}: {e}")),
            };
            let masters = lines.iter().filter(|l| l.is_master()).count();
            let replicas = lines
                .iter()
                .filter(|l| l.is_replica() && l.master_id.is_some())
                .count();
            if masters != MASTERS || replicas != NODES - MASTERS {
                return Some(format!(
                    "node {port} sees {masters} masters and {replicas} replicas"
                ));
            }
            let replication = match info_section(port, "replication") {
                Ok(info) => info,
                Err(e) => return Some(format!("INFO replication on {port}: {e}")),
            };
            match info_field(&replication, "role") {
                Some("master") => {
                    let synced = replication
                        .lines()
                        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                        .count();
                    if synced < REPLICAS_PER_MASTER {
                        return Some(format!("master {port} has {synced} replicas in sync"));
                    }
                }
                Some("slave") => {
                    if info_field(&replication, "master_link_status") != Some("up") {
                        return Some(format!("replica {port}: link to its master is not up"));
                    }
                }
                other => return Some(format!("node {port}: role {other:?}")),
            }
        }
        None
    }

    /// Ports of every node, killed or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Urls of every node (the seeds of a cluster client).
    pub fn nodes(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// A cluster client with short timeouts and retry waits, so a request to a dead node fails
    /// within about a second instead of waiting for the client's defaults (seconds of backoff).
    pub fn client(&self) -> ClusterClient {
        ClusterClient::builder(self.nodes())
            .connection_timeout(Duration::from_millis(250))
            .response_timeout(Duration::from_millis(1000))
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .expect("a valid cluster client")
    }

    /// A direct connection to one node, with short timeouts.
    pub fn connection(&self, port: u16) -> redis::Connection {
        connect(port).unwrap_or_else(|e| panic!("connect to node {port}: {e}"))
    }

    /// `CLUSTER NODES` as node `port` sees it.
    pub fn cluster_nodes(&self, port: u16) -> Vec<NodeLine> {
        cluster_nodes(port).unwrap_or_else(|e| panic!("CLUSTER NODES on {port}: {e}"))
    }

    /// Ports of the masters that own slots, as the first live node sees it, sorted.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .cluster_nodes(self.any_live())
            .iter()
            .filter(|l| l.is_master() && !l.slots.is_empty())
            .map(|l| l.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let mut conn = self.connection(self.any_live());
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the master owning `key`'s slot, as the first live node sees it.
    pub fn master_for_key(&self, key: &str) -> u16 {
        self.master_for_slot(self.keyslot(key))
    }

    /// The port of the master owning `slot`, as the first live node sees it.
    pub fn master_for_slot(&self, slot: u16) -> u16 {
        let port = self.any_live();
        self.cluster_nodes(port)
            .iter()
            .find(|l| l.is_master() && l.owns(slot))
            .map(|l| l.port)
            .unwrap_or_else(|| panic!("node {port} knows no master for slot {slot}"))
    }

    /// The keys of node `port` that start with `prefix` (SCAN on that node only).
    pub fn keys_on(&self, port: u16, prefix: &str) -> Vec<String> {
        super::scan_prefix(&mut self.connection(port), prefix)
    }

    /// Makes sure every write master `port` acknowledged so far reached a replica: writes a marker
    /// key through a direct connection to the master, then `WAIT 1 1000` on that connection.
    /// Returns the number of replicas that acknowledged.
    ///
    /// `WAIT` only covers the writes of its own connection; the replication stream is in order,
    /// though, so once a replica acknowledged the marker it holds every earlier write, those of
    /// the cluster client included.
    pub fn replicate(&self, port: u16) -> usize {
        let marker = (0..)
            .map(|i| format!("replication-marker:{i}"))
            .find(|k| self.master_for_key(k) == port)
            .expect("a key of this master");
        let mut conn = self.connection(port);
        let _: () = redis::cmd("SET")
            .arg(&marker)
            .arg("1")
            .query(&mut conn)
            .expect("SET the replication marker");
        redis::cmd("WAIT")
            .arg(1)
            .arg(1000)
            .query(&mut conn)
            .expect("WAIT")
    }

    /// Kills node `port` (SIGKILL: it gets no chance to replicate anything more or to tell the
    /// other nodes).
    pub fn kill(&mut self, port: u16) {
        self.masters_before_kill = self.masters();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("node {port} is not running"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// After [`RedisCluster::kill`] of a master: waits until every live node agrees that it failed
    /// and a replica took over its slots, with `cluster_state:ok` everywhere. Returns the port of
    /// the promoted replica. Panics after `limit`.
    pub fn wait_for_failover(&self, dead: u16, limit: Duration) -> u16 {
        let deadline = Instant::now() + limit;
        loop {
            let problem = match self.failover_state(dead) {
                Ok(promoted) => return promoted,
                Err(problem) => problem,
            };
            assert!(
                Instant::now() < deadline,
                "no failover of node {dead} within {limit:?}: {problem}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn failover_state(&self, dead: u16) -> Result<u16, String> {
        let mut promoted = None;
        for port in self.live_ports() {
            let info = cluster_info(port).map_err(|e| format!("CLUSTER INFO on {port}: {e}"))?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("node {port}: cluster_state is not ok"));
            }
            let lines = cluster_nodes(port).map_err(|e| format!("CLUSTER NODES on {port}: {e}"))?;
            let dead_line = lines.iter().find(|l| l.port == dead);
            if dead_line.is_some_and(|l| !l.slots.is_empty() || !l.is_failed()) {
                return Err(format!(
                    "node {port} still sees {dead} as a live slot owner"
                ));
            }
            let new: Vec<u16> = lines
                .iter()
                .filter(|l| l.is_master() && !l.slots.is_empty())
                .map(|l| l.port)
                .filter(|p| !self.masters_before_kill.contains(p))
                .collect();
            let covered: usize = lines
                .iter()
                .filter(|l| l.is_master() && !l.is_failed())
                .map(NodeLine::slot_count)
                .sum();
            match (new.as_slice(), promoted) {
                ([p], None) if covered == SLOTS => promoted = Some(*p),
                ([p], Some(q)) if *p == q && covered == SLOTS => {}
                _ => {
                    return Err(format!(
                        "node {port}: new masters {new:?}, {covered} slots covered"
                    ));
                }
            }
        }
        promoted.ok_or_else(|| "no live node".to_owned())
    }

    fn any_live(&self) -> u16 {
        *self.live_ports().first().expect("a live node")
    }

    /// The last lines of node `port`'s log.
    pub fn log_tail(&self, port: u16) -> String {
        log_tail(&self.node_dir(port).join("redis.log"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fails with a clear message if redis-server or redis-cli cannot be run.
fn require_binaries() {
    for (binary, package) in [
        (super::redis_server_binary(), "redis-server"),
        (super::redis_cli_binary(), "redis-tools"),
    ] {
        let ok = Command::new(&binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match ok {
            Ok(status) if status.success() => {}
            Ok(status) => {
                panic!("`{binary:?} --version` failed ({status}); {HOW_TO_GET_REDIS_CLUSTER}")
            }
            Err(e) => {
                panic!("cannot run {binary:?} ({e}; package {package}); {HOW_TO_GET_REDIS_CLUSTER}")
            }
        }
    }
}

/// `n` distinct ports of 127.0.0.1 that are free, each with its bus port (+10000) free too. The
/// listeners are held until all are picked, so the ports are distinct.
fn free_port_pairs(n: usize) -> Result<Vec<u16>, String> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == n {
            return Ok(ports);
        }
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = listener.local_addr().map(|a| a.port()) else {
            continue;
        };
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        if ports.contains(&bus) || ports.iter().any(|p| p + BUS_OFFSET == port) {
            continue;
        }
        let Ok(bus_listener) = TcpListener::bind(("127.0.0.1", bus)) else {
            continue;
        };
        held.push(listener);
        held.push(bus_listener);
        ports.push(port);
    }
    Err(format!("could not find {n} free port pairs"))
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

fn cluster_info(port: u16) -> redis::RedisResult<String> {
    redis::cmd("CLUSTER").arg("INFO").query(&mut connect(port)?)
}

fn info_section(port: u16, section: &str) -> redis::RedisResult<String> {
    redis::cmd("INFO").arg(section).query(&mut connect(port)?)
}

fn cluster_nodes(port: u16) -> redis::RedisResult<Vec<NodeLine>> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut connect(port)?)?;
    Ok(text.lines().filter_map(parse_node_line).collect())
}

/// Parses `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`.
fn parse_node_line(line: &str) -> Option<NodeLine> {
    let mut fields = line.split_whitespace();
    let id = fields.next()?.to_owned();
    let addr = fields.next()?;
    let port = addr
        .split(['@', ','])
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.next()?.split(',').map(str::to_owned).collect();
    let master = fields.next()?;
    let master_id = (master != "-").then(|| master.to_owned());
    let slots = fields
        .skip(4)
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let slot = s.parse().ok()?;
                Some((slot, slot))
            }
        })
        .collect();
    Some(NodeLine {
        id,
        port,
        flags,
        master_id,
        slots,
    })
}

/// The value of `field` in an `INFO`-style `field:value` text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
