//! The control protocol: requests to a running master and its answers, plus a client.
//!
//! The master listens on a Unix stream socket (mode 0600). Each request is one line of
//! JSON, answered by one line of JSON; the connection may carry several in turn:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"result":"status","master_pid":4242,"generation":0,"workers":[...],...}
//! -> {"cmd":"scale","workers":4}
//! <- {"result":"ok","message":"scaling from 2 to 4 workers"}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The longest request or response line accepted, in bytes.
pub const MAX_LINE: usize = 1024 * 1024;

/// A command for the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The pool's state.
    Status,
    /// Re-read the configuration file (if any) and roll every worker over.
    Reload,
    /// Run `workers` workers from now on.
    Scale {
        /// The new number of workers.
        workers: usize,
    },
    /// Stop the master: gracefully (drain) or, with `now`, at once.
    Stop {
        /// Kill the workers instead of draining them.
        #[serde(default)]
        now: bool,
    },
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
}

/// A snapshot of the pool. (`Default`: an empty pool, handy in tests.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The listening addresses.
    pub listeners: Vec<String>,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Accepted connections waiting for an eligible worker.
    pub queued: usize,
    /// Unstable restarts (a worker that never became ready, or was ready for less than
    /// `min_uptime`) in the current window: the count the give-up limit applies to.
    pub restarts_in_window: usize,
    /// Milliseconds since the master started.
    pub uptime_ms: u64,
    /// Every worker process the master holds (including draining ones) and every slot
    /// waiting for a restart, by slot.
    pub workers: Vec<WorkerStatus>,
}

/// One worker (or a slot waiting for its next worker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A worker's lifecycle state, as reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, handshake or start-up in progress.
    Starting,
    /// Taking connections.
    Ready,
    /// Asked to finish its connections and exit (reload, scale down, stop).
    Draining,
    /// Announced it is going down; already replaced.
    Leaving,
    /// Missed its heartbeat; killed, waiting for the exit.
    Hung,
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
}

/// Sends one request to the master listening at `path` and returns its answer.
pub async fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let timeout = Duration::from_secs(10);
    tokio::time::timeout(timeout, request_inner(path, req))
        .await
        .map_err(|_| ControlError::Timeout(timeout))?
}

async fn request_inner(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    let n = (&mut reader)
        .take(MAX_LINE as u64)
        .read_line(&mut answer)
        .await?;
    if n == 0 {
        return Err(ControlError::BadResponse(
            "connection closed without an answer".into(),
        ));
    }
    serde_json::from_str(answer.trim_end()).map_err(|e| ControlError::BadResponse(e.to_string()))
}

/// Where a master puts its control socket when none is configured:
/// `$XDG_RUNTIME_DIR/rr-cluster.sock`, or `/tmp/rr-cluster-<uid>.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("rr-cluster.sock"),
        _ => PathBuf::from(format!("/tmp/rr-cluster-{}.sock", current_uid())),
    }
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of our own /proc entry is our uid; avoids a libc call here.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 4 }).expect("json"),
            r#"{"cmd":"scale","workers":4}"#
        );
        let stop: Request = serde_json::from_str(r#"{"cmd":"stop"}"#).expect("json");
        assert_eq!(stop, Request::Stop { now: false });
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
