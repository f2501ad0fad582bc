//! Stop, reload and scale with real processes.

use std::sync::Arc;
use std::time::Duration;

use rr_cluster::control::WorkerState;
use rr_cluster::{Event, MasterError, Outcome, Refusal, StopMode};
use rr_cluster_tests::{Cluster, WAIT, alive, ask, builder, slow_heartbeats, start_cluster};

/// Waits (bounded) until some worker reports an open connection in its heartbeat:
/// the request sent before is in flight.
async fn in_flight(cluster: &Cluster) {
    for _ in 0..2000 {
        let s = cluster.handle.status().await.expect("status");
        if s.workers.iter().any(|w| w.active > 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no request in flight");
}

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_the_request_in_flight() {
    let cluster = start_cluster(builder(WORKER.as_ref(), &[], 2)).await;
    let status = cluster.wait_ready(2).await;
    let addr = cluster.addr;
    // Long enough to be still in flight after the heartbeat that shows it and the
    // listener's close, on a loaded machine too.
    let slow = tokio::spawn(async move { ask(addr, "sleep 4000").await });
    in_flight(&cluster).await;
    cluster.handle.stop(StopMode::Graceful).await.expect("stop");
    // No new connection is accepted once the stop began: the listener closes.
    let mut closed = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "listener closed");
    assert!(!slow.is_finished(), "the slow request was still in flight");
    let answer = tokio::time::timeout(WAIT, slow)
        .await
        .expect("in time")
        .expect("join");
    assert!(
        answer.starts_with("done "),
        "in-flight request completed: {answer:?}"
    );
    let code = tokio::time::timeout(WAIT, cluster.handle.wait())
        .await
        .expect("stops");
    assert_eq!(code, 0);
    for w in status.workers {
        assert!(!alive(w.pid.expect("pid")), "worker exited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_kills_a_worker_that_does_not_finish() {
    let b = builder(WORKER.as_ref(), &["--linger"], 1).drain_timeout(Duration::from_millis(300));
    let mut cluster = start_cluster(b).await;
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    let slow = tokio::spawn(async move {
        let _ = tokio::time::timeout(WAIT, ask(addr, "sleep 30000")).await;
    });
    in_flight(&cluster).await;
    cluster.handle.stop(StopMode::Graceful).await.expect("stop");
    cluster
        .next_event(|e| matches!(e, Event::WorkerKilled { .. }).then_some(()))
        .await;
    assert_eq!(
        tokio::time::timeout(WAIT, cluster.handle.wait())
            .await
            .expect("stops"),
        0
    );
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_reload_replaces_every_worker_while_serving() {
    let mut cluster = start_cluster(builder(WORKER.as_ref(), &[], 3)).await;
    let before = cluster.wait_ready(3).await;
    let addr = cluster.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_stop = Arc::clone(&stop);
    // A client that keeps connecting during the reload: none may fail.
    let client = tokio::spawn(async move {
        let mut served = 0u32;
        while !client_stop.load(std::sync::atomic::Ordering::Relaxed) && served < 100_000 {
            let answer = ask(addr, "id").await;
            assert_eq!(
                answer.split_whitespace().count(),
                2,
                "bad answer {answer:?}"
            );
            served += 1;
        }
        served
    });
    let outcome = cluster.handle.reload().await.expect("accepted");
    assert_eq!(outcome, Outcome::Reloading { generation: 1 });
    cluster
        .next_event(|e| matches!(e, Event::ReloadFinished { generation: 1 }).then_some(()))
        .await;
    let after = cluster.wait_ready(3).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = tokio::time::timeout(WAIT, client)
        .await
        .expect("in time")
        .expect("client ok");
    assert!(served > 0);
    assert!(after.workers.iter().all(|w| w.generation == 1));
    let old: Vec<_> = before.workers.iter().filter_map(|w| w.pid).collect();
    assert!(
        after
            .workers
            .iter()
            .all(|w| !old.contains(&w.pid.expect("pid")))
    );
    assert_eq!(after.restarts_in_window, 0, "a reload is not a restart");
    assert_eq!(cluster.stop().await, 0);
}

/// A reload whose new worker fails rolls back to the configuration before it, also
/// when the old worker died meanwhile: the driver had forgotten that configuration
/// (no worker of it left), and the rollback started the failed one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_rolls_back_to_the_old_configuration_after_the_old_worker_died() {
    let b = builder(WORKER.as_ref(), &[], 1)
        .ready_timeout(Duration::from_secs(2))
        .on_reload(|| {
            // The new configuration's worker never says Ready.
            Ok(builder(WORKER.as_ref(), &["--ready-delay", "600000"], 1)
                .ready_timeout(Duration::from_secs(2)))
        });
    let mut cluster = start_cluster(b).await;
    let before = cluster.wait_ready(1).await;
    let old = before.workers[0].pid.expect("pid");
    cluster.handle.reload().await.expect("reload starts");
    cluster
        .next_event(|e| matches!(e, Event::WorkerSpawned { generation: 1, .. }).then_some(()))
        .await;
    // The old worker dies while the new one starts.
    assert!(cluster.kill_worker(old).await, "the old worker is alive");
    cluster
        .next_event(|e| matches!(e, Event::ReloadFailed { generation: 1, .. }).then_some(()))
        .await;
    // The slot runs the old configuration again: a worker that says Ready.
    let mut ready = None;
    for _ in 0..300 {
        let s = cluster.handle.status().await.expect("status");
        if let Some(w) = s
            .workers
            .iter()
            .find(|w| w.state == WorkerState::Ready && w.pid != Some(old))
        {
            ready = Some((s.generation, w.generation));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ready,
        Some((0, 0)),
        "a worker of the old configuration, ready"
    );
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_reload_keeps_the_pool() {
    let b = builder(WORKER.as_ref(), &[], 2)
        .on_reload(|| Err("rr-cluster.toml:3:1: unknown field `wrokers`".to_owned()));
    let mut cluster = start_cluster(b).await;
    let before = cluster.wait_ready(2).await;
    let refused = cluster.handle.reload().await.expect_err("rejected");
    let MasterError::Refused(Refusal::ConfigRejected { reason }) = refused else {
        panic!("{refused}");
    };
    assert!(reason.contains("wrokers"), "{reason}");
    cluster
        .next_event(|e| matches!(e, Event::ReloadRejected { .. }).then_some(()))
        .await;
    let after = cluster.handle.status().await.expect("status");
    assert_eq!(after.generation, 0);
    let pids =
        |s: &rr_cluster::control::Status| s.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
    assert_eq!(pids(&before), pids(&after));
    assert_eq!(cluster.ask("id").await.split_whitespace().count(), 2);
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_and_down_shows_in_status() {
    let cluster = start_cluster(builder(WORKER.as_ref(), &[], 2)).await;
    cluster.wait_ready(2).await;
    assert_eq!(
        cluster.handle.scale(4).await.expect("ok"),
        Outcome::Scaling { from: 2, to: 4 }
    );
    let s = cluster.wait_ready(4).await;
    assert_eq!(s.target_workers, 4);
    let slots: Vec<u32> = s.workers.iter().map(|w| w.slot).collect();
    assert_eq!(slots, [0, 1, 2, 3]);
    cluster.handle.scale(1).await.expect("ok");
    let s = cluster.wait_ready(1).await;
    assert_eq!(s.workers.len(), 1);
    assert_eq!(s.workers[0].slot, 0);
    assert_eq!(s.workers[0].state, WorkerState::Ready);
    assert!(matches!(
        cluster.handle.scale(0).await,
        Err(MasterError::Refused(Refusal::WorkersOutOfRange { .. }))
    ));
    // A step from a control client can be any i64: refused, not an overflow (which
    // panicked the master's loop in a debug build).
    for by in [i64::MAX, i64::MIN] {
        assert!(matches!(
            cluster.handle.scale_to(rr_cluster::ScaleTo::By(by)).await,
            Err(MasterError::Refused(Refusal::WorkersOutOfRange { .. }))
        ));
    }
    assert_eq!(cluster.stop().await, 0);
}

/// Issue 13: `max_requests`: workers are replaced after about that many connections,
/// drain-first, and no connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_recycles_drain_first_without_a_failure() {
    let b = builder(WORKER.as_ref(), &[], 2).max_requests(Some(100));
    let mut cluster = start_cluster(b).await;
    cluster.wait_ready(2).await;
    let addr = cluster.addr;
    let mut served = 0;
    for _ in 0..1000 {
        let answer = ask(addr, "id").await;
        assert_eq!(answer.split_whitespace().count(), 2, "{answer:?}");
        served += 1;
    }
    assert_eq!(served, 1000);
    let recycled = cluster.drain_events(|e| match e {
        Event::Recycled { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    println!(
        "1000 connections, max_requests 100: {} recycles",
        recycled.len()
    );
    assert!(recycled.len() >= 6, "{recycled:?}");
    assert!(recycled.iter().all(|r| r.starts_with("max_requests")));
    let metrics = cluster.handle.metrics().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rr_cluster_worker_recycles_total{reason=\"max_requests\"}")),
        "{metrics}"
    );
    assert_eq!(cluster.stop().await, 0);
}

/// A recycle whose replacement fails keeps the old worker serving and is tried again
/// (spaced out) once replacements start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_recycle_is_retried() {
    let marker = std::env::temp_dir().join(format!("rr-recycle-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let path = marker.display().to_string();
    let b = builder(WORKER.as_ref(), &["--crash-if-exists", &path], 1).max_requests(Some(5));
    let mut cluster = start_cluster(b).await;
    let first = cluster.wait_ready(1).await.workers[0].pid.expect("pid");
    std::fs::write(&marker, b"broken deploy").expect("marker");
    for _ in 0..5 {
        ask(cluster.addr, "id").await;
    }
    cluster
        .next_event(|e| matches!(e, Event::RecycleFailed { .. }).then_some(()))
        .await;
    // The old worker serves on.
    assert_eq!(ask(cluster.addr, "id").await, format!("0 {first}\n"));
    std::fs::remove_file(&marker).expect("remove marker");
    let reason = cluster
        .next_event(|e| match e {
            Event::Recycled { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.starts_with("max_requests"), "{reason}");
    let status = cluster.wait_ready(1).await;
    assert_ne!(status.workers[0].pid, Some(first), "replaced on the retry");
    assert_eq!(cluster.stop().await, 0);
}

/// Issue 13: `max_memory`: a worker that leaks is replaced drain-first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_recycles_a_leaking_worker() {
    let b = builder(WORKER.as_ref(), &[], 1).max_memory(Some(64 * 1024 * 1024));
    let mut cluster = start_cluster(b).await;
    let s = cluster.wait_ready(1).await;
    let leaker = s.workers[0].pid.expect("pid");
    // 80 MiB, 8 at a time, every request answered.
    for _ in 0..10 {
        let answer = ask(cluster.addr, "leak 8192").await;
        assert!(answer.starts_with("leaked "), "{answer:?}");
    }
    let reason = cluster
        .next_event(|e| match e {
            Event::Recycled { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.starts_with("max_memory"), "{reason}");
    let s = cluster.wait_ready(1).await;
    assert_ne!(s.workers[0].pid, Some(leaker));
    assert_eq!(ask(cluster.addr, "id").await.split_whitespace().count(), 2);
    assert_eq!(cluster.stop().await, 0);
}

/// Issue 13: `balance = "client-ip"`: 1000 connections from 4 source addresses land on
/// at most 4 slots, each address always on one; after a worker is killed only its
/// addresses move, and they come back to its replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_balance_keeps_each_address_on_its_slot() {
    // A late heartbeat would take a home slot out of the rotation for a moment and
    // move its addresses: heartbeats a minute apart.
    let b =
        slow_heartbeats(builder(WORKER.as_ref(), &[], 4)).balance(rr_cluster::Balance::ClientIp);
    let mut cluster = start_cluster(b).await;
    let status = cluster.wait_ready(4).await;
    let addr = cluster.addr;
    let sources: Vec<std::net::IpAddr> = (2..=5u8).map(|i| [127, 0, 0, i].into()).collect();
    async fn slot_from(addr: std::net::SocketAddr, source: std::net::IpAddr) -> u32 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind((source, 0).into()).expect("bind source");
        let mut s = socket.connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut s, b"id\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(
            WAIT,
            tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer),
        )
        .await
        .expect("in time")
        .expect("read");
        answer
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("slot")
    }
    let mut home = std::collections::BTreeMap::new();
    for i in 0..1000 {
        let source = sources[i % 4];
        let slot = slot_from(addr, source).await;
        assert_eq!(*home.entry(source).or_insert(slot), slot, "{source} moved");
    }
    let used: std::collections::BTreeSet<u32> = home.values().copied().collect();
    println!("client-ip: {home:?}");
    assert!(used.len() <= 4);
    // Kill the worker of the slot the first address lives on.
    let victim_slot = home[&sources[0]];
    let victim = status
        .workers
        .iter()
        .find(|w| w.slot == victim_slot)
        .and_then(|w| w.pid)
        .expect("victim");
    cluster.drain_events(|_| None::<()>);
    assert!(cluster.kill_worker(victim).await, "worker {victim} alive");
    cluster
        .next_event(|e| {
            matches!(e, Event::WorkerExited { pid, .. } if *pid == victim).then_some(())
        })
        .await;
    // While it is being replaced, only its addresses may move (and they come back).
    for source in &sources {
        let slot = slot_from(addr, *source).await;
        if home[source] != victim_slot {
            assert_eq!(slot, home[source], "{source} did not live on the dead slot");
        }
    }
    cluster.wait_ready(4).await;
    for source in &sources {
        assert_eq!(
            slot_from(addr, *source).await,
            home[source],
            "{source} is home again"
        );
    }
    assert_eq!(cluster.stop().await, 0);
}
