//! Node.js workers through Node's own IPC channel (the `node` dialect), with the
//! machine's `node`: the package js/rr-cluster-worker and a worker written with Node's
//! documented API only. Skipped (with the reason) when `node` is not installed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rr_cluster::{Event, GiveUpAction, Master, Outcome, Protocol, WorkerCommand};
use rr_cluster_tests::{Cluster, WAIT, alive, start_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test app of the package's own tests (routes `/`, `/slow?ms=`, `/throw`; echoes
/// every user message back).
fn app() -> String {
    repo()
        .join("js/rr-cluster-worker/test-support/fixtures/http-worker.js")
        .display()
        .to_string()
}

fn node() -> Option<String> {
    let ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        rr_cluster_tests::missing_tool("`node` is not installed (the Node.js dialect needs it)");
    }
    ok.then(|| "node".to_owned())
}

fn pool(script: &str, workers: usize) -> rr_cluster::MasterBuilder {
    Master::builder()
        .listen("127.0.0.1:0")
        .workers(workers)
        .command(
            WorkerCommand::new("node")
                .arg(script)
                .protocol(Protocol::Node),
        )
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_millis(200))
        .heartbeat_timeout(Some(Duration::from_secs(5)))
        .min_uptime(Duration::from_millis(300))
}

/// One HTTP/1.1 GET with `Connection: close`: (status code, x-worker-id, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no head in {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let worker = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-worker-id: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Ok((status, worker, body.to_owned()))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| std::io::Error::other("timed out"))?
}

