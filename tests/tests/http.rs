//! The library's drain-correct HTTP server, through the axum example (master and
//! workers in one binary): the client's address reaches the handler, and rolling
//! reloads lose no request, with keep-alive and with `Connection: close`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rr_cluster::control::{self, Request, Response, Status};
use rr_cluster_tests::{WAIT, http_load, kill};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AXUM: &str = env!("CARGO_BIN_EXE_axum-example");

/// The axum example on 127.0.0.1:0 with a control socket; killed on drop.
struct AxumPool {
    child: Child,
    control: PathBuf,
    dir: PathBuf,
}

impl AxumPool {
    async fn start(name: &str) -> (AxumPool, std::net::SocketAddr) {
        let dir = std::env::temp_dir().join(format!("rr-axum-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let control = dir.join("ctl.sock");
        let child = Command::new(AXUM)
            .args(["--listen", "127.0.0.1:0", "--workers", "2", "--control"])
            .arg(&control)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the axum example");
        let pool = AxumPool {
            child,
            control,
            dir,
        };
        let s = pool.wait_ready().await;
        let addr = s.listeners[0].parse().expect("addr");
        (pool, addr)
    }

    async fn status(&self) -> Option<Status> {
        match control::request(&self.control, &Request::Status).await {
            Ok(Response::Status(s)) => Some(s),
            _ => None,
        }
    }

    async fn wait_ready(&self) -> Status {
        for _ in 0..2000 {
            if let Some(s) = self.status().await {
                let ready = s
                    .workers
                    .iter()
                    .filter(|w| w.state == control::WorkerState::Ready)
                    .count();
                if ready == 2 && s.workers.len() == 2 {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the axum pool did not get ready");
    }

    async fn reload(&self) {
        let answer = control::request_within(&self.control, &Request::Reload { wait: true }, WAIT)
            .await
            .expect("reload");
        assert!(matches!(answer, Response::Ok { .. }), "{answer:?}");
    }
}

impl Drop for AxumPool {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill(self.child.id());
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_example_splits_100_requests_and_sees_the_client_address() {
    let (pool, addr) = AxumPool::start("split").await;
    let mut per: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let local = s.local_addr().expect("local");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut text = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut text))
            .await
            .expect("in time")
            .expect("read");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains(&format!("you are {local}")),
            "the handler sees {local}: {text}"
        );
        let worker = text
            .lines()
            .find_map(|l| l.strip_prefix("x-worker-id: "))
            .expect("x-worker-id")
            .to_owned();
        *per.entry(worker).or_default() += 1;
    }
    // Round-robin, within a few: the example keeps the default 1 s heartbeat (it has no
    // flag for it), and a heartbeat late on a loaded machine takes its worker out of the
    // rotation for a moment. (tests/tests/dispatch.rs pins the exact split.)
    assert_eq!(per.len(), 2);
    assert!(per.values().all(|n| (40..=60).contains(n)), "{per:?}");
    drop(pool);
}

async fn reloads_under_load(keepalive: bool) {
    let (pool, addr) = AxumPool::start(if keepalive { "ka" } else { "close" }).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(http_load(addr, 8, keepalive, Arc::clone(&stop)));
    for _ in 0..3 {
        pool.reload().await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("in time")
        .expect("join");
    println!(
        "axum, 3 reloads, {}: {ok} requests answered, {failed} failed",
        if keepalive {
            "keep-alive"
        } else {
            "Connection: close"
        }
    );
    assert_eq!(failed, 0);
    assert!(ok > 100, "{ok}");
    let s = pool.status().await.expect("status");
    assert_eq!(s.generation, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_reloads_lose_no_keepalive_request() {
    reloads_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_reloads_lose_no_close_request() {
    reloads_under_load(false).await;
}
