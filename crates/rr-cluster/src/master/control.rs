//! The control socket server: JSON lines in, JSON lines out (see [`crate::control`]).
//!
//! Hardened against its clients: the socket is created with mode 0600 (no window
//! after `bind`), only the same user or root may talk (`SO_PEERCRED`), at most
//! [`MAX_CLIENTS`] connections at once, requests of at most [`MAX_REQUEST`] bytes, an
//! idle connection is closed after [`IDLE_TIMEOUT`], and one whose client does not read
//! its answer after [`WRITE_TIMEOUT`]. Only a dead socket file is ever replaced at the
//! path, and at the end only the master's own file is removed from it. A request read
//! is always carried out, even if its client hangs up at once; a client that hangs up
//! while it waits for an answer that takes long (`reload` or `stop` with `wait`) gives
//! its connection slot back at once (within [`HANGUP_CHECK`] if it had shut down its
//! writing side first).

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

/// The control socket, bound at its path.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The identity of the file `bind` made at the path (`None` if it could not be
    /// read): the file removed at the end only if it is still this one.
    file: Option<FileId>,
}

/// What tells one file at a path from another that replaced it: the device and
/// inode, and the inode's change time (a file system such as ext4 readily gives a
/// just-freed inode number to the next file made, so a new master's socket at the
/// same path may have the inode ours had; its change time is its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

/// Binds the control socket, mode 0600 from the start. A stale socket file (nobody
/// answers) is replaced; a live one means another master runs there; any other file
/// is left alone and is an error. The default directory `/tmp/rr-cluster-<uid>` is
/// created 0700, and refused when another user owns it or others may write to it.
pub(crate) fn bind(path: &Path) -> io::Result<ControlSocket> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir == crate::control::private_dir() {
            private_dir(dir)?;
        }
    }
    super::listen::clear_stale_socket(path, "another master is running there")?;
    let fd = sys::bind_private_unix(path)?;
    let file = file_id(path);
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?;
    Ok(ControlSocket {
        listener,
        path: path.to_owned(),
        file,
    })
}

/// The identity of the file at `path` (not following a symlink).
fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Removes the socket file at `path` if it is still the one this master made: another
/// master may have replaced it meanwhile (after deleting ours), and its socket stays.
/// A file whose inode changed since (a `chmod` of our socket, say) is left too: a
/// socket file nobody answers at is replaced by the next master anyway.
fn remove_own_file(path: &Path, file: Option<FileId>) {
    if file.is_some() && file_id(path) == file {
        let _ = std::fs::remove_file(path);
    }
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

/// Serves requests until `stop`, then removes the socket file (if it is still its
/// own) and cancels `closed`.
pub(crate) async fn serve(
    socket: ControlSocket,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
    closed: CancellationToken,
    tasks: TaskTracker,
) {
    let ControlSocket {
        listener,
        path,
        file,
    } = socket;
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
    remove_own_file(&path, file);
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
                Ok(req) => match answer_unless_gone(req, &commands, &mut reader).await {
                    Some(resp) => resp,
                    None => return Ok(()), // the client hung up: nobody to answer
                },
                Err(e) => error(&format!("invalid request: {e}")),
            },
        };
        write_line(&mut write, &resp).await?;
    }
}

/// How often a session that waits for an answer, and can no longer learn of a
/// hang-up by reading (the client shut down its writing side, or sent its next
/// request already), asks whether the client is still there.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// The answer to `req`; `None` if the client hung up first. An answer waited for (a
/// `reload` or `stop` with `wait`) may take as long as the pool does: a client that
/// gave up meanwhile must not hold its connection slot (nor its place among the
/// waiters) until then. The request itself is always delivered: a hang-up is
/// watched for only once the command is queued (a `stop` sent by a client that
/// closes at once is carried out even while the driver's queue is full). A client
/// that only shut down its writing side still gets its answer, and so does one that
/// sent its next request already (after this answer); a hang-up of either is seen
/// within [`HANGUP_CHECK`].
async fn answer_unless_gone(
    req: Request,
    commands: &mpsc::Sender<Command>,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Option<Response> {
    use std::os::fd::AsFd;
    let pending = submit(req, commands).await;
    let reply = pending.reply();
    tokio::pin!(reply);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            resp = &mut reply => return Some(resp),
            read = reader.fill_buf(), if watching => match read {
                Ok([]) => {
                    if sys::peer_hung_up(reader.get_ref().as_ref().as_fd()) {
                        return None;
                    }
                    watching = false; // shut down for writing only: it still reads
                }
                Err(_) => return None,
                Ok(_) => watching = false, // a next request: read after this answer
            },
            // Reading tells nothing more now; a full close still shows as a hang-up.
            _ = tokio::time::sleep(HANGUP_CHECK), if !watching => {
                if sys::peer_hung_up(reader.get_ref().as_ref().as_fd()) {
                    return None;
                }
            }
        }
    }
}

