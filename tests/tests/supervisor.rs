//! The supervisor with real processes: restarts, give-up, hung workers, suicide.

use std::time::{Duration, Instant};

use rr_cluster::control::WorkerState;
use rr_cluster::{Event, GiveUpAction};
use rr_cluster_tests::{WAIT, alive, builder, kill, signal, start_cluster};

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_worker_is_replaced_median_of_20() {
    // 20 kills in ~22 s, twice the default limit of 10 restarts a minute: workers that
    // served past min_uptime are always replaced, so the pool never gives up.
    let mut cluster = start_cluster(builder(WORKER.as_ref(), &[], 2)).await;
    let status = cluster.wait_ready(2).await;
    let mut victim = status.workers[0].pid.expect("pid");
    // Past min_uptime: a crash of a healthy worker is restarted without backoff.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    cluster.drain_events(|_| None::<()>);
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        kill(victim);
        let (slot, new_pid) = cluster
            .next_event(|e| match e {
                Event::WorkerReady { slot, pid, .. } => Some((*slot, *pid)),
                _ => None,
            })
            .await;
        times.push(start.elapsed());
        assert_eq!(slot, 0, "the same slot is refilled");
        assert_ne!(new_pid, victim);
        victim = new_pid;
        // Serves again at once.
        assert!(!cluster.ask("id").await.is_empty());
        // Let the worker pass min_uptime so the next kill restarts without backoff.
        tokio::time::sleep(Duration::from_millis(1050)).await;
    }
    times.sort();
    println!(
        "SIGKILL -> replacement Ready over 20 kills: median {:?}, min {:?}, max {:?}",
        times[10], times[0], times[19]
    );
    let status = cluster.handle.status().await.expect("status");
    assert_eq!(status.workers[0].restarts, 20);
    assert!(!status.gave_up);
    assert_eq!(status.restarts_in_window, 0);
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_start_gives_up_after_limit_plus_one_spawns() {
    let limit = 3;
    let b = builder(WORKER.as_ref(), &["--crash-at-start", "7"], 1)
        .restart_limit(limit)
        .restart_window(Duration::from_secs(60))
        .backoff_base(Duration::from_millis(10))
        .backoff_max(Duration::from_millis(50))
        .on_give_up(GiveUpAction::Exit);
    let mut cluster = start_cluster(b).await;
    let code = tokio::time::timeout(WAIT, cluster.handle.wait())
        .await
        .expect("master exits in time");
    assert_ne!(code, 0, "give-up exits non-zero");
    let mut spawns = 0;
    let mut give_ups = 0;
    let mut exits = Vec::new();
    for event in cluster.drain_events(|e| Some(e.clone())) {
        match event {
            Event::WorkerSpawned { .. } => spawns += 1,
            Event::GiveUp { .. } => give_ups += 1,
            Event::WorkerExited { exit, .. } => exits.push(exit.code),
            _ => {}
        }
    }
    assert_eq!(spawns, limit + 1);
    assert_eq!(give_ups, 1);
    assert!(exits.iter().all(|c| *c == Some(7)), "{exits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_master_leaves_no_worker_behind() {
    use std::io::BufRead;
    let mut master = std::process::Command::new(env!("CARGO_BIN_EXE_test-master"))
        .args(["3", WORKER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start test-master");
    let master_pid = master.id();
    let stdout = master.stdout.take().expect("stdout");
    let pids = tokio::task::spawn_blocking(move || {
        let mut pids = Vec::new();
        for line in std::io::BufReader::new(stdout).lines().take(10) {
            let line = line.expect("line");
            if let Some(rest) = line.strip_prefix("ready ") {
                pids.push(
                    rest.split_whitespace()
                        .nth(1)
                        .and_then(|p| p.parse::<u32>().ok())
                        .expect("pid"),
                );
                if pids.len() == 3 {
                    break;
                }
            }
        }
        pids
    });
    let pids = tokio::time::timeout(WAIT, pids)
        .await
        .expect("ready in time")
        .expect("join");
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| alive(*p)));
    kill(master_pid);
    let _ = master.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let survivors: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &survivors {
        kill(*p);
    }
    assert!(
        survivors.is_empty(),
        "orphans outlived the master: {survivors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_worker_is_detected_as_hung_and_replaced() {
    let b = builder(WORKER.as_ref(), &[], 2)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Some(Duration::from_millis(800)));
    let mut cluster = start_cluster(b).await;
    let status = cluster.wait_ready(2).await;
    let frozen = status.workers[1].clone();
    let frozen_pid = frozen.pid.expect("pid");
    signal(frozen_pid, rustix::process::Signal::STOP);
    let hung_id = cluster
        .next_event(|e| match e {
            Event::WorkerHung { id, pid, .. } if *pid == frozen_pid => Some(*id),
            _ => None,
        })
        .await;
    assert_eq!(hung_id, frozen.id);
    let dispatched_at_detection = {
        let s = cluster.handle.status().await.expect("status");
        s.workers
            .iter()
            .find(|w| w.id == hung_id)
            .map(|w| w.dispatched)
    };
    // From detection on, every connection is served, by live workers only.
    for _ in 0..20 {
        let answer = cluster.ask("id").await;
        let pid: u32 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid");
        assert_ne!(pid, frozen_pid);
    }
    if let Some(before) = dispatched_at_detection {
        let s = cluster.handle.status().await.expect("status");
        if let Some(w) = s.workers.iter().find(|w| w.id == hung_id) {
            assert_eq!(w.dispatched, before, "no socket sent to the hung worker");
        }
    }
    cluster.wait_ready(2).await;
    assert!(!alive(frozen_pid), "the hung worker was killed");
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_announces_suicide_and_is_replaced_before_it_exits() {
    let mut cluster = start_cluster(builder(WORKER.as_ref(), &[], 1)).await;
    let status = cluster.wait_ready(1).await;
    let old = status.workers[0].clone();
    // A slow request in flight on the worker that will panic.
    let addr = cluster.addr;
    let slow = tokio::spawn(async move { rr_cluster_tests::ask(addr, "sleep 700").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cluster.ask("panic").await, "panicking\n");
    let mut order = Vec::new();
    for _ in 0..3 {
        let e = cluster
            .next_event(|e| match e {
                Event::WorkerSuicide { id, .. } if *id == old.id => Some("suicide"),
                Event::WorkerSpawned { id, .. } if *id != old.id => Some("replacement spawned"),
                // Regression: a worker that panicked kept its `Incoming` open and
                // lingered until SIGKILL at the drain deadline. It must exit by itself.
                Event::WorkerExited {
                    id,
                    planned: true,
                    exit,
                    ..
                } if *id == old.id => {
                    assert_eq!(exit.signal, None, "the old worker was killed: {exit}");
                    Some("old exited")
                }
                _ => None,
            })
            .await;
        order.push(e);
    }
    assert_eq!(order, ["suicide", "replacement spawned", "old exited"]);
    // The request in flight on the leaving worker completed.
    let answer = tokio::time::timeout(WAIT, slow)
        .await
        .expect("in time")
        .expect("join");
    assert_eq!(answer, format!("done 0 {}\n", old.pid.expect("pid")));
    let status = cluster.wait_ready(1).await;
    assert_ne!(status.workers[0].pid, old.pid);
    assert_eq!(status.workers[0].state, WorkerState::Ready);
    assert_eq!(cluster.stop().await, 0);
}
