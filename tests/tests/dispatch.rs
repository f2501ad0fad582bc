//! Connections reach workers: round-robin split, the echo example, Unix listeners.

use std::collections::HashMap;

use rr_cluster_tests::{WAIT, builder, slow_heartbeats, start_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const ECHO: &str = env!("CARGO_BIN_EXE_echo");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_split_300_connections_100_each() {
    // Exact: no late heartbeat takes a worker out of the rotation meanwhile.
    let cluster = start_cluster(slow_heartbeats(builder(WORKER.as_ref(), &[], 3))).await;
    let status = cluster.wait_ready(3).await;
    let pids: Vec<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
    let mut per_slot: HashMap<u32, usize> = HashMap::new();
    for _ in 0..300 {
        let answer = cluster.ask("id").await;
        let mut words = answer.split_whitespace();
        let slot: u32 = words.next().and_then(|w| w.parse().ok()).expect("slot");
        let pid: u32 = words.next().and_then(|w| w.parse().ok()).expect("pid");
        assert!(
            pids.contains(&pid),
            "answer from an unknown worker: {answer}"
        );
        *per_slot.entry(slot).or_default() += 1;
    }
    assert_eq!(per_slot.len(), 3);
    assert!(per_slot.values().all(|n| *n == 100), "{per_slot:?}");
    let status = cluster.handle.status().await.expect("status");
    assert_eq!(status.accepted, 300);
    assert!(
        status.workers.iter().all(|w| w.dispatched == 100),
        "{status:?}"
    );
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_example_echoes_over_the_passed_socket() {
    let cluster = start_cluster(builder(ECHO.as_ref(), &[], 2)).await;
    cluster.wait_ready(2).await;
    for round in 0..4u8 {
        let mut stream = tokio::net::TcpStream::connect(cluster.addr)
            .await
            .expect("connect");
        // Bigger than a socket buffer, to exercise the copy loop.
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i as u8) ^ round).collect();
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&payload).await.expect("write");
            write.shutdown().await.expect("shutdown");
        };
        let mut echoed = Vec::new();
        let recv = read.read_to_end(&mut echoed);
        let ((), got) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
            .await
            .expect("echo in time");
        got.expect("read");
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload, "echoed bytes differ");
    }
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener_serves_unix_connections() {
    let dir = std::env::temp_dir().join(format!("rr-e2e-unix-{}", std::process::id()));
    // Left over by an earlier run that had our pid (a container's pids repeat).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("app.sock");
    // Strict alternation below: no late heartbeat may take a worker out meanwhile.
    let b = slow_heartbeats(builder(WORKER.as_ref(), &[], 2))
        .listen(format!("unix:{}", path.display()));
    let cluster = start_cluster(b).await;
    cluster.wait_ready(2).await;
    let mut slots = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        s.write_all(b"id\n").await.expect("write");
        let mut answer = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
            .await
            .expect("in time")
            .expect("read");
        slots.push(answer.split_whitespace().next().unwrap_or("").to_owned());
    }
    // Round-robin over both workers, whichever became ready first.
    assert_ne!(slots[0], slots[1], "{slots:?}");
    assert_eq!(slots[0], slots[2], "{slots:?}");
    assert_eq!(slots[1], slots[3], "{slots:?}");
    // TCP still works alongside.
    assert!(!cluster.ask("id").await.is_empty());
    assert_eq!(cluster.stop().await, 0);
    assert!(!path.exists(), "socket file removed on stop");
    let _ = std::fs::remove_dir_all(&dir);
}
