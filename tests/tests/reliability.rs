//! Regression tests for the faults that stopped or wedged a v0.1 pool (issue 9): each
//! names the item it pins. They run real masters and real workers on 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rr_cluster::control::{Request, Response, WorkerState};
use rr_cluster::{Event, StopMode};
use rr_cluster_tests::{
    MasterProcess, WAIT, alive, ask, builder, missing_tool, raise_nofile_limit, rss_kib, signal,
    start_cluster, try_ask,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MASTER: &str = env!("CARGO_BIN_EXE_test-master");
const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");

const UNPRIVILEGED: [&str; 4] = [
    "/usr/bin/setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
];

/// The test master and worker where `nobody` can execute them: where they were built,
/// or else copies in a directory of their own under the temporary directory (a clone
/// under root's private home is out of `nobody`'s reach); removed on drop. An error
/// says why they cannot run as `nobody` at all: this process must be root with
/// /usr/bin/setpriv, and `nobody` must reach and execute one or the other.
struct NobodyCanRun {
    master: String,
    worker: String,
    copies: Option<std::path::PathBuf>,
}

impl NobodyCanRun {
    fn find() -> Result<NobodyCanRun, String> {
        if !std::path::Path::new(UNPRIVILEGED[0]).exists() || !rustix::process::getuid().is_root() {
            return Err("needs root and /usr/bin/setpriv to run the master as nobody".into());
        }
        let runs = |master: &str, worker: &str| {
            std::process::Command::new(UNPRIVILEGED[0])
                .args(&UNPRIVILEGED[1..])
                .args([
                    "sh",
                    "-c",
                    r#"test -x "$1" && test -x "$2""#,
                    "sh",
                    master,
                    worker,
                ])
                .status()
                .is_ok_and(|s| s.success())
        };
        if runs(MASTER, WORKER) {
            return Ok(NobodyCanRun {
                master: MASTER.into(),
                worker: WORKER.into(),
                copies: None,
            });
        }
        let dir = std::env::temp_dir().join(format!("rr-nobody-{}", std::process::id()));
        // Left over by an earlier run that had our pid (a container's pids repeat).
        let _ = std::fs::remove_dir_all(&dir);
        let copy = |from: &str, name: &str| -> std::io::Result<String> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let to = dir.join(name);
            std::fs::copy(from, &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
            Ok(to.display().to_string())
        };
        let found = NobodyCanRun {
            master: copy(MASTER, "test-master").map_err(|e| e.to_string())?,
            worker: copy(WORKER, "test-worker").map_err(|e| e.to_string())?,
            copies: Some(dir),
        };
        if runs(&found.master, &found.worker) {
            Ok(found)
        } else {
            Err(format!(
                "nobody can execute neither {MASTER} nor a copy in {}",
                std::env::temp_dir().display()
            ))
        }
    }
}

impl Drop for NobodyCanRun {
    fn drop(&mut self) {
        if let Some(dir) = &self.copies {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The master's dispatch counters (`metric <name> <value>` lines after SIGUSR2).
fn dispatch_metrics(master: &mut MasterProcess) -> std::collections::HashMap<String, u64> {
    signal(master.pid(), rustix::process::Signal::USR2);
    let mut metrics = std::collections::HashMap::new();
    loop {
        let l = master.line_matching(|l| l.starts_with("metric"));
        if l == "metrics end" {
            return metrics;
        }
        let mut words = l.split_whitespace().skip(1);
        if let (Some(name), Some(value)) = (words.next(), words.next()) {
            metrics.insert(name.to_owned(), value.parse().unwrap_or(0));
        }
    }
}

/// `n` connections, `concurrency` at a time, each sending `command`; how many were
/// answered in full (two words) within `timeout` each.
async fn load(
    addr: std::net::SocketAddr,
    n: usize,
    concurrency: usize,
    command: &'static str,
    timeout: Duration,
) -> usize {
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = Arc::clone(&limit).acquire_owned().await.expect("semaphore");
        tasks.spawn(async move {
            let exchange = async {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(format!("{command}\n").as_bytes()).await?;
                let mut answer = String::new();
                s.read_to_string(&mut answer).await?;
                Ok::<_, std::io::Error>(answer)
            };
            let ok = matches!(
                tokio::time::timeout(timeout, exchange).await,
                Ok(Ok(a)) if a.split_whitespace().count() == 2
            );
            drop(permit);
            ok
        });
    }
    let mut served = 0;
    while let Some(done) = tasks.join_next().await {
        served += usize::from(done.expect("join"));
    }
    served
}

/// Item 1: a non-root master has its in-flight descriptors capped by its
/// RLIMIT_NOFILE: the kernel refuses a send with ETOOMANYREFS once its user has more
/// descriptors in flight than that (`too_many_unix_fds`). v0.1 took every worker that
/// hit it out of rotation for good, and every later connection timed out. Now such a
/// send only skips the worker for a moment.
///
/// The limit must be below what stalled workers can hold: a version-2 worker takes at
/// most its incoming queue's room (256) at a time, so three stopped workers hold at
/// most 768 in flight. The master runs with 400 (enough for the 256 accepted
/// connections it holds at most, and its own few): past 400 in flight every send is
/// refused, until the workers resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_master_serves_every_connection_after_stalled_workers_resume() {
    // A privilege, not a tool CI can install: only the tool's absence fails under CI.
    if !rustix::process::getuid().is_root() {
        eprintln!("SKIPPED: not root, so the master cannot be made to run as nobody");
        return;
    }
    let bins = match NobodyCanRun::find() {
        Ok(bins) => bins,
        Err(why) => return missing_tool(&why),
    };
    const CLIENTS: usize = 3000;
    // Every client holds a socket here while it waits.
    let limit = raise_nofile_limit();
    assert!(
        limit > CLIENTS as u64 + 256,
        "this test opens {CLIENTS} sockets: RLIMIT_NOFILE is {limit}"
    );
    let (m, w) = (bins.master.clone(), bins.worker.clone());
    let mut master = tokio::task::spawn_blocking(move || {
        MasterProcess::start(&UNPRIVILEGED, &m, &["--nofile", "400"], 4, &w, &[])
    })
    .await
    .expect("join");
    assert_eq!(
        std::fs::metadata(format!("/proc/{}", master.pid()))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .ok(),
        Some(65534),
        "the master runs as nobody"
    );
    let stalled = master.workers[1..].to_vec();
    for pid in &stalled {
        signal(*pid, rustix::process::Signal::STOP);
    }
    let addr = master.addr;
    let client = tokio::spawn(load(addr, CLIENTS, CLIENTS, "id", Duration::from_secs(30)));
    // The stalled workers fill up and the kernel starts refusing sends (to the live
    // worker too: the count is the user's): wait (bounded) until the master saw it.
    let (m, busy) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        let mut busy = 0;
        while busy == 0 && Instant::now() < deadline {
            busy = dispatch_metrics(&mut master)
                .get("rr_cluster_dispatch_send_busy_total")
                .copied()
                .unwrap_or(0);
            if busy == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (master, busy)
    })
    .await
    .expect("join");
    master = m;
    for pid in &stalled {
        signal(*pid, rustix::process::Signal::CONT);
    }
    assert!(
        busy > 0,
        "the kernel refused no send (ETOOMANYREFS): the path under test was not reached"
    );
    let served = tokio::time::timeout(Duration::from_secs(60), client)
        .await
        .expect("in time")
        .expect("join");
    assert_eq!(served, CLIENTS, "every connection attempt is served");
    let (m, metrics) = tokio::task::spawn_blocking(move || {
        let metrics = dispatch_metrics(&mut master);
        (master, metrics)
    })
    .await
    .expect("join");
    master = m;
    println!("dispatch counters: {metrics:?}");
    // No worker paid for it: the same four processes serve on, every one of them
    // (v0.1 took a worker that hit ETOOMANYREFS out of rotation for good).
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let answer = ask(addr, "id").await;
        pids.insert(
            answer
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok()),
        );
    }
    let expected: std::collections::BTreeSet<_> = master.workers.iter().map(|p| Some(*p)).collect();
    assert_eq!(pids, expected, "every original worker serves");
    assert!(alive(master.pid()));
}

