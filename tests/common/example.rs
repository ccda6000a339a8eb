//! The inventory example as a process: started with an environment, spoken to over plain
//! HTTP/1.1, signalled and killed like a real deployment's instance.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// An example's binary: `cargo test` builds the examples beside the test binaries.
pub fn binary(name: &str) -> PathBuf {
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

/// A running `inventory` example; killed when dropped.
pub struct Inventory {
    child: Child,
    addr: String,
}

impl Inventory {
    /// Starts the example with `env` (and `BIND=127.0.0.1:0`) and waits until it listens.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary("inventory"));
        command
            .env("BIND", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start the inventory example");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            panic!("the example did not start: {line:?}, {:?}", child.wait());
        };
        let addr = addr.to_owned();
        Self { child, addr }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `signal` (`"KILL"`, `"STOP"`, `"CONT"`, `"TERM"`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the example did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Delivers an `ORDER_PAID` body under `key`: the status, whether it was a replay, and the
    /// body. Blocks until the answer (or the connection's end).
    pub fn deliver(&self, key: &str, body: &str) -> Answer {
        deliver(&self.addr, key, body)
    }
}

impl Drop for Inventory {
    fn drop(&mut self) {
        // A stopped process must be continued to die of anything but SIGKILL; SIGKILL is enough.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer, reduced to what the tests look at. `status` is 0 when the connection ended
/// without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
    pub body: String,
}

/// `POST /webhooks/order-paid` on `addr`, with `Connection: close`.
pub fn deliver(addr: &str, key: &str, body: &str) -> Answer {
    let request = format!(
        "POST /webhooks/order-paid HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(addr, &request)
}

/// `GET path` on `addr`.
pub fn get(addr: &str, path: &str) -> Answer {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"),
    )
}

fn exchange(addr: &str, request: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect to the example");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A killed server resets the connection: what arrived before counts.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Answer {
            status: 0,
            replayed: false,
            body: text.into_owned(),
        };
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let replayed = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("idempotent-replayed: true"));
    Answer {
        status,
        replayed,
        body: body.to_owned(),
    }
}
