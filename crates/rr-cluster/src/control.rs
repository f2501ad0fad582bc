//! The control protocol: requests to a running master and its answers, plus a client.
//!
//! The master listens on a Unix stream socket (mode 0600, created so; only the same
//! user or root may talk to it, checked with `SO_PEERCRED`). Each request is one line
//! of JSON (at most [`MAX_REQUEST`] bytes), answered by one line of JSON; the
//! connection may carry several in turn, and is closed after
//! [`IDLE_TIMEOUT`] without a request:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"result":"status","master_pid":4242,"generation":0,"workers":[...],...}
//! -> {"cmd":"scale","workers":4}
//! <- {"result":"ok","message":"scaling from 2 to 4 workers"}
//! ```
//!
//! A master already serving [`MAX_CLIENTS`] connections answers a new one with
//! `{"result":"busy","message":"..."}` and closes it, before reading any request: the
//! client tries again. [`request`] does, within its timeout, as it does while the
//! socket's listen backlog is full.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The longest response line a client accepts, in bytes.
pub const MAX_LINE: usize = 16 * 1024 * 1024;
/// The longest request line a master accepts, in bytes.
pub const MAX_REQUEST: usize = 4096;
/// Control connections a master serves at once; more are answered [`Response::Busy`].
pub const MAX_CLIENTS: usize = 64;
/// A control connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A control connection whose client does not take an answer for this long is closed
/// (it would hold its slot, and the master's exit, for ever).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A command for the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The pool's state.
    Status,
    /// Re-read the configuration file (if any) and roll every worker over.
    Reload {
        /// Answer when the reload finished (or failed), not when it began.
        #[serde(default, skip_serializing_if = "is_false")]
        wait: bool,
    },
    /// Run `workers` workers from now on, or `by` more (fewer when negative).
    Scale {
        /// The new number of workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workers: Option<usize>,
        /// A change in the number of workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<i64>,
    },
    /// Stop the master: gracefully (drain) or, with `now`, at once.
    Stop {
        /// Kill the workers instead of draining them.
        #[serde(default, skip_serializing_if = "is_false")]
        now: bool,
        /// Answer once the master has stopped, with its exit code.
        #[serde(default, skip_serializing_if = "is_false")]
        wait: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The master's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(Status),
    /// The command was accepted.
    Ok {
        /// What the master is doing about it.
        message: String,
    },
    /// The command was refused.
    Error {
        /// Why.
        message: String,
    },
    /// The master serves too many control connections to take this one: try again.
    /// It read no request.
    Busy {
        /// What the master said.
        message: String,
    },
    /// Answer to [`Request::Stop`] with `wait`: the master has stopped (its control
    /// socket is gone), with this exit code (1 after a give-up).
    Stopped {
        /// What the master said.
        message: String,
        /// The master's exit code.
        code: i32,
    },
}

/// A snapshot of the pool. (`Default`: an empty pool, handy in tests.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The master's process id.
    pub master_pid: u32,
    /// How many reloads the pool has been through.
    pub generation: u64,
    /// The number of workers the master keeps.
    pub target_workers: usize,
    /// A rolling reload is in progress.
    pub reloading: bool,
    /// The restart limit was hit (`GiveUp`); dead workers are not restarted.
    pub gave_up: bool,
    /// The master is shutting down.
    pub stopping: bool,
    /// The listeners refuse connections: the master gave up and no worker is left.
    pub paused: bool,
    /// How connections are spread (`round-robin`, `least-connections`, `client-ip`,
    /// `shared`).
    pub balance: String,
    /// The workers' protocol (`binary` or `node`).
    pub protocol: String,
    /// The listening addresses.
    pub listeners: Vec<String>,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Accepted connections waiting for an eligible worker.
    pub queued: usize,
    /// Connections accepted per second, over the last sampling period (about a second).
    pub connections_per_sec: f64,
    /// The master's own CPU use, percent of one core.
    pub master_cpu_percent: Option<f64>,
    /// The master's resident memory, bytes.
    pub master_rss_bytes: Option<u64>,
    /// Boot failures (workers that never became ready) in the current window: the
    /// count the give-up limit applies to.
    pub restarts_in_window: usize,
    /// Milliseconds since the master started.
    pub uptime_ms: u64,
    /// Every worker process the master holds (including draining ones) and every slot
    /// waiting for a restart, by slot.
    pub workers: Vec<WorkerStatus>,
}