async fn split(cluster: &Cluster, n: usize) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for _ in 0..n {
        let (status, worker, body) = get(cluster.addr, "/").await.expect("answer");
        assert_eq!(status, 200, "{body}");
        *per.entry(worker).or_default() += 1;
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_workers_split_300_connections_150_each() {
    let Some(_) = node() else { return };
    let cluster = start_cluster(pool(&app(), 2)).await;
    cluster.wait_ready(2).await;
    let per = split(&cluster, 300).await;
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(per.values().all(|n| *n == 150), "{per:?}");
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_node_worker_without_the_package_is_served() {
    let Some(_) = node() else { return };
    let plain = repo().join("examples/node/plain.js").display().to_string();
    let cluster = start_cluster(pool(&plain, 2)).await;
    cluster.wait_ready(2).await;
    let per = split(&cluster, 100).await;
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(per.values().all(|n| *n == 50), "{per:?}");
    // A rolling reload: the plain worker exits once the master closes its channel.
    cluster.handle.reload_and_wait().await.expect("reload");
    let per = split(&cluster, 10).await;
    assert_eq!(per.values().sum::<usize>(), 10);
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_worker_is_replaced() {
    let Some(_) = node() else { return };
    let mut cluster = start_cluster(pool(&app(), 2)).await;
    let s = cluster.wait_ready(2).await;
    let victim = s.workers[0].pid.expect("pid");
    cluster.drain_events(|_| None::<()>);
    assert!(
        cluster.kill_worker(victim).await,
        "worker {victim} is ours and alive"
    );
    let (slot, pid) = cluster
        .next_event(|e| match e {
            Event::WorkerReady { slot, pid, .. } => Some((*slot, *pid)),
            _ => None,
        })
        .await;
    assert_eq!(slot, 0);
    assert_ne!(pid, victim);
    assert_eq!(split(&cluster, 10).await.values().sum::<usize>(), 10);
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncaught_exception_is_a_suicide_replaced_before_the_old_worker_exits() {
    let Some(_) = node() else { return };
    let mut cluster = start_cluster(pool(&app(), 1)).await;
    let s = cluster.wait_ready(1).await;
    let old = s.workers[0].clone();
    // A request in flight when the worker crashes: its drain waits for it, so the old
    // worker outlives the replacement's spawn (with nothing open it exits within
    // milliseconds, which can beat a fork and exec on a loaded machine).
    let slow = tokio::spawn(get(cluster.addr, "/slow?ms=1500"));
    let mut in_flight = false;
    for _ in 0..200 {
        let (_, _, state) = get(cluster.addr, "/state").await.expect("state");
        let active: u32 = state
            .split("\"active\":")
            .nth(1)
            .and_then(|rest| rest.trim_end_matches(['}', '\n']).parse().ok())
            .unwrap_or(0);
        // The slow connection and this one.
        if active >= 2 {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(in_flight, "the slow request never reached the worker");
    let (status, _, body) = get(cluster.addr, "/throw").await.expect("answer");
    assert_eq!((status, body.as_str()), (200, "bye\n"));
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(
            cluster
                .next_event(|e| match e {
                    Event::WorkerSuicide { id, .. } if *id == old.id => Some("suicide"),
                    Event::WorkerSpawned { id, .. } if *id != old.id => Some("replacement spawned"),
                    Event::WorkerExited { id, .. } if *id == old.id => Some("old exited"),
                    _ => None,
                })
                .await,
        );
    }
    assert_eq!(order, ["suicide", "replacement spawned", "old exited"]);
    let (status, _, body) = slow.await.expect("join").expect("slow answer");
    assert_eq!(
        (status, body.as_str()),
        (200, "slow done\n"),
        "the request in flight is served through the crash's drain"
    );
    let s = cluster.wait_ready(1).await;
    assert_ne!(s.workers[0].pid, old.pid);
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_node_worker_gives_up_after_limit_plus_one_spawns() {
    let Some(_) = node() else { return };
    let dir = std::env::temp_dir().join(format!("rr-node-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("crash.js");
    std::fs::write(&script, "process.exit(1);\n").expect("write");
    let limit = 3;
    let b = pool(&script.display().to_string(), 1)
        .restart_limit(limit)
        .backoff_base(Duration::from_millis(10))
        .backoff_max(Duration::from_millis(50))
        .on_give_up(GiveUpAction::Exit);
    let mut cluster = start_cluster(b).await;
    let code = tokio::time::timeout(WAIT, cluster.handle.wait())
        .await
        .expect("gives up in time");
    assert_eq!(code, 1);
    let spawns = cluster.drain_events(|e| matches!(e, Event::WorkerSpawned { .. }).then_some(()));
    assert_eq!(spawns.len(), limit + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_reload_of_node_workers_loses_no_request() {
    let Some(_) = node() else { return };
    let cluster = start_cluster(pool(&app(), 2)).await;
    let before = cluster.wait_ready(2).await;
    let addr = cluster.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = Arc::clone(&stop);
    let client = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, 0u32);
        while !client_stop.load(Ordering::Relaxed) && ok < 100_000 {
            match get(addr, "/").await {
                Ok((200, _, _)) => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    });
    for _ in 0..2 {
        let outcome = cluster.handle.reload_and_wait().await.expect("reload");
        assert!(matches!(outcome, Outcome::Reloaded { .. }), "{outcome:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.await.expect("client");
    println!("node reload under load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 0);
    let after = cluster.wait_ready(2).await;
    for w in &before.workers {
        assert!(!alive(w.pid.expect("pid")), "old worker gone");
    }
    assert!(after.workers.iter().all(|w| w.generation == 2));
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_messages_go_both_ways() {
    let Some(_) = node() else { return };
    let cluster = start_cluster(pool(&app(), 2)).await;
    cluster.wait_ready(2).await;
    let mut messages = cluster.handle.messages().expect("messages");
    let sent = cluster
        .handle
        .send(None, br#"{"hello":"workers"}"#.to_vec())
        .await
        .expect("send");
    assert_eq!(sent, 2);
    let mut echoes = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(WAIT, messages.recv())
            .await
            .expect("in time")
            .expect("open");
        echoes.push((m.slot, String::from_utf8(m.payload).expect("utf8")));
    }
    echoes.sort();
    assert_eq!(
        echoes,
        [
            (0, r#"{"echo":{"hello":"workers"}}"#.to_owned()),
            (1, r#"{"echo":{"hello":"workers"}}"#.to_owned())
        ]
    );
    // A Node.js pool takes JSON only, and not the dialect's own messages.
    assert!(
        cluster
            .handle
            .send(None, b"not json".to_vec())
            .await
            .is_err()
    );
    assert!(
        cluster
            .handle
            .send(None, br#"{"rr":"drain"}"#.to_vec())
            .await
            .is_err()
    );
    // Worker to master, from a request.
    let (status, _, _) = get(cluster.addr, "/send?x=1").await.expect("answer");
    assert_eq!(status, 200);
    let m = tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("in time")
        .expect("open");
    // Compact JSON text, compared as text.
    let text = String::from_utf8_lossy(&m.payload);
    assert!(text.contains("\"query\":\"?x=1\""), "{text}");
    // A string cut inside a character (Node writes a lone surrogate escape, which
    // serde_json refuses): it arrives with U+FFFD, and the worker is not dropped for it
    // (its channel was closed, and the worker killed).
    let before = cluster.handle.status().await.expect("status");
    let (status, _, _) = get(cluster.addr, "/send-cut").await.expect("answer");
    assert_eq!(status, 200);
    let m = tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(m.payload, "{\"cut\":\"\u{fffd}\"}".as_bytes());
    // A message longer than the limit is dropped, the worker kept: the next one
    // arrives.
    let (status, _, _) = get(cluster.addr, "/send-long").await.expect("answer");
    assert_eq!(status, 200);
    let (status, _, _) = get(cluster.addr, "/send?after=long").await.expect("answer");
    assert_eq!(status, 200);
    let m = tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("in time")
        .expect("open");
    let text = String::from_utf8_lossy(&m.payload);
    assert!(text.contains("\"query\":\"?after=long\""), "{text}");
    for _ in 0..4 {
        let (status, _, _) = get(cluster.addr, "/").await.expect("answer");
        assert_eq!(status, 200);
    }
    let after = cluster.handle.status().await.expect("status");
    let pids =
        |s: &rr_cluster::control::Status| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
    assert_eq!(pids(&before), pids(&after), "no worker was dropped");
    assert_eq!(cluster.stop().await, 0);
}

/// Node keeps the descriptor of its latest read that brought one for the next complete
/// handle line. After 64 KiB of other lines, a 64 KiB read ended inside the first
/// connection's line; the read that completed it also held the second connection's
/// line and descriptor, which replaced the first: the first line got the second
/// client, the second line none (NACK), and the first client hung. The worker blocks
/// its event loop (reads nothing) until everything is on its channel, so that its
/// first read is exactly that 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_line_cut_by_a_node_read_keeps_its_own_socket() {
    let Some(_) = node() else { return };
    let dir = std::env::temp_dir().join(format!("rr-node-exposed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ready, read) = (dir.join("ready"), dir.join("read"));
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&read);
    let script = dir.join("worker.js");
    std::fs::write(
        &script,
        r#"const http = require('node:http');
const fs = require('node:fs');
const pause = new Int32Array(new SharedArrayBuffer(4));
// Blocks the event loop until `path` exists (30 s at most): nothing is read meanwhile.
const waitFor = (path) => {
  for (let i = 0; i < 3000 && !fs.existsSync(path); i++) Atomics.wait(pause, 0, 0, 10);
};
let messages = 0;
const server = http.createServer((req, res) => res.end(`${req.socket.seen}`));
process.on('message', (m, handle) => {
  if (typeof m === 'string') messages += 1;
  if (m && m.rr === 'connection') {
    // How many application messages came before this connection.
    handle.seen = messages;
    server.emit('connection', handle);
  }
});
waitFor(process.argv[2]);
process.send({ rr: 'ready' });
waitFor(process.argv[3]);
"#,
    )
    .expect("write");
    let b = Master::builder()
        .listen("127.0.0.1:0")
        .workers(1)
        .command(
            WorkerCommand::new("node")
                .arg(script.display().to_string())
                .arg(ready.display().to_string())
                .arg(read.display().to_string())
                .protocol(Protocol::Node),
        )
        .ready_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(2))
        .heartbeat_timeout(Some(Duration::from_secs(10)));
    let cluster = start_cluster(b).await;
    // One line of 65 500 bytes, written before the worker is ready (so before any
    // connection); the first connection's line (81 bytes) then spans byte 65 536.
    let text = format!("\"{}\"", "x".repeat(65_497));
    let sent = cluster
        .handle
        .send(None, text.into_bytes())
        .await
        .expect("send");
    assert_eq!(sent, 1);
    std::fs::write(&ready, b"").expect("ready marker");
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    let clients = [tokio::spawn(get(addr, "/")), tokio::spawn(get(addr, "/"))];
    // Both connections on the channel, or the second held back.
    let mut settled = false;
    for _ in 0..2000 {
        let status = cluster.handle.status().await.expect("status");
        // Held by the guard: accepted, not sent (`queued` counts exactly those).
        let held = status.queued == 1;
        let dispatched = status.workers.iter().map(|w| w.dispatched).sum::<u64>();
        if status.accepted == 2 && (dispatched == 2 || (dispatched == 1 && held)) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(settled, "the connections never reached dispatch");
    std::fs::write(&read, b"").expect("read marker");
    for client in clients {
        let (status, _, body) = client.await.expect("join").expect("answered");
        assert_eq!(
            (status, body.as_str()),
            (200, "1"),
            "served, after the application message"
        );
    }
    assert_eq!(cluster.stop().await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
