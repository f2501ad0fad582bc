//! Helpers for the end-to-end tests: start a real master (in the test process) with
//! real worker processes on 127.0.0.1 port 0, watch its events, talk to its workers,
//! and kill what it spawned when the test ends.
//!
//! Teardown kills only the processes the master spawned: each worker is signalled
//! through a pidfd opened when its `WorkerSpawned` event arrived, so a worker that has
//! exited since (and was reaped) is never mistaken for whatever process got its pid
//! next: the signal fails with `ESRCH` instead. Workers die with the master anyway:
//! the master forks them from one thread with `PR_SET_PDEATHSIG`, so when the test's
//! runtime drops the master, the kernel kills them.
//!
//! A test that needs a tool the machine may lack (python3, node, setpriv and root, ...)
//! says `SKIPPED` and returns through [`missing_tool`]; with `RR_REQUIRE_TOOLS=1` (CI
//! sets it) the same call fails the test instead, so a missing tool cannot pass
//! silently.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rr_cluster::control::{Status, WorkerState};
use rr_cluster::{Event, MasterBuilder, MasterHandle, StopMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

/// The default bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running master and what it spawned.
#[derive(Debug)]
pub struct Cluster {
    /// The master.
    pub handle: MasterHandle,
    /// Its TCP address.
    pub addr: SocketAddr,
    /// Read directly (no forwarding task): the master publishes synchronously, so an
    /// event published before a call returned is already here.
    events: broadcast::Receiver<Event>,
    pids: Arc<Spawned>,
}

/// The environment variable that turns a skip for a missing tool into a failure.
pub const REQUIRE_TOOLS: &str = "RR_REQUIRE_TOOLS";

/// Whether `RR_REQUIRE_TOOLS=1`: every tool a test needs must be there.
pub fn tools_required() -> bool {
    std::env::var_os(REQUIRE_TOOLS).is_some_and(|v| v == "1")
}

/// A test cannot run for want of `what` (a tool, or the privileges it needs): prints
/// `SKIPPED: what` so the caller can return, or, under `RR_REQUIRE_TOOLS=1`, fails the
/// test.
pub fn missing_tool(what: &str) {
    assert!(
        !tools_required(),
        "{what} ({REQUIRE_TOOLS}=1: a test may not skip for a missing tool)"
    );
    eprintln!("SKIPPED: {what}");
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (many systems start
/// tests at a soft 1024); returns the soft limit now in force (`u64::MAX`: none).
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return now.maximum.unwrap_or(u64::MAX);
        }
    }
    now.current.unwrap_or(u64::MAX)
}

/// The processes a master spawned, each held by a pidfd opened when its
/// `WorkerSpawned` event arrived: signalling one never reaches a process that got its
/// pid after it was reaped (the pidfd then refers to nothing and the signal fails).
/// Where pidfds are refused (a kernel before 5.3, a seccomp profile), the pid alone,
/// signalled only while it is a child of this process: the check the pidfd replaces.
#[derive(Debug, Default)]
pub struct Spawned {
    pidfds: Mutex<HashMap<u32, Option<OwnedFd>>>,
}

/// Sends `sig` through `fd`, or, without one, to `pid` while it is our child.
fn signal_tracked(pid: u32, fd: Option<&OwnedFd>, sig: rustix::process::Signal) -> bool {
    match fd {
        Some(fd) => rustix::process::pidfd_send_signal(fd, sig).is_ok(),
        None => {
            parent_of(pid) == Some(std::process::id())
                && rustix::process::Pid::from_raw(pid as i32)
                    .is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
        }
    }
}

