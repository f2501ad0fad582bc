//! Helpers for the end-to-end tests: start a real master (in the test process) with
//! real worker processes on 127.0.0.1 port 0, watch its events, talk to its workers,
//! and kill every process it spawned, by pid, when the test ends.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rr_cluster::control::{Status, WorkerState};
use rr_cluster::{Event, MasterBuilder, MasterHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The default bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running master and what it spawned.
#[derive(Debug)]
pub struct Cluster {
    /// The master.
    pub handle: MasterHandle,
    /// Its TCP address.
    pub addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    pids: Arc<Mutex<HashSet<u32>>>,
}

/// Starts `builder` listening on 127.0.0.1:0 (unless it listens somewhere already) with
/// short timeouts suited to tests.
pub async fn start_cluster(builder: MasterBuilder) -> Cluster {
    let master = builder.build().expect("valid master configuration");
    let mut events = master.events();
    let pids = Arc::new(Mutex::new(HashSet::new()));
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::clone(&pids);
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Event::WorkerSpawned { pid, .. } | Event::WorkerReady { pid, .. } =
                        &event
                    {
                        lock(&seen).insert(*pid);
                    }
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("test lagged {n} events");
                }
                Err(_) => return,
            }
        }
    });
    let handle = master.start().await.expect("master starts");
    let addr = handle.tcp_addr().expect("a TCP listener");
    Cluster {
        handle,
        addr,
        events: rx,
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
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("event in time")
                .expect("event stream open");
            if let Some(t) = pick(&event) {
                return t;
            }
        }
    }

    /// Every event received so far that `pick` accepts, without waiting.
    pub fn drain_events<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if let Some(t) = pick(&event) {
                out.push(t);
            }
        }
        out
    }

    /// Sends one command line to a worker over a new connection; the answer.
    pub async fn ask(&self, command: &str) -> String {
        ask(self.addr, command).await
    }

    /// Stops the master gracefully and waits for its exit code.
    pub async fn stop(&self) -> i32 {
        self.handle.stop(true).await.expect("stop");
        tokio::time::timeout(WAIT, self.handle.wait())
            .await
            .expect("master stops in time")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in lock(&self.pids).iter() {
            kill(*pid);
        }
    }
}

/// Sends `command` and a newline on a new connection to `addr`; reads the answer
/// until the worker closes (bounded by [`WAIT`]).
pub async fn ask(addr: SocketAddr, command: &str) -> String {
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
        .expect("exchange")
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