/// Item 2: a worker whose descriptor table is full gets MSG_CTRUNC; v0.1's worker
/// exited 0 without a word and the pool died. It must survive, and the master must
/// not push more descriptors than the worker can hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_descriptor_table_costs_connections_not_the_worker() {
    // A version-1 worker (no capacity reported): the master cannot know its limit.
    let b = builder(WORKER.as_ref(), &["--nofile", "48", "--protocol", "1"], 1);
    let mut cluster = start_cluster(b).await;
    let s = cluster.wait_ready(1).await;
    let pid = s.workers[0].pid.expect("pid");
    let addr = cluster.addr;
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
            let _ = c.write_all(b"hold\n").await;
            held.push(c);
        }
    }
    // Some were held, the rest were dropped by the kernel on their way in.
    let mut answered = 0;
    for c in &mut held {
        let mut buf = [0u8; 16];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            answered += usize::from(n > 0);
        }
    }
    assert!(answered > 0 && answered < 150, "{answered} held");
    drop(held);
    // The same worker process serves on, once it has closed what it held: until then
    // a connection on its way may still find its table full (and be dropped).
    let mut answer = String::new();
    for _ in 0..200 {
        answer = try_ask(addr, "id").await.unwrap_or_default();
        if !answer.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer, format!("0 {pid}\n"));
    assert!(
        cluster
            .drain_events(|e| match e {
                Event::WorkerExited { .. } => Some(()),
                _ => None,
            })
            .is_empty(),
        "the worker never exited"
    );
    assert_eq!(cluster.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_worker_is_never_sent_more_than_it_can_hold() {
    // capacity 20: the master holds the rest back instead of losing them.
    let b = builder(WORKER.as_ref(), &["--max-connections", "20"], 1);
    let cluster = start_cluster(b).await;
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    let mut held = Vec::new();
    for _ in 0..60 {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"hold\n").await.expect("write");
        held.push(c);
    }
    let mut answered = Vec::new();
    for (i, c) in held.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
        {
            if n > 0 {
                answered.push(i);
            }
        }
    }
    assert!(
        answered.len() <= 20,
        "held {} > capacity 20",
        answered.len()
    );
    let s = cluster.handle.status().await.expect("status");
    assert!(s.queued > 0, "the rest wait in the master: {s:?}");
    // Closing the held ones lets the waiting ones through: none was lost.
    let waiting: Vec<_> = held
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !answered.contains(i))
        .map(|(_, c)| c)
        .collect();
    let n_waiting = waiting.len();
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    let mut waiting = waiting;
    while !waiting.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for mut c in waiting {
            let mut buf = [0u8; 16];
            match tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    got += 1;
                    drop(c);
                }
                _ => still.push(c),
            }
        }
        waiting = still;
    }
    assert_eq!(
        got, n_waiting,
        "every held-back connection was served later"
    );
    let s = cluster.handle.status().await.expect("status");
    assert_eq!(s.workers[0].lost, 0);
    assert_eq!(cluster.stop().await, 0);
}