impl Spawned {
    /// Starts tracking `pid` if it is a child of this process now (not yet reaped, so
    /// its pid is still its own); false when it is gone already.
    pub fn track(&self, pid: u32) -> bool {
        let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
            return false;
        };
        let fd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => None,
            Err(_) => return false, // gone already
        };
        // Checked once the pidfd holds the process: a child of ours, not a stranger
        // that got a reused pid before the event arrived.
        if parent_of(pid) != Some(std::process::id()) {
            return false;
        }
        lock(&self.pidfds).insert(pid, fd);
        true
    }

    /// Stops tracking `pid` (it exited).
    pub fn forget(&self, pid: u32) {
        lock(&self.pidfds).remove(&pid);
    }

    /// Whether `pid` is tracked.
    pub fn contains(&self, pid: u32) -> bool {
        lock(&self.pidfds).contains_key(&pid)
    }

    /// Sends `sig` to the tracked process `pid`; false when `pid` is not tracked or
    /// the process is gone.
    pub fn signal(&self, pid: u32, sig: rustix::process::Signal) -> bool {
        lock(&self.pidfds)
            .get(&pid)
            .is_some_and(|fd| signal_tracked(pid, fd.as_ref(), sig))
    }

    /// SIGKILLs every tracked process still alive.
    pub fn kill_all(&self) {
        for (pid, fd) in lock(&self.pidfds).iter() {
            signal_tracked(*pid, fd.as_ref(), rustix::process::Signal::KILL);
        }
    }
}

