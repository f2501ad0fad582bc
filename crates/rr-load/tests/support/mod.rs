//! A tiny HTTP/1.1 server on 127.0.0.1:0 for the end-to-end tests, with a few ways to
//! misbehave, and a fake master control socket.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rr_cluster::control::{Request, Response, Status, WorkerState, WorkerStatus};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::runtime::Runtime;

/// Every server task gives up after this long, whatever the test does.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);
/// The most connections (and requests per connection) a test server handles.
const MAX_CONNECTIONS: u64 = 2_000_000;
const MAX_REQUESTS_PER_CONNECTION: u64 = 10_000_000;

/// How the test server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// 200 with `x-worker-id` alternating 0/1 (per response), `x-worker-pid` 1000+id;
    /// honours `Connection: close` in the request.
    Ok,
    /// Like `Ok`, but with a chunked body.
    Chunked,
    /// Like `Ok`, but every third response on a connection says `Connection: close` and
    /// the server closes the connection after it.
    CloseEveryThird,
    /// Reads the request, then resets the connection (SO_LINGER 0).
    Reset,
    /// Reads the request, then closes the connection without answering.
    CloseSilently,
    /// Answers with bytes that are not HTTP.
    Garbage,
    /// Sends half a response, then closes.
    Truncated,
    /// Reads the request and never answers.
    Hang,
    /// Like `Ok` for the first N requests the server receives (over all connections),
    /// then reads requests and never answers: a server that freezes.
    StallAfter(u64),
    /// Like `Ok`, but the first N responses (over all connections) say
    /// `Connection: close` and the server closes the connection after them.
    CloseFirst(u64),
    /// Like `Ok`, but `Content-Length: 5` before a 12-byte body.
    LongerThanLength,
}

/// A server running on its own runtime; dropping it stops it.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Requests answered with a 200.
    pub responses: Arc<AtomicU64>,
    /// Requests read (whatever the answer).
    pub received: Arc<AtomicU64>,
    runtime: Option<Runtime>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime")
}

/// Starts a server with `behavior` on 127.0.0.1, port chosen by the kernel.
pub fn start(behavior: Behavior) -> TestServer {
    let rt = runtime();
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let responses = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&responses);
    let seen = Arc::clone(&received);
    rt.spawn(async move {
        let accept_all = async {
            for _ in 0..MAX_CONNECTIONS {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counters = (Arc::clone(&counter), Arc::clone(&seen));
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(SERVER_LIFETIME, serve(stream, behavior, counters))
                            .await;
                });
            }
        };
        let _ = tokio::time::timeout(SERVER_LIFETIME, accept_all).await;
    });
    TestServer {
        addr,
        responses,
        received,
        runtime: Some(rt),
    }
}

async fn serve(
    mut stream: TcpStream,
    behavior: Behavior,
    (counter, received): (Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        // Read one request head.
        let (head_end, wants_close) = loop {
            if let Some(end) = find_head_end(&buf[..filled]) {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                break (end, head.contains("\r\nconnection: close"));
            }
            if filled == buf.len() {
                return;
            }
            match stream.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        buf.copy_within(head_end..filled, 0);
        filled -= head_end;
        let nth = received.fetch_add(1, Ordering::Relaxed);

        match behavior {
            Behavior::Reset => {
                let _ = stream.set_zero_linger();
                return;
            }
            Behavior::CloseSilently => return,
            Behavior::Hang => {
                tokio::time::sleep(SERVER_LIFETIME).await;
                return;
            }
            Behavior::StallAfter(n) if nth >= n => {
                tokio::time::sleep(SERVER_LIFETIME).await;
                return;
            }
            Behavior::Garbage => {
                let _ = stream.write_all(b"garbage garbage\r\n\r\n").await;
                return;
            }
            Behavior::Truncated => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
                    .await;
                return;
            }
            Behavior::Ok
            | Behavior::Chunked
            | Behavior::CloseEveryThird
            | Behavior::StallAfter(_)
            | Behavior::CloseFirst(_)
            | Behavior::LongerThanLength => {}
        }
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let id = n % 2;
        let close = wants_close
            || (behavior == Behavior::CloseEveryThird && served % 3 == 0)
            || matches!(behavior, Behavior::CloseFirst(first) if n < first);
        let connection = if close { "Connection: close\r\n" } else { "" };
        let response = if behavior == Behavior::Chunked {
            format!(
                "HTTP/1.1 200 OK\r\nx-worker-id: {id}\r\nx-worker-pid: {}\r\n{connection}\
                 Transfer-Encoding: chunked\r\n\r\n6\r\nHello \r\n6\r\nWorld\n\r\n0\r\n\r\n",
                1000 + id
            )
        } else {
            let length = if behavior == Behavior::LongerThanLength {
                5
            } else {
                12
            };
            format!(
                "HTTP/1.1 200 OK\r\nx-worker-id: {id}\r\nx-worker-pid: {}\r\n{connection}\
                 Content-Length: {length}\r\n\r\nHello World\n",
                1000 + id
            )
        };
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A fake master: answers `status` with the given worker pids (all `ready`, slots in
/// order) and the listener `listen`, and `reload` with `ok`; counts the reloads.
pub struct FakeMaster {
    pub path: PathBuf,
    pub reloads: Arc<AtomicU64>,
    runtime: Option<Runtime>,
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn fake_master(dir: &Path, pids: Vec<u32>, listen: SocketAddr) -> FakeMaster {
    let path = dir.join(format!("rr-load-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let rt = runtime();
    let listener = {
        let _guard = rt.enter();
        UnixListener::bind(&path).expect("bind control socket")
    };
    let reloads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&reloads);
    rt.spawn(async move {
        let accept_all = async {
            for _ in 0..100_000 {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                for _ in 0..1_000 {
                    let Ok(Some(line)) = lines.next_line().await else {
                        break;
                    };
                    let answer = match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Status) => Response::Status(status(&pids, listen)),
                        Ok(Request::Reload { .. }) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                            Response::Ok {
                                message: "reloading".into(),
                            }
                        }
                        _ => Response::Error {
                            message: "unsupported".into(),
                        },
                    };
                    let out = serde_json::to_string(&answer).expect("json") + "\n";
                    if write.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(SERVER_LIFETIME, accept_all).await;
    });
    FakeMaster {
        path,
        reloads,
        runtime: Some(rt),
    }
}

fn status(pids: &[u32], listen: SocketAddr) -> Status {
    Status {
        master_pid: std::process::id(),
        target_workers: pids.len(),
        listeners: vec![listen.to_string()],
        workers: pids
            .iter()
            .enumerate()
            .map(|(slot, &pid)| WorkerStatus {
                slot: slot as u32,
                id: slot as u64 + 1,
                pid: Some(pid),
                state: WorkerState::Ready,
                generation: 0,
                uptime_ms: 1,
                ..WorkerStatus::default()
            })
            .collect(),
        ..Status::default()
    }
}
