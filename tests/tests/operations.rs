//! Stop, reload and scale with real processes.

use std::sync::Arc;
use std::time::Duration;

use rr_cluster::control::WorkerState;
use rr_cluster::{Event, MasterError, Outcome, Refusal, StopMode};
use rr_cluster_tests::{Cluster, WAIT, alive, ask, builder, start_cluster};

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
    let slow = tokio::spawn(async move { ask(addr, "sleep 1500").await });
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
    assert_eq!(cluster.stop().await, 0);
}
