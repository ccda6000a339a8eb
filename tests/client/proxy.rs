//! A faulty TCP proxy between the client and the server: per connection, it passes traffic,
//! loses the response of a request the server ran, resets the connection, or delays the
//! response. The clients under test keep no idle connections, so each attempt is one
//! connection and a script of faults is a script of attempts.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Forwards both ways.
    Pass,
    /// Forwards the request; once the server's response starts, closes the client's connection
    /// without passing it on: the server ran the request, the client never hears of it.
    DropResponse,
    /// As `DropResponse`, but resets the client's connection (`SO_LINGER` 0).
    ResetAfterForward,
    /// Resets the client's connection at once: the request never reaches the server.
    ResetBeforeForward,
    /// Holds the server's response this long, then passes it on.
    Delay(Duration),
}

pub(crate) struct FaultyProxy {
    addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Fault>>>,
    then: Arc<Mutex<Fault>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultyProxy {
    pub(crate) async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let then = Arc::new(Mutex::new(Fault::Pass));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (script, then, connections) = (script.clone(), then.clone(), connections.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let next = script.lock().unwrap().pop_front();
                    let fault = next.unwrap_or_else(|| *then.lock().unwrap());
                    tokio::spawn(carry(client, upstream, fault));
                }
            }
        });
        Self {
            addr,
            script,
            then,
            connections,
            task,
        }
    }

    /// The faults of the next connections, in order; after them, [`then`](Self::then)'s.
    pub(crate) fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.script.lock().unwrap().extend(faults);
    }

    /// The fault of every connection once the script is played.
    pub(crate) fn then(&self, fault: Fault) {
        *self.then.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn carry(mut client: TcpStream, upstream: SocketAddr, fault: Fault) {
    if fault == Fault::ResetBeforeForward {
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if fault == Fault::Pass {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    }
    // Forward the request until the server's response starts.
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let first = loop {
        tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server.write_all(&up[..n]).await.is_err() { return },
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => break n,
            },
        }
    };
    match fault {
        Fault::DropResponse => drop(client),
        Fault::ResetAfterForward => {
            let _ = client.set_zero_linger();
        }
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            if client.write_all(&down[..first]).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
        Fault::Pass | Fault::ResetBeforeForward => unreachable!("handled above"),
    }
}