fn error(message: &str) -> Response {
    Response::Error {
        message: message.to_owned(),
    }
}

/// A request handed to the driver, its answer to come.
enum Pending {
    /// Answered without the driver, or the master is stopping.
    Now(Response),
    Status(oneshot::Receiver<crate::control::Status>),
    Outcome(oneshot::Receiver<Result<Outcome, Refusal>>),
    /// A `stop` with `wait`: the exit code, once the master has stopped.
    Stopped(oneshot::Receiver<i32>),
}

fn stopped() -> Response {
    error("the master is stopping")
}

fn outcome(r: Result<Outcome, Refusal>) -> Response {
    match r {
        Ok(o) => Response::Ok {
            message: o.to_string(),
        },
        Err(refusal) => error(&refusal.to_string()),
    }
}

/// Queues the command for `req` (waiting for room in the driver's queue).
async fn submit(req: Request, commands: &mpsc::Sender<Command>) -> Pending {
    let queue = |cmd: Command, pending: Pending| async move {
        match commands.send(cmd).await {
            Ok(()) => pending,
            Err(_) => Pending::Now(stopped()),
        }
    };
    match req {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            queue(Command::Status(tx), Pending::Status(rx)).await
        }
        Request::Reload { wait } => {
            let (reply, rx) = oneshot::channel();
            queue(Command::Reload { wait, reply }, Pending::Outcome(rx)).await
        }
        Request::Scale { workers, by } => {
            let to = match (workers, by) {
                (Some(n), None) => ScaleTo::Exactly(n),
                (None, Some(by)) => ScaleTo::By(by),
                _ => {
                    return Pending::Now(error(
                        "scale needs exactly one of \"workers\" and \"by\"",
                    ));
                }
            };
            let (reply, rx) = oneshot::channel();
            queue(Command::Scale { to, reply }, Pending::Outcome(rx)).await
        }
        Request::Stop { now, wait } => {
            let mode = if now {
                StopMode::Now
            } else {
                StopMode::Graceful
            };
            let (tx, rx) = oneshot::channel();
            let cmd = Command::Stop {
                mode,
                wait: wait.then_some(tx),
            };
            let pending = if wait {
                Pending::Stopped(rx)
            } else {
                Pending::Now(outcome(Ok(Outcome::Stopping {
                    graceful: mode == StopMode::Graceful,
                })))
            };
            queue(cmd, pending).await
        }
    }
}