/// One worker (or a slot waiting for its next worker).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerStatus {
    /// The slot, `0..N`.
    pub slot: u32,
    /// Unique id of this worker process within the master (0 for a slot with none).
    pub id: u64,
    /// Process id; `None` while the slot waits for a restart.
    pub pid: Option<u32>,
    /// Lifecycle state.
    pub state: WorkerState,
    /// The pool generation this worker was started in.
    pub generation: u64,
    /// Milliseconds since the worker was spawned.
    pub uptime_ms: u64,
    /// Connections the master handed to this worker.
    pub dispatched: u64,
    /// Connections open in the worker at its last heartbeat.
    pub active: u32,
    /// Restarts of this slot since the master started.
    pub restarts: u32,
    /// CPU use, percent of one core, over the last sampling period (about a second).
    pub cpu_percent: Option<f64>,
    /// CPU time used since the worker started, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident memory, bytes.
    pub rss_bytes: Option<u64>,
    /// Connections handed to it per second, over the last sampling period.
    pub connections_per_sec: f64,
    /// Connections the kernel dropped on their way to it (its descriptor table was
    /// full), as it reported.
    pub lost: u64,
}

/// A worker's lifecycle state, as reported by `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, handshake or start-up in progress.
    #[default]
    Starting,
    /// Taking connections.
    Ready,
    /// Ready, but out of rotation for now: its heartbeat is late, or it does not take
    /// the connections sent to it. Killed if it stays so for the heartbeat timeout.
    Stalled,
    /// Asked to finish its connections and exit (reload, scale down, stop).
    Draining,
    /// Announced it is going down; already replaced.
    Leaving,
    /// Unresponsive (no heartbeat, or not reading its channel); killed, waiting for
    /// the exit.
    Hung,
    /// Its channel closed or broke the protocol; killed unless it exits by itself
    /// within a second.
    Lost,
    /// Waiting out the backoff before a restart (no process).
    Backoff,
    /// Not restarted: the master gave up on this slot (no process).
    Stopped,
}

impl WorkerState {
    /// The lowercase name used in `status` output.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stalled => "stalled",
            WorkerState::Lost => "lost",
            WorkerState::Draining => "draining",
            WorkerState::Leaving => "leaving",
            WorkerState::Hung => "hung",
            WorkerState::Backoff => "backoff",
            WorkerState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No master listens on the path.
    #[error("cannot reach a master at {path}: {source}")]
    Connect {
        /// The control socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The master's answer was not valid.
    #[error("bad answer from the master: {0}")]
    BadResponse(String),
    /// The master did not answer in time.
    #[error("the master did not answer within {0:?}")]
    Timeout(Duration),
    /// The socket is served by another user (not this user, not root).
    #[error("refusing to talk to {path}: it is served by uid {uid}, not by this user or root")]
    NotOurs {
        /// The control socket path.
        path: PathBuf,
        /// The uid of the process serving it.
        uid: u32,
    },
}

/// Sends one request to the master listening at `path` and returns its answer
/// (within 10 s).
pub async fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    request_within(path, req, Duration::from_secs(10)).await
}

/// Sends one request and waits at most `timeout` for the answer (a `reload` or `stop`
/// that waits for completion takes as long as the pool does). A master too busy to
/// take the connection (a full listen backlog, or [`Response::Busy`]) is asked again,
/// shortly, until `timeout`; then its last `Busy` answer is returned.
pub async fn request_within(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    // Saturating: a caller's timeout may be any duration.
    let deadline = tokio::time::Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| tokio::time::Instant::now() + crate::config::MAX_DURATION);
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = tokio::time::timeout_at(deadline, request_inner(path, req))
            .await
            .map_err(|_| ControlError::Timeout(timeout))?;
        match &attempt {
            // A Unix socket whose listen backlog is full refuses `connect` with
            // EAGAIN (TCP would wait): nothing was sent.
            Err(ControlError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(Response::Busy { .. }) => {}
            _ => return attempt,
        }
        if tokio::time::Instant::now() + pause >= deadline {
            return match attempt {
                Err(ControlError::Connect { .. }) => Err(ControlError::Timeout(timeout)),
                other => other,
            };
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn request_inner(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    // A socket squatted by another user must not get our commands.
    let uid = crate::sys::peer_uid(&stream)?;
    if uid != 0 && uid != crate::sys::getuid() {
        return Err(ControlError::NotOurs {
            path: path.to_owned(),
            uid,
        });
    }
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    // A master that refuses us writes why and closes: read that answer even when our
    // request could not be written.
    let written = write.write_all(&line).await;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    let n = (&mut reader)
        .take(MAX_LINE as u64)
        .read_line(&mut answer)
        .await?;
    if n == 0 {
        written?;
        return Err(ControlError::BadResponse(
            "connection closed without an answer".into(),
        ));
    }
    serde_json::from_str(answer.trim_end()).map_err(|e| ControlError::BadResponse(e.to_string()))
}

/// Where a master puts its control socket when none is configured:
/// `$XDG_RUNTIME_DIR/rr-cluster.sock`, or `/tmp/rr-cluster-<uid>/control.sock` (the
/// master creates that directory with mode 0700 and refuses one that another user
/// owns or others can write to).
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("rr-cluster.sock"),
        _ => private_dir().join("control.sock"),
    }
}