/// Starts `builder` listening on 127.0.0.1:0 (unless it listens somewhere already) with
/// short timeouts suited to tests.
pub async fn start_cluster(builder: MasterBuilder) -> Cluster {
    let master = builder.build().expect("valid master configuration");
    let events = master.events();
    // A second subscriber keeps the set of live worker pids for teardown, whether or
    // not the test reads events.
    let mut watch = master.events();
    let pids = Arc::new(Spawned::default());
    let seen = Arc::clone(&pids);
    tokio::spawn(async move {
        loop {
            match watch.recv().await {
                Ok(Event::WorkerSpawned { pid, .. }) => {
                    seen.track(pid);
                }
                Ok(Event::WorkerExited { pid, .. }) => {
                    seen.forget(pid);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("test lagged {n} events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let handle = master.start().await.expect("master starts");
    let addr = handle.tcp_addr().expect("a TCP listener");
    Cluster {
        handle,
        addr,
        events,
        pids,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A builder for `workers` workers of `program` with test-sized timeouts.
pub fn builder(program: &Path, args: &[&str], workers: usize) -> MasterBuilder {
    rr_cluster::Master::builder()
        .listen("127.0.0.1:0")
        .workers(workers)
        .command(rr_cluster::WorkerCommand::new(program).args(args))
        .ready_timeout(Duration::from_secs(10))
        .drain_timeout(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_millis(100))
        .heartbeat_timeout(Some(Duration::from_secs(5)))
        .min_uptime(Duration::from_millis(200))
}

/// `b` with heartbeats a minute apart and no heartbeat timeout, for tests that count
/// an exact round-robin split: with the 100 ms heartbeat of [`builder`], a heartbeat
/// late on a loaded machine (two intervals and 100 ms) takes its worker out of the
/// rotation for a moment, and the split is no longer exact.
pub fn slow_heartbeats(b: MasterBuilder) -> MasterBuilder {
    b.heartbeat_interval(Duration::from_secs(60))
        .heartbeat_timeout(None)
}

impl Cluster {
    /// Waits (bounded) until `n` workers are ready and no other worker process lives.
    pub async fn wait_ready(&self, n: usize) -> Status {
        for _ in 0..2000 {
            let status = self.handle.status().await.expect("status");
            let ready = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            if ready == n
                && status
                    .workers
                    .iter()
                    .all(|w| w.pid.is_none() || w.state == WorkerState::Ready)
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{n} workers not ready in time: {:?}",
            self.handle.status().await
        );
    }

    /// The next event that `pick` accepts (bounded by [`WAIT`]); others are skipped.
    pub async fn next_event<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("event in time")
            {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(n)) => panic!("test lagged {n} events"),
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            };
            if let Some(t) = pick(&event) {
                return t;
            }
        }
    }

    /// Every event received so far that `pick` accepts, without waiting.
    pub fn drain_events<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    if let Some(t) = pick(&event) {
                        out.push(t);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => panic!("test lagged {n} events"),
                Err(_) => break,
            }
        }
        out
    }

    /// Sends one command line to a worker over a new connection; the answer.
    pub async fn ask(&self, command: &str) -> String {
        ask(self.addr, command).await
    }

    /// SIGKILLs worker process `pid` through the pidfd taken when it was spawned:
    /// never another process that got the pid after the worker was reaped. Waits
    /// (bounded) for the spawn to be recorded; false if `pid` is not a worker of this
    /// master that is still alive.
    pub async fn kill_worker(&self, pid: u32) -> bool {
        let recorded = eventually(WAIT, || self.pids.contains(pid).then_some(())).await;
        recorded.is_some() && self.pids.signal(pid, rustix::process::Signal::KILL)
    }

    /// Stops the master gracefully and waits for its exit code.
    pub async fn stop(&self) -> i32 {
        self.handle.stop(StopMode::Graceful).await.expect("stop");
        tokio::time::timeout(WAIT, self.handle.wait())
            .await
            .expect("master stops in time")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pids.kill_all();
    }
}

/// The parent pid of a process, from /proc (`None` once it is reaped).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Polls `check` every 10 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(t) = check() {
            return Some(t);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `command` and a newline on a new connection to `addr`; reads the answer
/// until the worker closes (bounded by [`WAIT`]).
pub async fn ask(addr: SocketAddr, command: &str) -> String {
    try_ask(addr, command).await.expect("exchange")
}

/// [`ask`], with a failed exchange (a reset connection, say) as an error.
pub async fn try_ask(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("answer in time")
}

/// SIGKILL, ignoring a process that is already gone.
pub fn kill(pid: u32) {
    signal(pid, rustix::process::Signal::KILL);
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// True while `pid` runs (a zombie waiting to be reaped counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // pid (comm) S ...: the state follows the last ')'.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// A `test-master` process (see tests/bin/test-master.rs): killed on drop, which kills
/// its workers too (they die with their master).
#[derive(Debug)]
pub struct MasterProcess {
    /// The master process.
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Its listening address.
    pub addr: SocketAddr,
    /// Pids of the workers that became ready, in order.
    pub workers: Vec<u32>,
}

impl MasterProcess {
    /// Starts `test-master FLAGS WORKERS WORKER ARGS...` through `wrapper` (e.g.
    /// `setpriv ...`; empty for none) and waits until `workers` workers are ready.
    pub fn start(
        wrapper: &[&str],
        master: &str,
        flags: &[&str],
        workers: usize,
        worker: &str,
        worker_args: &[&str],
    ) -> MasterProcess {
        let mut m = Self::spawn(wrapper, master, flags, workers, worker, worker_args);
        while m.workers.len() < workers {
            let line = m.line_matching(|l| l.starts_with("ready "));
            let pid = line
                .split_whitespace()
                .nth(2)
                .and_then(|p| p.parse().ok())
                .expect("pid");
            m.workers.push(pid);
        }
        m
    }

    /// Like [`MasterProcess::start`], without waiting for any worker.
    pub fn spawn(
        wrapper: &[&str],
        master: &str,
        flags: &[&str],
        workers: usize,
        worker: &str,
        worker_args: &[&str],
    ) -> MasterProcess {
        Self::try_spawn(wrapper, master, flags, workers, worker, worker_args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`MasterProcess::spawn`]; an error when the master ends before it listens
    /// (its own error, an address in use say, is on stderr).
    pub fn try_spawn(
        wrapper: &[&str],
        master: &str,
        flags: &[&str],
        workers: usize,
        worker: &str,
        worker_args: &[&str],
    ) -> Result<MasterProcess, String> {
        use std::io::BufRead;
        let (program, pre) = match wrapper.split_first() {
            Some((p, rest)) => (
                *p,
                rest.iter()
                    .map(|s| s.to_string())
                    .chain([master.to_owned()])
                    .collect::<Vec<_>>(),
            ),
            None => (master, Vec::new()),
        };
        let mut child = std::process::Command::new(program)
            .args(pre)
            .args(flags)
            .arg(workers.to_string())
            .arg(worker)
            .args(worker_args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start test-master");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut m = MasterProcess {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: Vec::new(),
        };
        let first = m.try_line_matching(|l| l.starts_with("listening "))?;
        m.addr = first
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .expect("listening line");
        Ok(m)
    }

    /// The next stdout line that `pick` accepts (others are skipped), within [`WAIT`].
    pub fn line_matching(&mut self, pick: impl Fn(&str) -> bool) -> String {
        self.try_line_matching(pick)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`MasterProcess::line_matching`], with no such line (the master closed its
    /// stdout, or [`WAIT`] passed) as an error.
    pub fn try_line_matching(&mut self, pick: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pick(&line) => return Ok(line),
                Ok(_) => continue,
                Err(e) => return Err(format!("no matching line from test-master: {e}")),
            }
        }
    }

    /// Every stdout line still to come, until the master closes its stdout (or
    /// `within` passes).
    pub fn rest_of_output(&mut self, within: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + within;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(_) => return rest,
            }
        }
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the master to exit; its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        // Our child, not yet reaped: its pid is still its own.
        if let Ok(None) = self.child.try_wait() {
            kill(self.child.id());
        }
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("fields")
        .split_whitespace()
        .collect();
    // After "pid (comm)": utime and stime are the 12th and 13th fields.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Resident memory in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A minimal HTTP/1.1 client for load under reloads: `clients` connections, each
/// sending `GET /` in a loop (keep-alive, reconnecting when the server closes, or
/// `Connection: close` when `keepalive` is false) until `stop`. Returns (requests
/// answered 200, requests failed). A request fails when its connection breaks before
/// a full response (a reset, or an end of stream without an answer).
pub async fn http_load(
    addr: SocketAddr,
    clients: usize,
    keepalive: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let stop = Arc::clone(&stop);
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut conn: Option<tokio::io::BufReader<TcpStream>> = None;
            for _ in 0..10_000_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => match TcpStream::connect(addr).await {
                        Ok(s) => tokio::io::BufReader::new(s),
                        Err(_) => {
                            failed += 1;
                            continue;
                        }
                    },
                };
                let request: &[u8] = if keepalive {
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                } else {
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                };
                match tokio::time::timeout(WAIT, one_response(&mut c, request)).await {
                    Ok(Ok((200, close))) => {
                        ok += 1;
                        if keepalive && !close {
                            conn = Some(c);
                        }
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (o, f) = done.expect("client task");
        ok += o;
        failed += f;
    }
    (ok, failed)
}

/// Writes `request` and reads one response: (status, whether the server closes).
async fn one_response(
    c: &mut tokio::io::BufReader<TcpStream>,
    request: &[u8],
) -> std::io::Result<(u16, bool)> {
    use tokio::io::AsyncBufReadExt;
    c.get_mut().write_all(request).await?;
    let mut line = String::new();
    if c.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if c.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    c.read_exact(&mut body).await?;
    Ok((status, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Teardown used to check that a recorded pid was a child of ours, then kill it: a
    /// stale entry (its worker reaped, the exit event missed when the watcher lagged)
    /// whose pid another child of ours got next (another test's worker) passed the
    /// check and was killed. The pidfd taken at spawn refers to the reaped process
    /// only. Root makes the kernel hand the pid out again (`ns_last_pid`).
    #[test]
    fn a_tracked_pid_that_another_child_reuses_is_not_signalled() {
        use std::process::{Child, Command};
        fn sleeper() -> Child {
            Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep")
        }
        fn end(mut c: Child) {
            let _ = c.kill();
            let _ = c.wait();
        }
        const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
        let first = sleeper();
        let pid = first.id();
        let spawned = Spawned::default();
        assert!(spawned.track(pid), "a live child is tracked");
        // Reaped, but still recorded: the stale entry.
        end(first);
        let mut reused = None;
        for _ in 0..50 {
            if std::fs::write(LAST_PID, (pid - 1).to_string()).is_err() {
                // Not a tool CI can install: a container may keep /proc/sys read-only.
                eprintln!(
                    "SKIPPED: root and a writable {LAST_PID}, to make the kernel reuse a pid"
                );
                return;
            }
            let second = sleeper();
            if second.id() == pid {
                reused = Some(second);
                break;
            }
            // Another process took the pid first: try again.
            end(second);
        }
        let Some(mut second) = reused else {
            panic!("pid {pid} was never handed out again");
        };
        assert_eq!(parent_of(pid), Some(std::process::id()), "our child again");
        let signalled = spawned.signal(pid, rustix::process::Signal::KILL);
        spawned.kill_all();
        // A SIGKILL ends the process at once: watched for a moment (bounded).
        let mut killed = false;
        for _ in 0..20 {
            if !matches!(second.try_wait(), Ok(None)) {
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        end(second);
        assert!(
            !signalled,
            "the stale entry's signal reached the new process"
        );
        assert!(!killed, "the process that reused the pid was killed");
    }
}