/// A connection the master accepted and holds (every worker full) when a graceful stop
/// comes is served once a worker has room, before the drain: it used to be closed,
/// because the workers left the rotation before the accept loop's last dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_master_holds_at_a_stop_is_served_not_closed() {
    let b = builder(WORKER.as_ref(), &["--max-connections", "1"], 1);
    let mut cluster = start_cluster(b).await;
    cluster.wait_ready(1).await;
    let addr = cluster.addr;
    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    first.write_all(b"hold\n").await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, first.read(&mut buf))
        .await
        .expect("held in time")
        .expect("read");
    assert!(buf[..n].starts_with(b"held"), "{:?}", &buf[..n]);
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    second.write_all(b"id\n").await.expect("write");
    let mut held = false;
    for _ in 0..500 {
        if cluster.handle.status().await.expect("status").queued == 1 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "the master holds the second connection");
    cluster.drain_events(|_| None::<()>);
    cluster.handle.stop(StopMode::Graceful).await.expect("stop");
    cluster
        .next_event(|e| matches!(e, Event::Stopping { .. }).then_some(()))
        .await;
    // Room again: the held connection goes to the worker before its drain.
    drop(first);
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, second.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(answer.split_whitespace().count(), 2, "{answer:?}");
    assert_eq!(
        tokio::time::timeout(WAIT, cluster.handle.wait())
            .await
            .expect("stops"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_takes_the_next_connection_when_one_closes_not_at_its_heartbeat() {
    // Capacity 1, and heartbeats a minute apart: only the `Ack` that a closing
    // connection asks for can reopen the window within the test.
    let b = builder(WORKER.as_ref(), &["--max-connections", "1"], 1)
        .heartbeat_interval(Duration::from_secs(60))
        .heartbeat_timeout(None);
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
    // The worker is full: the second connection waits in the master.
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    second.write_all(b"id\n").await.expect("write");
    let deadline = Instant::now() + WAIT;
    let mut held_back = false;
    for _ in 0..20_000 {
        let s = cluster.handle.status().await.expect("status");
        held_back = s.queued == 1;
        if held_back || Instant::now() > deadline {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        held_back,
        "the second connection was not held back in the master"
    );
    // The first one ends; the second is answered long before the next heartbeat.
    first.write_all(b"done\n").await.expect("write");
    let n = tokio::time::timeout(WAIT, second.read(&mut buf))
        .await
        .expect("the second connection is answered once the first closed")
        .expect("read");
    assert!(n > 0, "the second connection was closed unanswered");
    assert_eq!(cluster.stop().await, 0);
}

/// Item 13: a second `Worker::from_env()` closed the first Worker's live descriptor,
/// and `is_worker()` was true in a worker's own child processes. The test worker
/// checks both before Ready (`--self-checks`: a child asks `is_worker()`, a second
/// adoption must be refused) and exits 3 or 4 if either is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_adoption_is_refused_and_a_workers_children_are_not_workers() {
    let mut cluster = start_cluster(builder(WORKER.as_ref(), &["--self-checks"], 1)).await;
    let status = cluster.wait_ready(1).await;
    let pid = status.workers[0].pid.expect("pid");
    // The first Worker still works after the refused second adoption.
    assert_eq!(ask(cluster.addr, "id").await, format!("0 {pid}\n"));
    assert!(
        cluster
            .drain_events(|e| matches!(e, Event::WorkerExited { .. }).then_some(()))
            .is_empty(),
        "the worker passed its self-checks"
    );
    assert_eq!(cluster.stop().await, 0);
}

/// Item 4: a worker that closed its channel but kept running was restarted 23 times in
/// 25 s without counting, shown as `ready`. It is a boot failure now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_its_channel_is_lost_and_counts_toward_give_up() {
    let b = builder(WORKER.as_ref(), &["--close-channel"], 1)
        .restart_limit(2)
        .backoff_base(Duration::from_millis(10))
        .backoff_max(Duration::from_millis(50));
    let mut cluster = start_cluster(b).await;
    cluster
        .next_event(|e| matches!(e, Event::WorkerChannelClosed { .. }).then_some(()))
        .await;
    let s = cluster.handle.status().await.expect("status");
    assert_eq!(s.workers[0].state, WorkerState::Lost, "{s:?}");
    let code = tokio::time::timeout(WAIT, cluster.handle.wait())
        .await
        .expect("gives up in time");
    assert_eq!(code, 1);
    let spawns = cluster.drain_events(|e| matches!(e, Event::WorkerSpawned { .. }).then_some(()));
    assert_eq!(spawns.len() + 1, 3, "limit 2: three spawns, then give up");
}

/// Item 8: a descendant of a worker that holds the worker's end of the channel kept
/// the master from exiting, and leaked its link task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descendant_holding_the_channel_does_not_keep_the_master_alive() {
    let script = format!("sleep 30 & exec {WORKER}");
    let b = rr_cluster::Master::builder()
        .listen("127.0.0.1:0")
        .workers(1)
        .command(rr_cluster::WorkerCommand::new("sh").args(["-c", &script]))
        .heartbeat_interval(Duration::from_millis(100))
        .drain_timeout(Duration::from_secs(5));
    let cluster = start_cluster(b).await;
    let s = cluster.wait_ready(1).await;
    let worker = s.workers[0].pid.expect("pid");
    // The `sleep` is in the worker's process group.
    let sleeper = group_members(worker)
        .into_iter()
        .find(|p| *p != worker)
        .expect("the sleep in the worker's group");
    let started = Instant::now();
    let code = cluster.stop().await;
    assert_eq!(code, 0);
    println!(
        "master stopped in {:?} with a descendant holding the channel",
        started.elapsed()
    );
    // Long before the `sleep 30` that holds the channel ends (the master used to wait
    // for it), with room for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(15));
    // The leftover of the worker's group was killed with it.
    let mut gone = false;
    for _ in 0..300 {
        if !alive(sleeper) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "the worker's descendant was killed");
}

