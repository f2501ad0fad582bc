//! Version negotiation (docs/PROTOCOL.md, "Versions"): this master speaks every
//! protocol version since 1, so workers written to version 1 keep working unchanged.
//! tests/fixtures/worker_v1.py is v0.1's Python sketch, kept as it was; the Rust test
//! worker can be held to version 1 with `--protocol 1`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rr_cluster::{Event, MasterBuilder, WorkerCommand};
use rr_cluster_tests::{WAIT, ask, builder, missing_tool, slow_heartbeats, start_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

fn python() -> bool {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing_tool("python3 is not installed (the version-1 fixture is Python)");
    }
    ok
}

fn v1_python_pool(workers: usize) -> MasterBuilder {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/worker_v1.py");
    // Heartbeats a minute apart: the round-robin split below is exact only while no
    // late heartbeat takes a worker out of the rotation (the sketch heartbeats from
    // its own loop, between connections it serves inline).
    slow_heartbeats(builder("python3".as_ref(), &[], workers))
        .command(WorkerCommand::new("python3").arg(fixture))
}

/// One HTTP request; the body of the answer.
async fn get(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_python_worker_is_served_reloaded_and_stopped() {
    if !python() {
        return;
    }
    let mut cluster = start_cluster(v1_python_pool(2)).await;
    cluster.wait_ready(2).await;
    let mut per: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let body = get(cluster.addr).await;
        let worker = body
            .split_whitespace()
            .nth(4)
            .unwrap_or_default()
            .to_owned();
        *per.entry(worker).or_default() += 1;
    }
    println!("100 connections over 2 version-1 Python workers: {per:?}");
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(per.values().all(|n| *n == 50), "round-robin: {per:?}");

    // A rolling reload under a connecting client: no failure (`get` panics on one).
    let addr = cluster.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = Arc::clone(&stop);
    let client = tokio::spawn(async move {
        let mut served = 0u32;
        while !client_stop.load(Ordering::Relaxed) && served < 100_000 {
            assert!(get(addr).await.contains("generation"));
            served += 1;
        }
        served
    });
    cluster.handle.reload().await.expect("reload");
    cluster
        .next_event(|e| matches!(e, Event::ReloadFinished { generation: 1 }).then_some(()))
        .await;
    stop.store(true, Ordering::Relaxed);
    let served = tokio::time::timeout(WAIT, client)
        .await
        .expect("in time")
        .expect("no failed request");
    println!("{served} requests during the reload of version-1 workers, 0 failed");
    assert!(get(cluster.addr).await.contains("(generation 1)"));
    assert_eq!(cluster.stop().await, 0, "version-1 workers drain and exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_worker_held_to_version_1_gets_every_connection() {
    let b = slow_heartbeats(builder(WORKER.as_ref(), &["--protocol", "1"], 2));
    let cluster = start_cluster(b).await;
    cluster.wait_ready(2).await;
    let mut per: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let answer = ask(cluster.addr, "id").await;
        let slot = answer
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *per.entry(slot).or_default() += 1;
    }
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(per.values().all(|n| *n == 100), "{per:?}");
    assert_eq!(cluster.stop().await, 0);
}
