//! The control socket server: JSON lines in, JSON lines out (see [`crate::control`]).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::driver::Command;
use crate::control::{MAX_LINE, Request, Response};

/// Binds the control socket with mode 0600. A stale socket file (nobody answers) is
/// replaced; a live one means another master runs there.
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    super::listen::clear_stale_socket(path, "another master is running there")?;
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Serves requests until `stop`, then removes the socket file.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let commands = commands.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            result = session(stream, commands) => {
                                if let Err(e) = result {
                                    tracing::debug!(error = %e, "control session ended");
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

async fn session(stream: UnixStream, commands: mpsc::Sender<Command>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE as u64 {
            let resp = Response::Error {
                message: format!("request longer than {MAX_LINE} bytes"),
            };
            write_line(&mut write, &resp).await?;
            return Ok(());
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => answer(req, &commands).await,
            Err(e) => Response::Error {
                message: format!("invalid request: {e}"),
            },
        };
        write_line(&mut write, &resp).await?;
    }
}

async fn answer(req: Request, commands: &mpsc::Sender<Command>) -> Response {
    let stopped = || Response::Error {
        message: "the master is stopping".into(),
    };
    let outcome = |r: Result<String, String>| match r {
        Ok(message) => Response::Ok { message },
        Err(message) => Response::Error { message },
    };
    match req {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_err() {
                return stopped();
            }
            rx.await.map(Response::Status).unwrap_or_else(|_| stopped())
        }
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Reload(tx)).await.is_err() {
                return stopped();
            }
            rx.await.map(outcome).unwrap_or_else(|_| stopped())
        }
        Request::Scale { workers } => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Scale(workers, tx)).await.is_err() {
                return stopped();
            }
            rx.await.map(outcome).unwrap_or_else(|_| stopped())
        }
        Request::Stop { now } => {
            if commands
                .send(Command::Stop { graceful: !now })
                .await
                .is_err()
            {
                return stopped();
            }
            Response::Ok {
                message: if now {
                    "stopping now".into()
                } else {
                    "stopping: draining workers".into()
                },
            }
        }
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}