/// Processes whose process group is `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let group = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(2))
            .and_then(|s| s.parse::<u32>().ok());
        if group == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Item 9: 1,024 messages the application never reads blocked delivery of connections
/// and Drain; the master spawned a task per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_messages_never_block_connections_or_drain() {
    // A drain deadline far beyond the bound below: a drain stuck behind the messages
    // would end only there (or not in time for `stop`).
    let b = builder(WORKER.as_ref(), &[], 1).drain_timeout(Duration::from_secs(60));
    let cluster = start_cluster(b).await;
    let s = cluster.wait_ready(1).await;
    let pid = s.workers[0].pid.expect("pid");
    let mut queued = 0;
    for i in 0..5_000u32 {
        queued += cluster
            .handle
            .send(Some(0), format!("message {i}").into_bytes())
            .await
            .expect("send");
    }
    assert!(queued >= 1_024, "{queued}");
    for _ in 0..20 {
        assert_eq!(cluster.ask("id").await, format!("0 {pid}\n"));
    }
    let started = Instant::now();
    assert_eq!(cluster.stop().await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drained at once, not at the 60 s deadline"
    );
}

/// Item 10: a worker flooding heartbeats drove the master to 560 MB and made `status`
/// time out. Inbound work per worker is bounded now, and a flooding worker is dropped.
/// Item 11: 200 control clients sending 1 MiB lines each held 217 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_leave_the_master_small_and_answering() {
    let dir = std::env::temp_dir().join(format!("rr-flood-{}", std::process::id()));
    // Left over by an earlier run that had our pid (a container's pids repeat).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let control = dir.join("ctl.sock");
    let c = control.to_str().expect("utf8").to_owned();
    let mut master = tokio::task::spawn_blocking(move || {
        MasterProcess::start(&[], MASTER, &["--control", &c], 1, WORKER, &["--flood"])
    })
    .await
    .expect("join");
    let pid = master.pid();
    // Control clients that send a megabyte each, without a newline.
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let path = control.clone();
        clients.spawn(async move {
            if let Ok(mut s) = tokio::net::UnixStream::connect(&path).await {
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..16 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            }
        });
    }
    let mut peak = 0;
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(pid));
        let asked = Instant::now();
        // v0.1 did not answer at all; 5 s leaves room for a loaded 2-core machine
        // (the slowest answer is printed).
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            rr_cluster::control::request(&control, &Request::Status),
        )
        .await;
        slowest = slowest.max(asked.elapsed());
        assert!(
            matches!(answer, Ok(Ok(Response::Status(_)))),
            "status within 5 s during the floods: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while clients.join_next().await.is_some() {}
    println!("master RSS peak {peak} KiB, slowest status {slowest:?} during the floods");
    assert!(peak < 32 * 1024, "master RSS {peak} KiB");
    // The flooding worker was dropped (and, being a ready worker, replaced).
    let line = master.line_matching(|l| l.starts_with("event closed"));
    assert!(line.starts_with("event closed 0"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 12: a worker that heartbeats but never reads its channel swallowed connections
/// until its socket buffer filled and was never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_reads_its_channel_is_stalled_then_replaced() {
    let b = builder(WORKER.as_ref(), &["--no-read"], 1)
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Some(Duration::from_secs(2)));
    let mut cluster = start_cluster(b).await;
    let s = cluster.wait_ready(1).await;
    let first = s.workers[0].id;
    let addr = cluster.addr;
    // One connection it will never take.
    let _pending = tokio::net::TcpStream::connect(addr).await.expect("connect");
    cluster
        .next_event(|e| matches!(e, Event::WorkerStalled { id, .. } if *id == first).then_some(()))
        .await;
    let reason = cluster
        .next_event(|e| match e {
            Event::WorkerHung { id, reason, .. } if *id == first => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("stopped reading its channel"), "{reason}");
    cluster
        .next_event(|e| matches!(e, Event::WorkerSpawned { id, .. } if *id != first).then_some(()))
        .await;
    cluster.handle.stop(StopMode::Now).await.expect("stop");
}

/// Item 12: with `on_give_up = keep` and no worker left, connections were accepted and
/// left hanging. The listener refuses them now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_worker_left_after_a_give_up_connections_are_refused() {
    // A port of its own (the listener must come back on it after the pause), found
    // free by a probe: a parallel test may bind it between the probe and the master,
    // and the master then exits (address in use): try another.
    let mut master = tokio::task::spawn_blocking(move || {
        let mut tried = Vec::new();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let p = port.to_string();
            match MasterProcess::try_spawn(
                &[],
                MASTER,
                &["--keep", "--limit", "1", "--port", &p],
                1,
                WORKER,
                &["--crash-at-start", "3"],
            ) {
                Ok(m) => return m,
                Err(e) => tried.push(format!("port {port}: {e}")),
            }
        }
        panic!("no master could listen: {tried:?}");
    })
    .await
    .expect("join");
    let addr = master.addr;
    let paused = tokio::task::spawn_blocking(move || {
        master.line_matching(|l| l.starts_with("event give-up"));
        master.line_matching(|l| l == "event paused true 0");
        master
    })
    .await
    .expect("join");
    // The accept loop pauses the listener right after the event: wait for it (bounded).
    // An attempt that races the pause itself (SYN answered, then the listener closed)
    // is reset: it fails at once too, and the next attempt must be refused.
    let mut refused = None;
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                refused = Some(e.kind());
            }
            Err(e) => {
                refused = Some(e.kind());
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(
        refused,
        Some(std::io::ErrorKind::ConnectionRefused),
        "refused while no worker can serve"
    );
    assert!(alive(paused.pid()), "keep: the master stays up");
}

