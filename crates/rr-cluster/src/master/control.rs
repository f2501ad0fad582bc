//! The control socket server: JSON lines in, JSON lines out (see [`crate::control`]).
//!
//! Hardened against its clients: the socket is created with mode 0600 (no window
//! after `bind`), only the same user or root may talk (`SO_PEERCRED`), at most
//! [`MAX_CLIENTS`] connections at once, requests of at most [`MAX_REQUEST`] bytes, an
//! idle connection is closed after [`IDLE_TIMEOUT`], and one whose client does not read
//! its answer after [`WRITE_TIMEOUT`]. Only a dead socket file is ever replaced at the
//! path.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::command::{Command, Outcome, Refusal, ScaleTo, StopMode};
use crate::control::{IDLE_TIMEOUT, MAX_CLIENTS, MAX_REQUEST, Request, Response, WRITE_TIMEOUT};
use crate::sys;

/// Binds the control socket, mode 0600 from the start. A stale socket file (nobody
/// answers) is replaced; a live one means another master runs there; any other file
/// is left alone and is an error. The default directory `/tmp/rr-cluster-<uid>` is
/// created 0700, and refused when another user owns it or others may write to it.
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir == crate::control::private_dir() {
            private_dir(dir)?;
        }
    }
    super::listen::clear_stale_socket(path, "another master is running there")?;
    let fd = sys::bind_private_unix(path)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != sys::getuid() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of this user that only it can write to",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Serves requests until `stop`, then removes the socket file and cancels `closed`.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
    closed: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let me = sys::getuid();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            },
        };
        let allowed = sys::peer_uid(&stream)
            .map(|uid| uid == me || uid == 0)
            .unwrap_or(false);
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(
                stream,
                Response::Busy {
                    message: "too many control connections; try again".into(),
                },
            )
            .await;
            continue;
        };
        if !allowed {
            refuse(
                stream,
                Response::Error {
                    message: "permission denied: not the master's user".into(),
                },
            )
            .await;
            continue;
        }
        let commands = commands.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = session(stream, commands, stop).await {
                tracing::debug!(error = %e, "control session ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    closed.cancel();
}

/// One error line, then close; bounded so that a stuck client cannot hold us.
async fn refuse(mut stream: UnixStream, resp: Response) {
    if let Ok(mut bytes) = serde_json::to_vec(&resp) {
        bytes.push(b'\n');
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&bytes)).await;
    }
}

async fn session(
    stream: UnixStream,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(MAX_REQUEST + 1, read);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            read = tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)) => read,
        };
        let n = match read {
            Err(_) => {
                write_line(&mut write, &error("idle for too long; closing")).await?;
                return Ok(());
            }
            Ok(n) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n > MAX_REQUEST {
            let resp = error(&format!("request longer than {MAX_REQUEST} bytes"));
            write_line(&mut write, &resp).await?;
            return Ok(());
        }
        let resp = match std::str::from_utf8(&line) {
            Err(_) => error("invalid request: not UTF-8"),
            Ok(text) => match serde_json::from_str::<Request>(text.trim()) {
                Ok(req) => answer(req, &commands).await,
                Err(e) => error(&format!("invalid request: {e}")),
            },
        };
        write_line(&mut write, &resp).await?;
    }
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_owned(),
    }
}

async fn answer(req: Request, commands: &mpsc::Sender<Command>) -> Response {
    let stopped = || error("the master is stopping");
    let outcome = |r: Result<Outcome, Refusal>| match r {
        Ok(o) => Response::Ok {
            message: o.to_string(),
        },
        Err(refusal) => error(&refusal.to_string()),
    };
    match req {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_err() {
                return stopped();
            }
            rx.await.map(Response::Status).unwrap_or_else(|_| stopped())
        }
        Request::Reload { wait } => {
            let (reply, rx) = oneshot::channel();
            if commands
                .send(Command::Reload { wait, reply })
                .await
                .is_err()
            {
                return stopped();
            }
            rx.await.map(outcome).unwrap_or_else(|_| stopped())
        }
        Request::Scale { workers, by } => {
            let to = match (workers, by) {
                (Some(n), None) => ScaleTo::Exactly(n),
                (None, Some(by)) => ScaleTo::By(by),
                _ => return error("scale needs exactly one of \"workers\" and \"by\""),
            };
            let (reply, rx) = oneshot::channel();
            if commands.send(Command::Scale { to, reply }).await.is_err() {
                return stopped();
            }
            rx.await.map(outcome).unwrap_or_else(|_| stopped())
        }
        Request::Stop { now, wait } => {
            let mode = if now {
                StopMode::Now
            } else {
                StopMode::Graceful
            };
            let (tx, rx) = oneshot::channel();
            let sent = commands
                .send(Command::Stop {
                    mode,
                    wait: wait.then_some(tx),
                })
                .await;
            if sent.is_err() {
                return stopped();
            }
            if wait {
                return match rx.await {
                    Ok(code) => Response::Stopped {
                        message: Outcome::Stopped { code }.to_string(),
                        code,
                    },
                    Err(_) => stopped(),
                };
            }
            outcome(Ok(Outcome::Stopping {
                graceful: mode == StopMode::Graceful,
            }))
        }
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(io::Error::other)?;
    bytes.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read"))?
}