impl Pending {
    /// The answer, once the driver gives it.
    async fn reply(self) -> Response {
        match self {
            Pending::Now(resp) => resp,
            Pending::Status(rx) => rx.await.map(Response::Status).unwrap_or_else(|_| stopped()),
            Pending::Outcome(rx) => rx.await.map(outcome).unwrap_or_else(|_| stopped()),
            Pending::Stopped(rx) => match rx.await {
                Ok(code) => Response::Stopped {
                    message: Outcome::Stopped { code }.to_string(),
                    code,
                },
                Err(_) => stopped(),
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Status;

    /// A fresh directory for a control socket.
    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rr-mctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join("ctl.sock")
    }

    /// Where a driver answers a `reload`.
    type ReloadReply = oneshot::Sender<Result<Outcome, Refusal>>;

    /// Serves `path` with a driver that answers `status` and holds every waited-for
    /// `reload` unanswered, telling `reloads` of each; cancel the token to stop.
    fn serve_with_a_slow_reload(
        path: &Path,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<ReloadReply>,
    ) {
        let socket = bind(path).expect("bind");
        let (commands, mut rx) = mpsc::channel(8);
        let (reloads_tx, reloads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Status(reply) => {
                        let _ = reply.send(Status::default());
                    }
                    Command::Reload { reply, .. } => {
                        let _ = reloads_tx.send(reply);
                    }
                    _ => {}
                }
            }
        });
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(
            socket,
            commands,
            stop.clone(),
            CancellationToken::new(),
            TaskTracker::new(),
        ));
        (stop, served, reloads)
    }

    /// Regression: a session waiting for a `reload --wait` did not watch its socket; a
    /// client that timed out and went kept its slot until the reload ended, and after
    /// 64 of them the master answered every request (`stop`, `status`) with `busy`.
    #[tokio::test]
    async fn clients_that_hang_up_while_waiting_give_their_slots_back() {
        let path = socket_path("hangup");
        let (stop, served, mut reloads) = serve_with_a_slow_reload(&path);
        let mut held = Vec::new();
        for i in 0..MAX_CLIENTS + 4 {
            let mut client = UnixStream::connect(&path).await.expect("connect");
            let _ = client
                .write_all(b"{\"cmd\":\"reload\",\"wait\":true}\n")
                .await;
            let reply = tokio::time::timeout(Duration::from_secs(5), reloads.recv())
                .await
                .unwrap_or_else(|_| panic!("reload {i} never reached the driver: no slot"))
                .expect("the driver runs");
            held.push(reply);
            drop(client); // the client gives up
        }
        let answer =
            crate::control::request_within(&path, &Request::Status, Duration::from_secs(5)).await;
        assert!(matches!(answer, Ok(Response::Status(_))), "{answer:?}");
        // Every abandoned waiter is gone (the driver may forget them).
        for (i, reply) in held.iter_mut().enumerate() {
            tokio::time::timeout(Duration::from_secs(5), reply.closed())
                .await
                .unwrap_or_else(|_| panic!("waiter {i} kept"));
        }
        stop.cancel();
        served.await.expect("served");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// A client that shuts down only its writing side after its request (`nc -N`)
    /// still gets the answer it waits for.
    #[tokio::test]
    async fn a_client_that_only_stops_writing_still_gets_its_answer() {
        let path = socket_path("halfclose");
        let (stop, served, mut reloads) = serve_with_a_slow_reload(&path);
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client
            .write_all(b"{\"cmd\":\"reload\",\"wait\":true}\n")
            .await
            .expect("request");
        let reply = tokio::time::timeout(Duration::from_secs(5), reloads.recv())
            .await
            .expect("in time")
            .expect("the driver runs");
        // The session waits for the answer; the client stops writing meanwhile.
        client.shutdown().await.expect("shut down writing");
        // A yield lets the runtime poll its reactor first: the session sees the end
        // of the requests before the answer comes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let _ = reply.send(Ok(Outcome::Reloaded { generation: 1 }));
        let mut answer = String::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(client).read_line(&mut answer),
        )
        .await
        .expect("in time")
        .expect("read");
        let answer: Response = serde_json::from_str(answer.trim_end()).expect("json");
        assert_eq!(
            answer,
            Response::Ok {
                message: Outcome::Reloaded { generation: 1 }.to_string()
            }
        );
        stop.cancel();
        served.await.expect("served");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// Regression (review, sixth round): a session watched for a hang-up while it
    /// still waited for room in the driver's queue (64 commands); a client that sent
    /// `stop` and closed at once (`printf ... | nc -U -q0`) lost its stop, which was
    /// never queued. Paused clock: the runtime runs until nothing is left to do
    /// before the clock moves.
    #[tokio::test(start_paused = true)]
    async fn a_stop_from_a_client_that_closes_at_once_reaches_a_busy_driver() {
        let path = socket_path("fullqueue");
        let socket = bind(&path).expect("bind");
        let (commands, mut rx) = mpsc::channel(64);
        // The driver is busy: its queue is full, and it reads nothing for now.
        let mut statuses = Vec::new();
        for _ in 0..64 {
            let (tx, status) = oneshot::channel();
            commands.try_send(Command::Status(tx)).expect("room");
            statuses.push(status);
        }
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(
            socket,
            commands,
            stop.clone(),
            CancellationToken::new(),
            TaskTracker::new(),
        ));
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client
            .write_all(b"{\"cmd\":\"stop\"}\n")
            .await
            .expect("request");
        // The session has read the request, and waits for room to queue it, when
        // the client goes: a paused clock moves only once the runtime has nothing
        // left to do. Then it sees the hang-up, and gives up (the bug) or goes on
        // waiting for room.
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut stops = 0;
        for n in 0..65 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(Command::Stop { mode, wait })) => {
                    assert_eq!(mode, StopMode::Graceful);
                    assert!(wait.is_none());
                    stops += 1;
                }
                Ok(Some(Command::Status(_))) => {}
                other => panic!("the driver's queue after {n} commands: {other:?}"),
            }
        }
        assert_eq!(stops, 1, "the stop was queued");
        stop.cancel();
        served.await.expect("served");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// Regression (review, sixth round): a client that shut down its writing side
    /// (`nc -N`) and then hung up while it waited kept its slot and its waiter: the
    /// end of its requests was read once, and the hang-up never looked for again.
    #[tokio::test(start_paused = true)]
    async fn clients_that_stop_writing_then_hang_up_give_their_slots_back() {
        let path = socket_path("halfhangup");
        let (stop, served, mut reloads) = serve_with_a_slow_reload(&path);
        let mut held = Vec::new();
        for i in 0..MAX_CLIENTS + 4 {
            let mut client = UnixStream::connect(&path).await.expect("connect");
            client
                .write_all(b"{\"cmd\":\"reload\",\"wait\":true}\n")
                .await
                .expect("request");
            let reply = tokio::time::timeout(Duration::from_secs(5), reloads.recv())
                .await
                .unwrap_or_else(|_| panic!("reload {i} never reached the driver: no slot"))
                .expect("the driver runs");
            client.shutdown().await.expect("shut down writing");
            // The session reads the end of the requests before the client goes: a
            // paused clock moves only once the runtime has nothing left to do.
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(client);
            // The clock is moved by hand, and the wait bounded in real time: a child
            // that another test forks may hold a copy of the client's socket until
            // its `exec`, and the hang-up shows only then.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !reply.is_closed() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "waiter {i} kept after its client hung up"
                );
                tokio::time::advance(HANGUP_CHECK).await;
            }
            held.push(reply);
        }
        let answer =
            crate::control::request_within(&path, &Request::Status, Duration::from_secs(5)).await;
        assert!(matches!(answer, Ok(Response::Status(_))), "{answer:?}");
        stop.cancel();
        served.await.expect("served");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// Regression (review, sixth round): only the device and inode told our socket
    /// file from another master's, and ext4 readily gives a freed inode number to
    /// the next file made: a file with our numbers but another change time is not
    /// ours.
    #[test]
    fn a_file_with_our_inode_but_another_change_time_is_not_ours() {
        let path = socket_path("ctime");
        let _socket = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let ours = file_id(&path).expect("id");
        let (secs, nsecs) = ours.ctime;
        let other = FileId {
            ctime: if nsecs > 0 {
                (secs, nsecs - 1)
            } else {
                (secs - 1, nsecs)
            },
            ..ours
        };
        remove_own_file(&path, Some(other));
        let kept = path.exists();
        remove_own_file(&path, Some(ours));
        let removed = !path.exists();
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
        assert!(
            kept,
            "a file of the same inode, changed at another time, was removed"
        );
        assert!(removed, "our own file is removed");
    }

    /// Regression: a stopping master removed whatever file was at its control path:
    /// another master's live socket, made there after ours was deleted.
    #[tokio::test]
    async fn another_masters_socket_at_the_path_is_left_alone() {
        let path = socket_path("replaced");
        let (stop, served, _reloads) = serve_with_a_slow_reload(&path);
        std::fs::remove_file(&path).expect("delete ours");
        let _other = std::os::unix::net::UnixListener::bind(&path).expect("another master");
        stop.cancel();
        served.await.expect("served");
        let kept = std::os::unix::net::UnixStream::connect(&path);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
        assert!(kept.is_ok(), "the other master's socket: {kept:?}");
    }

    #[tokio::test]
    async fn the_masters_own_socket_file_is_removed() {
        let path = socket_path("own");
        let (stop, served, _reloads) = serve_with_a_slow_reload(&path);
        stop.cancel();
        served.await.expect("served");
        let left = path.exists();
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
        assert!(!left, "the socket file is left behind");
    }
}
