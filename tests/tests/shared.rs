//! `balance = "shared"` (issue 14): the master hands each worker the listening socket
//! and the workers accept themselves. Rolling reload, scale, restarts and a graceful
//! stop keep their guarantees.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rr_cluster::{Balance, Event, Outcome};
use rr_cluster_tests::{WAIT, ask, builder, start_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

/// Which slot answered each of `n` connections.
async fn spread(addr: std::net::SocketAddr, n: usize) -> HashMap<u32, usize> {
    let mut per = HashMap::new();
    for _ in 0..n {
        let answer = ask(addr, "id").await;
        let slot: u32 = answer
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad answer {answer:?}"));
        *per.entry(slot).or_default() += 1;
    }
    per
}

/// Waits (bounded) until the connections the workers last reported satisfy `check`.
async fn active_is(cluster: &rr_cluster_tests::Cluster, check: impl Fn(u32) -> bool) -> bool {
    for _ in 0..500 {
        let s = cluster.handle.status().await.expect("status");
        if check(s.workers.iter().map(|w| w.active).sum()) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_workers_accept_themselves_and_reload_without_a_failure() {
    let b = builder(WORKER.as_ref(), &[], 2).balance(Balance::Shared);
    let mut cluster = start_cluster(b).await;
    let before = cluster.wait_ready(2).await;
    assert_eq!(before.balance, "shared");
    let per = spread(cluster.addr, 200).await;
    assert_eq!(per.values().sum::<usize>(), 200);
    println!("200 connections over 2 shared-mode workers: {per:?}");
    let status = cluster.handle.status().await.expect("status");
    assert_eq!(status.accepted, 0, "the master accepted nothing itself");

    // A client that keeps connecting during two reloads: none may fail (`ask` panics
    // on a refused, reset or unanswered connection).
    let addr = cluster.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let client_stop = Arc::clone(&stop);
    let client = tokio::spawn(async move {
        let mut served = 0u32;
        while !client_stop.load(Ordering::Relaxed) && served < 100_000 {
            let answer = ask(addr, "id").await;
            assert_eq!(answer.split_whitespace().count(), 2, "{answer:?}");
            served += 1;
        }
        served
    });
    for generation in 1..=2 {
        let outcome = cluster.handle.reload().await.expect("accepted");
        assert_eq!(outcome, Outcome::Reloading { generation });
        cluster
            .next_event(|e| {
                matches!(e, Event::ReloadFinished { generation: g } if *g == generation)
                    .then_some(())
            })
            .await;
    }
    let after = cluster.wait_ready(2).await;
    stop.store(true, Ordering::Relaxed);
    let served = tokio::time::timeout(WAIT, client)
        .await
        .expect("in time")
        .expect("no failed connection");
    println!("{served} connections during 2 rolling reloads in shared mode, 0 failed");
    assert!(served > 0);
    assert!(after.workers.iter().all(|w| w.generation == 2));
    let old: Vec<u32> = before.workers.iter().filter_map(|w| w.pid).collect();
    assert!(
        after
            .workers
            .iter()
            .all(|w| !old.contains(&w.pid.expect("pid")))
    );
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_scales_restarts_and_stops_gracefully() {
    let b = builder(WORKER.as_ref(), &[], 2).balance(Balance::Shared);
    let mut cluster = start_cluster(b).await;
    let status = cluster.wait_ready(2).await;

    // Scale up: the new worker gets the listener and serves.
    cluster.handle.scale(3).await.expect("scale up");
    cluster.wait_ready(3).await;
    let mut seen = HashMap::new();
    for _ in 0..20 {
        for (slot, n) in spread(cluster.addr, 50).await {
            *seen.entry(slot).or_insert(0) += n;
        }
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "every worker accepts: {seen:?}");
    cluster.handle.scale(2).await.expect("scale down");
    cluster.wait_ready(2).await;
    spread(cluster.addr, 20).await;

    // A killed worker is replaced, and the pool serves throughout.
    let victim = status.workers[0].pid.expect("pid");
    cluster.drain_events(|_| None::<()>);
    // Through the pidfd taken at its spawn: read before the scaling, the pid could
    // belong to another process by now if the worker had died meanwhile.
    assert!(cluster.kill_worker(victim).await, "worker {victim} alive");
    let (slot, pid) = cluster
        .next_event(|e| match e {
            Event::WorkerReady { slot, pid, .. } => Some((*slot, *pid)),
            _ => None,
        })
        .await;
    assert_eq!(slot, 0);
    assert_ne!(pid, victim);
    let per = spread(cluster.addr, 50).await;
    assert_eq!(per.values().sum::<usize>(), 50);

    // Graceful stop: a request in flight is answered, then the master exits 0. The
    // slow request has reached a worker once a worker reports an open connection
    // (after every worker has reported none: the earlier ones are closed).
    let addr = cluster.addr;
    assert!(
        active_is(&cluster, |n| n == 0).await,
        "earlier connections closed"
    );
    // Long enough to show in a heartbeat that comes late on a loaded machine.
    let slow = tokio::spawn(async move { ask(addr, "sleep 3000").await });
    assert!(
        active_is(&cluster, |n| n > 0).await,
        "the slow request reached a worker"
    );
    assert_eq!(cluster.stop().await, 0);
    let answer = tokio::time::timeout(WAIT, slow)
        .await
        .expect("in time")
        .expect("answered");
    assert!(answer.starts_with("done "), "{answer:?}");
}

/// Connections waiting in the kernel's accept queue of the listening socket on
/// 127.0.0.1:`port` (`/proc/net/tcp` shows a listener's accept backlog as its
/// `rx_queue`).
fn accept_backlog(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u32::from_str_radix(rx, 16).ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shared_worker_leaves_connections_in_the_backlog_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Capacity 1: the worker holds one connection and accepts the next only when it
    // closes. (Without the limit, a flood takes the descriptors a worker keeps for its
    // own files.)
    let b = builder(WORKER.as_ref(), &["--max-connections", "1"], 1).balance(Balance::Shared);
    let cluster = start_cluster(b).await;
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    first.write_all(b"hold\n").await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, first.read(&mut buf))
        .await
        .expect("the first connection is answered")
        .expect("read");
    assert!(buf[..n].starts_with(b"held"), "{:?}", &buf[..n]);
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    second.write_all(b"id\n").await.expect("write");
    // The worker is full: the second connection stays in the kernel's backlog.
    let deadline = std::time::Instant::now() + WAIT;
    let mut backlog = None;
    for _ in 0..2_000 {
        backlog = accept_backlog(addr.port());
        if backlog == Some(1) || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        backlog,
        Some(1),
        "the full worker accepted the second connection"
    );
    // The first one ends; the worker accepts and answers the second.
    first.write_all(b"done\n").await.expect("write");
    let n = tokio::time::timeout(WAIT, second.read(&mut buf))
        .await
        .expect("the second connection is answered once the first closed")
        .expect("read");
    assert!(n > 0, "the second connection was closed unanswered");
    assert_eq!(accept_backlog(addr.port()), Some(0));
    assert_eq!(cluster.stop().await, 0);
}

/// A graceful stop in shared mode closes the master's copy of the listening socket at
/// once: once the draining workers have closed theirs, new clients are refused while
/// the drain goes on. The master's copy used to keep the socket listening until it
/// exited, so clients were taken into the backlog, left waiting, then reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_shared_pool_refuses_new_clients_while_it_drains() {
    let b = builder(WORKER.as_ref(), &[], 1).balance(Balance::Shared);
    let mut cluster = start_cluster(b).await;
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    // A held connection keeps the drain going until the test lets it go.
    let mut held = tokio::net::TcpStream::connect(addr).await.expect("connect");
    held.write_all(b"hold\n").await.expect("write");
    let mut buf = [0u8; 32];
    let n = tokio::time::timeout(WAIT, held.read(&mut buf))
        .await
        .expect("held in time")
        .expect("read");
    assert!(buf[..n].starts_with(b"held"), "{:?}", &buf[..n]);
    cluster
        .handle
        .stop(rr_cluster::StopMode::Graceful)
        .await
        .expect("stop");
    cluster
        .next_event(|e| matches!(e, Event::WorkerDraining { .. }).then_some(()))
        .await;
    let mut refused = false;
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    assert!(refused, "new clients were taken in while the pool drained");
    // The drain is still going (the held connection is open): let it end.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(50), cluster.handle.wait())
            .await
            .is_err(),
        "the pool was still draining"
    );
    drop(held);
    assert_eq!(
        tokio::time::timeout(WAIT, cluster.handle.wait())
            .await
            .expect("stops"),
        0
    );
}