/// A worker that died unplanned (killed, crashed) left its channel's descriptor open in
/// the master, with a task that waited for ever: one descriptor per death, until the
/// master's accepts failed with EMFILE.
#[test]
fn workers_that_die_over_and_over_leave_no_descriptor_in_the_master() {
    fn open_fds(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count()
    }
    let mut master = MasterProcess::start(&[], MASTER, &["--limit", "1000"], 1, WORKER, &[]);
    let pid = master.pid();
    let mut worker = master.workers[0];
    let before = open_fds(pid);
    const DEATHS: usize = 20;
    for _ in 0..DEATHS {
        // The master's child, not yet reaped: the pid is still the worker's.
        assert_eq!(
            rr_cluster_tests::parent_of(worker),
            Some(pid),
            "the worker is alive"
        );
        rr_cluster_tests::kill(worker);
        let line = master.line_matching(|l| l.starts_with("ready "));
        worker = line
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .expect("pid");
    }
    // The last replacement's channel may still be settling: wait (bounded) for the
    // count to come back to where it was.
    let mut after = open_fds(pid);
    for _ in 0..200 {
        if after <= before + 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        after = open_fds(pid);
    }
    println!("master descriptors: {before} before, {after} after {DEATHS} worker deaths");
    assert!(
        after <= before + 2,
        "the master had {before} descriptors open, {after} after {DEATHS} workers died"
    );
}

