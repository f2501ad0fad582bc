//! The master under resource pressure, as a separate process: descriptor exhaustion
//! (EMFILE) and a worker that stops reading its channel.

use std::sync::Arc;
use std::time::Duration;

use rr_cluster_tests::{MasterProcess, WAIT, alive, ask, cpu_time, rss_kib, signal};

const MASTER: &str = env!("CARGO_BIN_EXE_test-master");
const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_backs_off_without_spinning_and_recovers() {
    let mut master = tokio::task::spawn_blocking(|| {
        let mut m = MasterProcess::start(&[], MASTER, &["--hog-fds"], 2, WORKER, &[]);
        let hogged = m.line_matching(|l| l.starts_with("hogged"));
        assert!(hogged.starts_with("hogged "), "{hogged}");
        m
    })
    .await
    .expect("join");
    // Clients connect (the kernel completes the handshakes into the backlog) but the
    // master cannot accept: every accept fails with EMFILE.
    let addr = master.addr;
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { ask(addr, "id").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time(master.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(master.pid()) - before;
    println!("master CPU while every accept fails with EMFILE: {used:?} in 2 s");
    assert!(
        used < Duration::from_millis(500),
        "the accept loop spins: {used:?} of CPU in 2 s"
    );
    assert!(
        clients.iter().all(|c| !c.is_finished()),
        "nothing was served meanwhile"
    );

    signal(master.pid(), rustix::process::Signal::USR1);
    let released = tokio::task::spawn_blocking(move || {
        let line = master.line_matching(|l| l == "released");
        (master, line)
    });
    let (master, line) = tokio::time::timeout(WAIT, released)
        .await
        .expect("in time")
        .expect("join");
    assert_eq!(line, "released");
    for c in clients {
        let answer = tokio::time::timeout(WAIT, c)
            .await
            .expect("served after recovery")
            .expect("join");
        assert_eq!(answer.split_whitespace().count(), 2, "{answer:?}");
    }
    assert!(alive(master.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_reading_is_skipped_and_master_memory_stays_bounded() {
    let master = tokio::task::spawn_blocking(|| {
        MasterProcess::start(&[], MASTER, &["--no-heartbeat"], 2, WORKER, &[])
    })
    .await
    .expect("join");
    let addr = master.addr;
    let (frozen, live) = (master.workers[0], master.workers[1]);
    let rss_before = rss_kib(master.pid());
    signal(frozen, rustix::process::Signal::STOP);

    // 20,000 connections, 32 at a time. The ones sent to the stopped worker before its
    // channel filled wait there; every other one is served by the live worker.
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut waiting = Vec::new();
    let mut served = 0u32;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20_000 {
        let permit = Arc::clone(&limit).acquire_owned().await.expect("semaphore");
        tasks.spawn(async move {
            let exchange = async {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                tokio::io::AsyncWriteExt::write_all(&mut s, b"id\n").await?;
                let mut answer = String::new();
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut answer).await?;
                Ok::<_, std::io::Error>(answer)
            };
            // The live worker answers at once; a second leaves room for a loaded
            // machine, and the ones sent to the stopped worker wait out the second.
            let answer = tokio::time::timeout(Duration::from_secs(1), exchange).await;
            drop(permit);
            answer
        });
        while let Some(done) = tasks.try_join_next() {
            match done.expect("join") {
                Ok(Ok(answer)) => {
                    assert!(answer.ends_with(&format!(" {live}\n")), "{answer:?}");
                    served += 1;
                }
                _ => waiting.push(()),
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done.expect("join") {
            Ok(Ok(_)) => served += 1,
            _ => waiting.push(()),
        }
    }
    let rss_after = rss_kib(master.pid());
    println!(
        "stopped worker: {} connections waited in its channel, {served} served by the other; master RSS {rss_before} KiB -> {rss_after} KiB",
        waiting.len()
    );
    assert!(
        waiting.len() < 2_000,
        "the full channel was skipped: {} waited",
        waiting.len()
    );
    assert!(served as usize + waiting.len() == 20_000);
    assert!(
        rss_after < rss_before + 16 * 1024,
        "master memory grew: {rss_before} -> {rss_after} KiB"
    );

    // The worker wakes up, takes the (by now abandoned) connections that waited in its
    // channel, and the pool serves on.
    signal(frozen, rustix::process::Signal::CONT);
    assert_eq!(ask(addr, "id").await.split_whitespace().count(), 2);
    drop(master);
}