/// `/tmp/rr-cluster-<uid>`.
pub(crate) fn private_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/rr-cluster-{}", crate::sys::getuid()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A control socket whose backlog is full (the master busy with a flood of
    /// clients) answers `connect` with `EAGAIN`: the request waits its turn instead of
    /// failing.
    #[tokio::test]
    async fn a_request_waits_while_the_backlog_is_full() {
        let dir = std::env::temp_dir().join(format!("rr-ctl-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(
            crate::sys::bind_private_unix(&path).expect("bind"),
        ))
        .expect("listener");
        // Fill the backlog.
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..1_000 {
            match UnixStream::connect(&path).await {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    full = true;
                    break;
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
        assert!(full, "the backlog filled after {} clients", fillers.len());
        let mut asking = std::pin::pin!(request_within(
            &path,
            &Request::Status,
            Duration::from_secs(10)
        ));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(asking.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "waits while the backlog is full: {first:?}"
        );
        // The "master" takes the fillers (gone by now), then the request.
        drop(fillers);
        let serve = async {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = BufReader::new(read);
                match tokio::time::timeout(Duration::from_millis(20), reader.read_line(&mut line))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => {
                        assert_eq!(line.trim_end(), r#"{"cmd":"status"}"#);
                        let ok = Response::Ok {
                            message: "seen".into(),
                        };
                        let mut answer = serde_json::to_vec(&ok).expect("json");
                        answer.push(b'\n');
                        write.write_all(&answer).await.expect("answer");
                        return;
                    }
                    _ => continue,
                }
            }
        };
        let (served, answer) =
            tokio::join!(tokio::time::timeout(Duration::from_secs(30), serve), asking);
        served.expect("the request arrived");
        let answer = answer.expect("answered");
        assert_eq!(
            answer,
            Response::Ok {
                message: "seen".into()
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake master at a fresh path: answers the first `busy` connections with
    /// `Busy` (reading nothing, as the master does), then answers requests `Ok`.
    /// Returns the path and the number of connections it took.
    fn busy_master(
        name: &str,
        busy: usize,
    ) -> (
        PathBuf,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let dir = std::env::temp_dir().join(format!("rr-ctl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&taken);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (read, mut write) = stream.into_split();
                let answer = if n < busy {
                    Response::Busy {
                        message: "too many control connections; try again".into(),
                    }
                } else {
                    let mut line = String::new();
                    let _ = BufReader::new(read).read_line(&mut line).await;
                    Response::Ok {
                        message: format!("got {}", line.trim_end()),
                    }
                };
                let mut bytes = serde_json::to_vec(&answer).expect("json");
                bytes.push(b'\n');
                let _ = write.write_all(&bytes).await;
            }
        });
        (path, server, taken)
    }

    #[tokio::test]
    async fn a_busy_master_is_asked_again() {
        let (path, server, taken) = busy_master("busy-twice", 2);
        let answer = request_within(&path, &Request::Status, Duration::from_secs(10)).await;
        assert_eq!(
            answer.expect("answered"),
            Response::Ok {
                message: r#"got {"cmd":"status"}"#.into()
            }
        );
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 3);
        server.abort();
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn a_master_busy_throughout_gives_its_busy_answer_at_the_timeout() {
        let (path, server, taken) = busy_master("busy-always", usize::MAX);
        let answer = request_within(&path, &Request::Status, Duration::from_millis(300)).await;
        assert!(
            matches!(answer, Ok(Response::Busy { .. })),
            "the last answer: {answer:?}"
        );
        assert!(
            taken.load(std::sync::atomic::Ordering::SeqCst) >= 2,
            "asked again"
        );
        server.abort();
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Busy {
                message: "try again".into()
            })
            .expect("json"),
            r#"{"result":"busy","message":"try again"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Scale {
                workers: Some(4),
                by: None
            })
            .expect("json"),
            r#"{"cmd":"scale","workers":4}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Scale {
                workers: None,
                by: Some(-1)
            })
            .expect("json"),
            r#"{"cmd":"scale","by":-1}"#
        );
        let stop: Request = serde_json::from_str(r#"{"cmd":"stop"}"#).expect("json");
        assert_eq!(
            stop,
            Request::Stop {
                now: false,
                wait: false
            }
        );
        let reload: Request = serde_json::from_str(r#"{"cmd":"reload"}"#).expect("json");
        assert_eq!(reload, Request::Reload { wait: false });
        let ok = Response::Ok {
            message: "fine".into(),
        };
        assert_eq!(
            serde_json::to_string(&ok).expect("json"),
            r#"{"result":"ok","message":"fine"}"#
        );
        assert_eq!(
            serde_json::to_string(&WorkerState::Backoff).expect("json"),
            r#""backoff""#
        );
    }
}