/// What workers write as they leave reaches the master's output: the master used to
/// exit once the last worker had, with lines still in the pipes and its queue.
#[test]
fn the_last_lines_workers_write_reach_the_output_when_the_master_stops() {
    const LINES: usize = 2000;
    let mut master = MasterProcess::start(
        &[],
        MASTER,
        &[],
        2,
        WORKER,
        &["--last-words", &LINES.to_string()],
    );
    let workers = master.workers.clone();
    rr_cluster_tests::signal(master.pid(), rustix::process::Signal::TERM);
    let rest = master.rest_of_output(WAIT);
    assert_eq!(master.wait_exit(WAIT), Some(0), "a graceful stop");
    for pid in workers {
        let said = rest
            .iter()
            .filter(|l| l.contains(&format!("pid {pid}]")) && l.contains("last words"))
            .count();
        assert_eq!(
            said, LINES,
            "worker {pid}: {said} of its {LINES} last lines"
        );
    }
}

/// A control client that sends requests and never reads the answers blocked its
/// session in a write for ever, and the master's exit with it.
#[test]
fn a_control_client_that_never_reads_does_not_keep_the_master_from_exiting() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("rr-noread-{}", std::process::id()));
    // Left over by an earlier run that had our pid (a container's pids repeat).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let control = dir.join("ctl.sock");
    let c = control.to_str().expect("utf8").to_owned();
    let mut master = MasterProcess::start(&[], MASTER, &["--control", &c], 1, WORKER, &[]);
    let mut client = std::os::unix::net::UnixStream::connect(&control).expect("connect");
    client
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // Requests until the master's answers fill both socket buffers and it stops
    // reading (our writes then time out): its session is stuck in a write.
    let mut sent = 0;
    while sent < 200_000 && client.write_all(b"{\"cmd\":\"status\"}\n").is_ok() {
        sent += 1;
    }
    assert!(sent < 200_000, "the master stopped reading at some point");
    signal(master.pid(), rustix::process::Signal::TERM);
    let code = master.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "the master exits (it waited for the stuck session for ever)"
    );
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}
