//! Listener sources (TCP address, Unix path, sockets inherited from systemd) and the
//! accept loop that feeds [`Dispatcher`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::dispatch::{Accepted, Dispatcher};
use crate::protocol::{ListenerInfo, ListenerKind, MAX_FDS_PER_FRAME};
use crate::sys;
use crate::wake::WakeFlag;

/// Kernel backlog of each listening socket (the kernel caps it at `somaxconn`).
const BACKLOG: u32 = 4096;
/// Pause after an accept failed for lack of descriptors or memory.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);
/// Transient accept errors in a row (`ECONNABORTED`, `EPERM`...), across batches, after
/// which the loop backs off as for any other error, and again at each one until a
/// connection is accepted: one that repeats without taking a connection off the
/// backlog (a seccomp filter that fails `accept4` with `EPERM`) would otherwise never
/// let the loop wait.
const TRANSIENT_IN_A_ROW: usize = 16;
/// Pause between attempts to listen again after a pause, when one failed.
const RESUME_RETRY: Duration = Duration::from_secs(1);
/// How long a stopping accept loop waits for a worker to have room for the sockets it
/// holds (each worker is still serving: its drain comes after this).
const FINAL_DISPATCH: Duration = Duration::from_secs(1);

/// Where the master listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenSpec {
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix stream socket at a path (a stale socket file is replaced).
    Unix(PathBuf),
    /// The sockets systemd passes (`LISTEN_FDS`, `LISTEN_PID`).
    Systemd,
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    /// `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, `unix:PATH`, an absolute path, or
    /// `systemd`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "systemd" {
            return Ok(ListenSpec::Systemd);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "invalid listen address {s:?}: empty Unix socket path"
                ));
            }
            return Ok(ListenSpec::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Ok(ListenSpec::Unix(PathBuf::from(s)));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(ListenSpec::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
        }
        s.parse::<SocketAddr>().map(ListenSpec::Tcp).map_err(|_| {
            format!(
                "invalid listen address {s:?}: expected IP:PORT, [IPv6]:PORT, localhost:PORT, unix:/path or systemd"
            )
        })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Tcp(addr) => write!(f, "{addr}"),
            ListenSpec::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenSpec::Systemd => f.write_str("systemd"),
        }
    }
}

/// A bound address, as reported by [`MasterHandle::local_addrs`](crate::MasterHandle::local_addrs).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalAddr {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A Unix-socket listener.
    Unix(PathBuf),
}

impl LocalAddr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            LocalAddr::Tcp(a) => Some(*a),
            LocalAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalAddr::Tcp(addr) => write!(f, "{addr}"),
            LocalAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug)]
enum Socket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(l) => l.as_raw_fd(),
            Socket::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl From<Socket> for OwnedFd {
    fn from(socket: Socket) -> OwnedFd {
        match socket {
            Socket::Tcp(l) => l.into(),
            Socket::Unix(l) => l.into(),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

impl Socket {
    /// One `accept4` (close-on-exec); the connection as a bare descriptor, with the
    /// client's IP address for a TCP connection.
    fn accept(&self) -> io::Result<Accepted> {
        match self {
            Socket::Tcp(l) => l.accept().map(|(s, peer)| Accepted {
                fd: OwnedFd::from(s),
                peer: Some(peer.ip()),
            }),
            Socket::Unix(l) => l.accept().map(|(s, _)| Accepted {
                fd: OwnedFd::from(s),
                peer: None,
            }),
        }
    }
}

/// A bound, non-blocking listening socket.
#[derive(Debug)]
pub(crate) struct Listener {
    socket: AsyncFd<Socket>,
    local: LocalAddr,
    owned_path: Option<SocketFile>,
    /// Passed by another process (systemd), which keeps its own descriptor of the
    /// same socket: it must be left listening when the master lets go of it.
    inherited: bool,
    /// Errors `accept` returns instead of accepting (tests).
    #[cfg(test)]
    faults: Option<Arc<AcceptFaults>>,
}

/// A Unix socket file this master created; removed when the master stops, if it is
/// still the one `bind` made: the path may have been deleted meanwhile and another
/// master bound there, whose live socket must stay. A file whose inode changed since
/// (a `chmod` of our socket, say) is left too: a socket file nobody answers at is
/// replaced by the next master anyway (as the control socket's, `control.rs`).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// The file's identity just after `bind` (`None`: it could not be read, and the
    /// file is left alone).
    id: Option<FileId>,
}

/// Device, inode and change time of a file: an inode number freed by a deletion may
/// come back at once for the next file on the same device, not with the same change
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    /// Seconds and nanoseconds.
    ctime: (i64, i64),
}

impl SocketFile {
    /// The file `bind` just made at `path`.
    fn new(path: PathBuf) -> SocketFile {
        let id = file_id(&path);
        SocketFile { path, id }
    }
}

/// The identity of the file at `path` (not following a symlink).
fn file_id(path: &std::path::Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A listening socket the master hands to workers and never accepts on (shared
/// balancing). It is out of the master's reactor: with the socket registered, every
/// connection arriving for the workers would also wake the master, for nothing.
#[derive(Debug)]
pub(crate) struct SharedListener {
    socket: Socket,
    _owned_path: Option<SocketFile>,
}

impl SharedListener {
    /// A second descriptor for the listening socket, to hand to a worker.
    pub(crate) fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.socket.as_fd().try_clone_to_owned()
    }
}

impl Listener {
    pub(crate) fn local_addr(&self) -> &LocalAddr {
        &self.local
    }

    /// For shared balancing: the socket leaves the reactor (the master stops being
    /// woken by its connections) and is kept only to hand copies to workers.
    pub(crate) fn into_shared(self) -> SharedListener {
        let Listener {
            socket, owned_path, ..
        } = self;
        SharedListener {
            socket: socket.into_inner(),
            _owned_path: owned_path,
        }
    }

    /// The same socket under a new registration with the reactor. A TCP listener that
    /// was paused (shut down for reading) reported a hang-up, and its registration
    /// would report it closed for reading for ever after (tokio never clears that
    /// readiness): an accept loop waiting on it would never wait again.
    ///
    /// Retried every [`RESUME_RETRY`] while it fails (epoll out of memory), until
    /// `stop`: `None` then.
    async fn reregistered(self, stop: &CancellationToken) -> Option<Listener> {
        let Listener {
            socket,
            local,
            owned_path,
            inherited,
            #[cfg(test)]
            faults,
        } = self;
        let mut socket = socket.into_inner();
        loop {
            match sys::try_register_owned(socket) {
                Ok(registered) => {
                    return Some(Listener {
                        socket: registered,
                        local,
                        owned_path,
                        inherited,
                        #[cfg(test)]
                        faults,
                    });
                }
                Err((back, e)) => {
                    tracing::error!(listener = %local, error = %e, "cannot watch the listener again; retrying");
                    socket = back;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(RESUME_RETRY) => {}
            }
        }
    }

    pub(crate) fn info(&self) -> ListenerInfo {
        ListenerInfo {
            kind: match self.local {
                LocalAddr::Tcp(_) => ListenerKind::Tcp,
                LocalAddr::Unix(_) => ListenerKind::Unix,
            },
            address: self.local.to_string(),
        }
    }
}

/// Binds every spec. Must run inside a tokio runtime.
pub(crate) fn bind_all(specs: &[ListenSpec]) -> Result<Vec<Listener>, (String, io::Error)> {
    let mut out = Vec::new();
    for spec in specs {
        match spec {
            ListenSpec::Tcp(addr) => out.push(bind_tcp(*addr).map_err(|e| (spec.to_string(), e))?),
            ListenSpec::Unix(path) => {
                out.push(bind_unix(path.clone()).map_err(|e| (spec.to_string(), e))?)
            }
            ListenSpec::Systemd => out.extend(from_systemd().map_err(|e| (spec.to_string(), e))?),
        }
    }
    Ok(out)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<Listener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // Linux copies TCP_NODELAY from a listening socket to every connection accepted
    // on it: set once here, no worker needs a system call per connection for it.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?.into_std()?;
    let local = LocalAddr::Tcp(listener.local_addr()?);
    Ok(Listener {
        socket: sys::register_owned(Socket::Tcp(listener))?,
        local,
        owned_path: None,
        inherited: false,
        #[cfg(test)]
        faults: None,
    })
}

/// Makes way for binding a Unix socket at `path`. Only a leftover may be removed: a
/// socket file (not a symlink, not a regular file) on which connecting is refused. One
/// that answers is in use (`AddrInUse`, with `in_use` as the message); anything else
/// at the path is left alone and is an error.
pub(crate) fn clear_stale_socket(path: &std::path::Path, in_use: &'static str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; refusing to replace it",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, in_use)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot tell whether the socket is in use ({e}); refusing to replace it"),
        )),
    }
}

fn bind_unix(path: PathBuf) -> io::Result<Listener> {
    clear_stale_socket(&path, "another process is listening on it")?;
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    Ok(Listener {
        socket: sys::register_owned(Socket::Unix(listener))?,
        local: LocalAddr::Unix(path.clone()),
        owned_path: Some(SocketFile::new(path)),
        inherited: false,
        #[cfg(test)]
        faults: None,
    })
}

/// The listening sockets passed by systemd socket activation (`LISTEN_FDS` sockets
/// from descriptor 3 on, meant for this process when `LISTEN_PID` is its pid).
fn from_systemd() -> io::Result<Vec<Listener>> {
    let fds = sd_notify::listen_fds()?;
    if fds.len() == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no sockets were passed (LISTEN_FDS and LISTEN_PID are not set for this process)",
        ));
    }
    fds.map(|raw| sys::adopt_inherited_socket(raw).and_then(listener_from_fd))
        .collect()
}

/// `LISTEN_FDS` is set but `LISTEN_PID` names another process: the sockets were meant
/// for someone else (a wrapper that did not pass them on). The message says so.
pub fn socket_activation_mismatch() -> Option<String> {
    let fds = std::env::var("LISTEN_FDS").ok()?;
    let pid = std::env::var("LISTEN_PID").ok()?;
    if pid.parse::<u32>().ok() == Some(sys::getpid()) {
        return None;
    }
    Some(format!(
        "LISTEN_FDS={fds} is set for process {pid}, not this one ({}): the inherited sockets are not used",
        sys::getpid()
    ))
}

/// True when systemd passed listening sockets to this process.
pub fn socket_activated() -> bool {
    std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(sys::getpid())
        && std::env::var_os("LISTEN_FDS").is_some()
}

/// Wraps an inherited listening socket, TCP or Unix, found out by its local address.
/// Anything else (a connected socket, as systemd passes with `Accept=yes`; a datagram
/// socket) is refused: every accept on it would fail. The master leaves an inherited
/// socket listening when it stops (see [`accept_loop`]).
pub(crate) fn listener_from_fd(fd: OwnedFd) -> io::Result<Listener> {
    if !sys::is_listening_stream(fd.as_fd())? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "descriptor {} is not a listening stream socket (systemd: use Accept=no and ListenStream=)",
                fd.as_raw_fd()
            ),
        ));
    }
    let tcp = std::net::TcpListener::from(fd);
    if let Ok(addr) = tcp.local_addr() {
        tcp.set_nonblocking(true)?;
        // As for the sockets bound here (see `bind_tcp`).
        sys::set_nodelay(tcp.as_fd());
        return Ok(Listener {
            socket: sys::register_owned(Socket::Tcp(tcp))?,
            local: LocalAddr::Tcp(addr),
            owned_path: None,
            inherited: true,
            #[cfg(test)]
            faults: None,
        });
    }
    let unix = std::os::unix::net::UnixListener::from(OwnedFd::from(tcp));
    let addr = unix.local_addr()?;
    unix.set_nonblocking(true)?;
    let path = addr
        .as_pathname()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("(unnamed)"));
    Ok(Listener {
        socket: sys::register_owned(Socket::Unix(unix))?,
        local: LocalAddr::Unix(path),
        owned_path: None,
        inherited: true,
        #[cfg(test)]
        faults: None,
    })
}

/// Accepts until the listener would block (up to [`Dispatcher::reserve`]'s room: at
/// most [`Dispatcher::batch_limit`], and what all accept loops together hold stays
/// within `MAX_BATCH`), hands the batch to the dispatcher at once, and stops accepting
/// while sockets wait for a worker. An accept error other than a connection's own
/// (`ECONNABORTED`...) backs off for [`RESOURCE_BACKOFF`], after the sockets accepted
/// before it were dispatched; so do [`TRANSIENT_IN_A_ROW`] of those in a row (counted
/// across batches, until an accept succeeds).
///
/// While `paused` is true (no worker left after a give-up) a TCP listener is shut down
/// for reading: the kernel refuses connection attempts (and resets those waiting in the
/// backlog) instead of leaving clients hanging; it listens again when `paused` turns
/// false. Other listeners just stop accepting. A stop that comes while a TCP listener
/// is shut leaves an inherited one (systemd's, whose own descriptor is the same
/// socket) listening again, so that the port keeps taking connections for the next
/// master; one the master bound itself is just closed.
pub(crate) async fn accept_loop(
    mut listener: Listener,
    index: u16,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
    mut paused: watch::Receiver<bool>,
) {
    let mut wake = dispatcher.subscribe();
    let mut batch: Vec<Accepted> = Vec::with_capacity(MAX_FDS_PER_FRAME);
    let stats = &dispatcher.stats;
    // Stop and pause changes are heard by a task of their own, which raises a flag and
    // wakes this loop; the loop's top then looks at both. Below saturation the loop
    // waits with every connection, and the token's and the watch's futures, polled
    // there, would take a lock each per connection.
    let control = Arc::new(WakeFlag::default());
    let forwarder = tokio::spawn(forward_control(
        stop.clone(),
        paused.clone(),
        Arc::clone(&control),
    ));
    // The TCP listener is shut down for reading (paused) and not listening again yet.
    let mut shut = false;
    // Transient accept errors since the last connection accepted, across batches: a
    // loop with little room (other loops hold nearly `MAX_BATCH`) ends each batch
    // before 16, and a count per batch would never back off.
    let mut transient = 0;
    loop {
        // Checked here, not only in the selects below: those poll the listener first,
        // which under constant load is always ready.
        if stop.is_cancelled() {
            break;
        }
        if *paused.borrow_and_update() {
            let tcp = matches!(listener.local, LocalAddr::Tcp(_));
            if tcp {
                match sys::pause_listening(listener.socket.get_ref().as_fd()) {
                    Ok(()) => shut = true,
                    Err(e) => {
                        tracing::warn!(listener = %listener.local, error = %e, "cannot pause the listener");
                    }
                }
            }
            // Queued sockets have nowhere to go: close them (the clients see a reset).
            dispatcher.dequeue(batch.len());
            batch.clear();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = paused.wait_for(|p| !*p) => {}
            }
            if tcp {
                // Until it listens again (another process may hold the port now): a
                // socket that is not listening would fail every accept.
                let mut listening = false;
                loop {
                    let socket = listener.socket.get_ref();
                    match sys::resume_listening(socket.as_fd(), BACKLOG as i32) {
                        Ok(()) => {
                            listening = true;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(listener = %listener.local, error = %e, "cannot listen again; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = tokio::time::sleep(RESUME_RETRY) => {}
                            }
                        }
                    }
                }
                if !listening {
                    break; // stopped meanwhile (`shut` still says so, if it was)
                }
                shut = false;
                let socket = listener.socket.get_ref();
                if let Socket::Tcp(l) = socket {
                    if l.local_addr().ok() != listener.local.tcp() {
                        // A listener bound to port 0 gets a new port when it listens again.
                        tracing::error!(
                            listener = %listener.local,
                            "the listener came back on another port (it was bound to port 0)"
                        );
                    }
                }
                listener = match listener.reregistered(&stop).await {
                    Some(l) => l,
                    None => {
                        forwarder.abort();
                        return; // stopped meanwhile; nothing is held, and it listens
                    }
                };
            }
            continue;
        }
        if !batch.is_empty() {
            // Sockets wait for a worker (the kernel backlog holds new connections
            // meanwhile). The receiver was marked seen before they were dispatched: a
            // wake-up since ends this wait at once.
            let woken = tokio::select! {
                () = std::future::poll_fn(|cx| control.poll_raised(cx)) => false,
                changed = wake.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    true
                }
            };
            if woken {
                wake.borrow_and_update();
                let before = batch.len();
                dispatcher.dispatch(index, &mut batch);
                dispatcher.dequeue(before - batch.len());
            }
            // A stop or a pause first; then wait again, or accept.
            continue;
        }
        // The listener first. `poll_read_ready` keeps the task's waker in the
        // registration's own slot, where `readable()` would queue a waiter per wait.
        let socket = &listener.socket;
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
                return Poll::Ready(Some(ready));
            }
            control.poll_raised(cx).map(|()| None)
        })
        .await;
        let mut guard = match ready {
            Some(Ok(guard)) => guard,
            Some(Err(e)) => {
                tracing::error!(listener = %listener.local, error = %e, "listener failed");
                break;
            }
            None => continue,
        };
        let room = dispatcher.reserve();
        if room == 0 {
            // The accept loops hold as many sockets as they may: wait until some are
            // sent or closed (the kernel backlog holds new connections meanwhile).
            drop(guard);
            wake.borrow_and_update();
            if !dispatcher.wait_for_held_room() {
                tokio::select! {
                    () = std::future::poll_fn(|cx| control.poll_raised(cx)) => {}
                    changed = wake.changed() => if changed.is_err() { break },
                }
            }
            continue;
        }
        let mut backoff = false;
        // Every attempt counts against the room, a failed one too.
        let mut attempts = 0;
        #[cfg(test)]
        let faults = listener.faults.as_deref();
        while attempts < room {
            attempts += 1;
            let result = guard.try_io(|socket| {
                #[cfg(test)]
                if let Some(e) = faults.and_then(AcceptFaults::next) {
                    return Err(e);
                }
                socket.get_ref().accept()
            });
            match result {
                Ok(Ok(accepted)) => {
                    transient = 0;
                    batch.push(accepted);
                    // Below saturation the backlog is usually empty after a few: ask
                    // `poll` rather than an `accept` doomed to `EAGAIN`. Clearing the
                    // readiness loses nothing: a connection that came meanwhile is
                    // reported by the reactor's next turn. After `POLLED_ACCEPTS` this
                    // is a flood: accept on without asking.
                    if batch.len() < sys::POLLED_ACCEPTS
                        && attempts < room
                        && !sys::connection_waiting(guard.get_inner().as_fd())
                    {
                        guard.clear_ready();
                        break;
                    }
                }
                Ok(Err(e)) if sys::is_transient_accept_error(&e) => {
                    transient += 1;
                    if transient < TRANSIENT_IN_A_ROW {
                        continue;
                    }
                    let errors = stats.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if errors == 1 || errors.is_multiple_of(100) {
                        tracing::error!(listener = %listener.local, error = %e, errors, in_a_row = transient, "accept keeps failing; backing off");
                    }
                    backoff = true;
                    break;
                }
                Ok(Err(e)) => {
                    let errors = stats.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    // Every failure is counted; the log says the first, then one in
                    // a hundred (a long EMFILE would say it 20 times a second).
                    let say = errors == 1 || errors.is_multiple_of(100);
                    if sys::is_resource_exhaustion(&e) {
                        if say {
                            tracing::warn!(listener = %listener.local, error = %e, errors, "accept failed; backing off");
                        }
                    } else if say {
                        tracing::error!(listener = %listener.local, error = %e, errors, "accept failed; backing off");
                    }
                    backoff = true;
                    break;
                }
                Err(_would_block) => break,
            }
        }
        drop(guard);
        if !batch.is_empty() {
            stats
                .accepted
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Sent at once, before any backoff: after an `EMFILE` the descriptors
            // held are the shortage.
            wake.borrow_and_update();
            dispatcher.dispatch(index, &mut batch);
        }
        // What was reserved and not accepted, and what was sent; what is left waits.
        dispatcher.release(room - batch.len());
        dispatcher.queue(batch.len());
        if backoff {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RESOURCE_BACKOFF) => {}
            }
        }
    }
    forwarder.abort();
    if shut && listener.inherited {
        // Shut down for reading, the socket is closed for systemd's descriptor too:
        // the next master would be refused it, and clients meanwhile.
        if let Err(e) = sys::resume_listening(listener.socket.get_ref().as_fd(), BACKLOG as i32) {
            tracing::error!(listener = %listener.local, error = %e, "stopping while paused: cannot leave the inherited listener listening");
        }
    }
    // Stopping: the listener closes now, and accepted sockets get their last chance.
    // The driver drains the workers only once every accept loop has ended, so they are
    // still in rotation; one that is full may make room within FINAL_DISPATCH.
    drop(listener);
    let before = batch.len();
    let last_chance = tokio::time::Instant::now() + FINAL_DISPATCH;
    while !batch.is_empty() {
        wake.borrow_and_update();
        dispatcher.dispatch(index, &mut batch);
        if batch.is_empty() || dispatcher.len() == 0 {
            break; // served, or no worker left to wait for (an immediate stop)
        }
        match tokio::time::timeout_at(last_chance, wake.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    if !batch.is_empty() {
        tracing::warn!(
            listener = index,
            closed = batch.len(),
            "stopping: no worker had room for connections already accepted; closed"
        );
    }
    dispatcher.dequeue(before);
}

/// Injected accept results (tests): `pass` accepts go through, then `fail` accepts
/// return `errno`, then all go through.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct AcceptFaults {
    errno: i32,
    counts: std::sync::Mutex<(usize, usize)>,
}

#[cfg(test)]
impl AcceptFaults {
    fn new(pass: usize, errno: i32, fail: usize) -> Arc<AcceptFaults> {
        Arc::new(AcceptFaults {
            errno,
            counts: std::sync::Mutex::new((pass, fail)),
        })
    }

    fn next(&self) -> Option<io::Error> {
        let mut counts = self.counts.lock().expect("faults");
        let (pass, fail) = &mut *counts;
        if *pass > 0 {
            *pass -= 1;
            None
        } else if *fail > 0 {
            *fail -= 1;
            Some(io::Error::from_raw_os_error(self.errno))
        } else {
            None
        }
    }
}

/// Raises `control` whenever `stop` is cancelled or `paused` changes; ends after the
/// stop.
async fn forward_control(
    stop: CancellationToken,
    mut paused: watch::Receiver<bool>,
    control: Arc<WakeFlag>,
) {
    loop {
        let stopped = tokio::select! {
            () = stop.cancelled() => true,
            changed = paused.changed() => {
                if changed.is_err() {
                    // Nobody pauses any more: only the stop is left to hear of.
                    stop.cancelled().await;
                }
                changed.is_err()
            }
        };
        control.raise();
        if stopped {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::Balance;
    use super::super::link::WorkerLink;
    use super::*;
    use crate::protocol::Protocol;

    #[tokio::test]
    async fn only_listening_stream_sockets_are_adopted() {
        let listening = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listening.local_addr().expect("addr");
        // What systemd passes with Accept=yes: a connection, not a listener.
        let connected = std::net::TcpStream::connect(addr).expect("connect");
        let err = listener_from_fd(OwnedFd::from(connected)).expect_err("a connection");
        assert!(
            err.to_string().contains("not a listening stream socket"),
            "{err}"
        );
        let datagram = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(
            listener_from_fd(OwnedFd::from(datagram)).is_err(),
            "a datagram socket"
        );
        let unix = std::os::unix::net::UnixDatagram::unbound().expect("unix datagram");
        assert!(
            listener_from_fd(OwnedFd::from(unix)).is_err(),
            "a Unix datagram socket"
        );
        let adopted = listener_from_fd(OwnedFd::from(listening)).expect("a listener");
        assert_eq!(adopted.local_addr(), &LocalAddr::Tcp(addr));
    }

    #[test]
    fn listen_specs_parse() {
        assert_eq!(
            "127.0.0.1:8080".parse::<ListenSpec>(),
            Ok(ListenSpec::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080))))
        );
        assert_eq!(
            "localhost:0".parse::<ListenSpec>(),
            Ok(ListenSpec::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert!(matches!(
            "[::1]:80".parse::<ListenSpec>(),
            Ok(ListenSpec::Tcp(_))
        ));
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenSpec>(),
            Ok(ListenSpec::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "/run/app.sock".parse::<ListenSpec>(),
            Ok(ListenSpec::Unix("/run/app.sock".into()))
        );
        assert_eq!("systemd".parse::<ListenSpec>(), Ok(ListenSpec::Systemd));
        let err = "8080".parse::<ListenSpec>().expect_err("no host");
        assert!(err.contains("\"8080\""), "{err}");
        assert!("unix:".parse::<ListenSpec>().is_err());
    }

    /// Whether any epoll instance of this process watches descriptor `fd`
    /// (/proc/self/fdinfo of an epoll descriptor lists each watch as `tfd: N ...`).
    fn watched_by_an_epoll(fd: RawFd) -> bool {
        let fd = fd.to_string();
        let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
            return false;
        };
        dir.flatten().any(|entry| {
            std::fs::read_to_string(entry.path()).is_ok_and(|info| {
                info.lines().any(|line| {
                    let mut words = line.split_whitespace();
                    words.next() == Some("tfd:") && words.next() == Some(fd.as_str())
                })
            })
        })
    }

    #[tokio::test]
    async fn a_shared_listener_leaves_the_reactor() {
        let mut listeners = bind_all(&["127.0.0.1:0".parse().expect("spec")]).expect("bind");
        let listener = listeners.pop().expect("one listener");
        let raw = listener.socket.get_ref().as_raw_fd();
        assert!(
            watched_by_an_epoll(raw),
            "an accepting listener is in the reactor"
        );
        let shared = listener.into_shared();
        assert_eq!(
            shared.socket.as_raw_fd(),
            raw,
            "the same socket, still open"
        );
        // Connections for the workers must not wake the master.
        assert!(
            !watched_by_an_epoll(raw),
            "a shared listener is out of the reactor"
        );
        let copy = shared.try_clone_fd().expect("a copy for a worker");
        assert_ne!(copy.as_raw_fd(), raw);
    }

    #[tokio::test(start_paused = true)]
    async fn the_accept_loop_hears_of_every_pause_change_and_of_the_stop() {
        let stop = CancellationToken::new();
        let (paused_tx, paused) = watch::channel(false);
        let control = Arc::new(WakeFlag::default());
        let forwarder = tokio::spawn(forward_control(stop.clone(), paused, Arc::clone(&control)));
        let raised = || std::future::poll_fn(|cx| control.poll_raised(cx));
        let quiet = tokio::time::timeout(Duration::from_secs(60), raised()).await;
        assert!(quiet.is_err(), "nothing changed: not raised");
        paused_tx.send(true).expect("send");
        tokio::time::timeout(Duration::from_secs(1), raised())
            .await
            .expect("a pause raises it");
        // Raised once per change: lowered when seen.
        let again = tokio::time::timeout(Duration::from_secs(60), raised()).await;
        assert!(again.is_err(), "seen once");
        paused_tx.send(false).expect("send");
        tokio::time::timeout(Duration::from_secs(1), raised())
            .await
            .expect("a resume raises it");
        // With nobody left to pause, the stop is still heard, and the task ends.
        drop(paused_tx);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), raised())
            .await
            .expect("the stop raises it");
        tokio::time::timeout(Duration::from_secs(1), forwarder)
            .await
            .expect("the forwarder ends after the stop")
            .expect("no panic");
    }

    /// CPU time this thread has used, in clock ticks (/proc/thread-self/stat).
    fn thread_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .expect("fields")
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    /// After a pause (no worker left) and a resume, the accept loop spun on the
    /// listener's stale hang-up: a core at 100% for as long as the master lived.
    #[tokio::test]
    async fn after_a_pause_and_a_resume_the_accept_loop_waits_again() {
        // An explicit port: a port-0 socket gets a new port when it listens again.
        let (port, mut listeners) = on_a_free_port(bind_port);
        let listener = listeners.pop().expect("one listener");
        // A second descriptor of the same socket, to see whether it listens.
        let probe = listener
            .socket
            .get_ref()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup");
        let listening = || rustix::net::sockopt::socket_acceptconn(&probe).expect("SO_ACCEPTCONN");
        let stop = CancellationToken::new();
        let (paused_tx, paused) = watch::channel(false);
        let dispatcher = Dispatcher::new(super::super::dispatch::Balance::RoundRobin);
        let task = tokio::spawn(accept_loop(
            listener,
            0,
            Arc::clone(&dispatcher),
            stop.clone(),
            paused,
        ));
        paused_tx.send(true).expect("send");
        let mut waited = 0;
        while listening() {
            waited += 1;
            assert!(waited < 500, "the listener pauses");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        paused_tx.send(false).expect("send");
        let mut waited = 0;
        while !listening() {
            waited += 1;
            assert!(waited < 500, "the listener resumes");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The loop runs on this thread: with no connection it must sleep. Not a timing
        // target: a spinning loop uses the whole window (or whatever the machine lends
        // it), a waiting one a tick at most.
        let before = thread_ticks();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = thread_ticks() - before;
        assert!(
            used < 10,
            "the accept loop used {used} ticks of CPU in 500 ms with nothing to accept"
        );
        // And it still accepts.
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut waited = 0;
        while dispatcher.stats.accepted.load(Ordering::Relaxed) == 0 {
            waited += 1;
            assert!(waited < 500, "the connection is accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends after the stop")
            .expect("no panic");
    }

    /// `bind` on a port nobody listened on a moment ago (for a socket that must keep
    /// its port when it listens again: an explicit port). A probe finds the port; a
    /// parallel test may bind it before `bind` does, so another is tried then.
    fn on_a_free_port<T>(bind: impl Fn(u16) -> io::Result<T>) -> (u16, T) {
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            match bind(port) {
                Ok(bound) => return (port, bound),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
            }
        }
        panic!("every free port tried was taken before it could be bound");
    }

    /// [`bind_all`] on 127.0.0.1:`port`.
    fn bind_port(port: u16) -> io::Result<Vec<Listener>> {
        let spec = format!("127.0.0.1:{port}").parse().expect("spec");
        bind_all(&[spec]).map_err(|(_, e)| e)
    }

    /// A worker in rotation with an open window that reads nothing, and its end.
    fn worker_link(id: u64) -> (Arc<WorkerLink>, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (_, writer) = crate::channel::split(crate::channel::from_std(a).expect("tokio"));
        let link = Arc::new(WorkerLink::new(id, id as u32, Protocol::Binary, writer));
        link.open_window_for_tests(u64::MAX);
        (link, b)
    }

    /// Waits (bounded) until `done`, letting the other tasks run in between.
    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not in 5 s: {what}");
    }

    /// Regression: with `--listen systemd` and `on_give_up = keep`, a stop while paused
    /// (no worker left) closed the listener still shut down for reading. The socket is
    /// systemd's too: it stayed closed, clients were refused, and the restarted master
    /// exited ("descriptor 3 is not a listening stream socket").
    #[tokio::test]
    async fn a_stop_while_paused_leaves_an_inherited_listener_listening() {
        let (port, socket) =
            on_a_free_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)));
        // systemd keeps its own descriptor of the socket it passes.
        let systemd = OwnedFd::from(socket.try_clone().expect("dup"));
        let listening = || sys::is_listening_stream(systemd.as_fd()).expect("SO_ACCEPTCONN");
        let listener = listener_from_fd(OwnedFd::from(socket)).expect("adopted");
        let stop = CancellationToken::new();
        let (_paused_tx, paused) = watch::channel(true);
        let dispatcher = Dispatcher::new(Balance::RoundRobin);
        let task = tokio::spawn(accept_loop(listener, 0, dispatcher, stop.clone(), paused));
        until("the listener pauses", || !listening()).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends after the stop")
            .expect("no panic");
        assert!(
            listening(),
            "systemd's socket is left listening for the next master"
        );
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("into the backlog");
        listener_from_fd(systemd).expect("the next master adopts it");
    }

    #[tokio::test]
    async fn a_stop_while_paused_closes_a_listener_the_master_bound() {
        let (port, mut listeners) = on_a_free_port(bind_port);
        let listener = listeners.pop().expect("one listener");
        let stop = CancellationToken::new();
        let (_paused_tx, paused) = watch::channel(true);
        let dispatcher = Dispatcher::new(Balance::RoundRobin);
        let task = tokio::spawn(accept_loop(listener, 0, dispatcher, stop.clone(), paused));
        let refused = || std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
        until("the listener pauses", refused).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends after the stop")
            .expect("no panic");
        assert!(refused(), "closed, not listening again on its way out");
    }

    /// Regression: the sockets accepted before an `EMFILE` waited through the 50 ms
    /// backoff before they were dispatched, holding descriptors during the shortage.
    #[tokio::test]
    async fn sockets_accepted_before_an_accept_error_are_dispatched_before_the_backoff() {
        let mut listeners = bind_all(&["127.0.0.1:0".parse().expect("spec")]).expect("bind");
        let mut listener = listeners.pop().expect("one listener");
        let addr = listener.local_addr().tcp().expect("tcp");
        listener.faults = Some(AcceptFaults::new(
            3,
            rustix::io::Errno::MFILE.raw_os_error(),
            1,
        ));
        let _clients: Vec<_> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let dispatcher = Dispatcher::new(Balance::RoundRobin);
        let (link, _worker) = worker_link(1);
        link.writer.writable().await.expect("writable");
        dispatcher.add(Arc::clone(&link));
        let stop = CancellationToken::new();
        let (_paused_tx, paused) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            0,
            Arc::clone(&dispatcher),
            stop.clone(),
            paused,
        ));
        // One thread: this task runs only while the accept loop waits, and after the
        // error it waits nowhere but in the backoff.
        let mut turns = 0;
        while dispatcher.stats.accept_errors.load(Ordering::Relaxed) == 0 {
            turns += 1;
            assert!(turns < 100_000, "the accept error comes");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            link.dispatched.load(Ordering::Relaxed),
            3,
            "the 3 accepted before the EMFILE are sent before the backoff"
        );
        assert_eq!(dispatcher.stats.queued.load(Ordering::Relaxed), 0);
        until("the other 2 after the backoff", || {
            link.dispatched.load(Ordering::Relaxed) == 5
        })
        .await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends after the stop")
            .expect("no panic");
    }

    /// Regression: a transient accept error (`EPERM`, `ECONNABORTED`...) was retried
    /// at once, without a wait: one that repeats without taking a connection (a
    /// seccomp filter failing `accept4` with `EPERM`) spun the accept loop for ever and
    /// stopped every other task of a current-thread runtime (the CLI's).
    #[test]
    fn a_transient_accept_error_that_never_ends_backs_off() {
        backs_off_from_an_endless_transient_error(Dispatcher::new(Balance::RoundRobin));
    }

    /// Regression: the transient errors in a row were counted per batch: a loop with
    /// room for fewer than 16 (the other loops held more than 240 sockets) ended every
    /// batch below 16 and never backed off, spinning on the readable listener.
    #[test]
    fn a_transient_accept_error_backs_off_a_loop_with_little_room() {
        let dispatcher = Dispatcher::new(Balance::RoundRobin);
        // Other loops hold all but 10 of the 256 the loops may hold together.
        for _ in 0..4 {
            assert_eq!(dispatcher.reserve(), 64);
        }
        dispatcher.release(10);
        backs_off_from_an_endless_transient_error(dispatcher);
    }

    /// Runs an accept loop whose every accept fails with `EPERM`, while a connection
    /// waits, on a runtime of its own; asserts that within 5 s it backed off twice and
    /// let the runtime's other tasks run.
    fn backs_off_from_an_endless_transient_error(dispatcher: Arc<Dispatcher>) {
        let stop = CancellationToken::new();
        let turns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // The loop's runtime on a thread of its own: this one watches it (a loop that
        // never waits would stop a timeout on its own runtime too).
        let runtime = {
            let (dispatcher, stop, turns) =
                (Arc::clone(&dispatcher), stop.clone(), Arc::clone(&turns));
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let mut listeners =
                        bind_all(&["127.0.0.1:0".parse().expect("spec")]).expect("bind");
                    let mut listener = listeners.pop().expect("one listener");
                    let addr = listener.local_addr().tcp().expect("tcp");
                    listener.faults = Some(AcceptFaults::new(
                        0,
                        rustix::io::Errno::PERM.raw_os_error(),
                        usize::MAX,
                    ));
                    // A connection waits: the listener stays readable.
                    let _client = std::net::TcpStream::connect(addr).expect("connect");
                    let (_paused_tx, paused) = watch::channel(false);
                    let task =
                        tokio::spawn(accept_loop(listener, 0, dispatcher, stop.clone(), paused));
                    let ticker = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            turns.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    stop.cancelled().await;
                    task.await.expect("no panic");
                    ticker.abort();
                });
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let backed_off = || dispatcher.stats.accept_errors.load(Ordering::Relaxed) >= 2;
        while !(backed_off() && turns.load(Ordering::Relaxed) > 0) {
            if std::time::Instant::now() >= deadline {
                stop.cancel();
                let _ = runtime.join();
                panic!(
                    "in 5 s the accept loop backed off {} times and the runtime ran others {} times",
                    dispatcher.stats.accept_errors.load(Ordering::Relaxed),
                    turns.load(Ordering::Relaxed)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.cancel();
        runtime.join().expect("the runtime ends");
    }

    /// Regression: each accept loop held up to 256 sockets waiting for a worker, so
    /// that 4 listeners held 1024, the whole of a default descriptor limit.
    #[tokio::test]
    async fn the_accept_loops_together_hold_at_most_max_batch() {
        let dispatcher = Dispatcher::new(Balance::RoundRobin);
        let stop = CancellationToken::new();
        let (_paused_tx, paused) = watch::channel(false);
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        // No worker: each loop takes 64 at a time, and 5 of them would hold 320.
        for index in 0..5u16 {
            let mut listeners = bind_all(&["127.0.0.1:0".parse().expect("spec")]).expect("bind");
            let listener = listeners.pop().expect("one listener");
            let addr = listener.local_addr().tcp().expect("tcp");
            for _ in 0..70 {
                clients.push(std::net::TcpStream::connect(addr).expect("connect"));
            }
            tasks.push(tokio::spawn(accept_loop(
                listener,
                index,
                Arc::clone(&dispatcher),
                stop.clone(),
                paused.clone(),
            )));
        }
        let accepted = || dispatcher.stats.accepted.load(Ordering::Relaxed);
        until("the loops take what they may", || accepted() >= 256).await;
        // Every loop has had its turns (all were readable from the start).
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted(), 256, "held by the 5 loops together");
        assert_eq!(dispatcher.stats.queued.load(Ordering::Relaxed), 256);
        // A worker comes: everything goes through, the loop that waited for room too.
        let (link, _worker) = worker_link(1);
        link.writer.writable().await.expect("writable");
        dispatcher.add(Arc::clone(&link));
        until("all 350 dispatched", || {
            link.dispatched.load(Ordering::Relaxed) == 350
        })
        .await;
        assert_eq!(accepted(), 350);
        assert_eq!(dispatcher.stats.queued.load(Ordering::Relaxed), 0);
        stop.cancel();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("each loop ends after the stop")
                .expect("no panic");
        }
    }

    #[tokio::test]
    async fn binds_port_zero_and_accepts() {
        let listeners = bind_all(&["127.0.0.1:0".parse().expect("spec")]).expect("bind");
        let addr = listeners[0].local_addr().tcp().expect("tcp");
        assert_ne!(addr.port(), 0);
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let guard = listeners[0].socket.readable().await.expect("readable");
        let accepted = guard.get_inner().accept().expect("accept");
        assert!(accepted.fd.as_raw_fd() > 2);
        assert_eq!(accepted.peer, Some(std::net::IpAddr::from([127, 0, 0, 1])));
        assert!(
            sys::tcp_nodelay(accepted.fd.as_fd()),
            "connections inherit TCP_NODELAY from the listener"
        );
    }

    /// An empty directory `<temp>/<name>-<pid>`: one left by an earlier run that had
    /// this pid (a container's pids repeat; a failed run leaves its directory) is
    /// removed first.
    fn fresh_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[tokio::test]
    async fn unix_socket_file_is_replaced_when_stale_and_removed_on_drop() {
        let dir = fresh_dir("rr-listen");
        let path = dir.join("a.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let l = bind_all(&[ListenSpec::Unix(path.clone())]).expect("bind over stale file");
        // A live one is not replaced.
        let err = bind_all(&[ListenSpec::Unix(path.clone())]).expect_err("in use");
        assert_eq!(err.1.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }

    /// Regression: a `unix:` listener's file was removed when the master stopped
    /// whatever was at the path by then: after it had been deleted and another master
    /// had bound there, stopping this one deleted the other's live socket.
    #[tokio::test]
    async fn a_socket_file_replaced_by_another_is_left_alone() {
        let dir = fresh_dir("rr-listen-replaced");
        let path = dir.join("a.sock");
        let ours = bind_all(&[ListenSpec::Unix(path.clone())]).expect("bind");
        std::fs::remove_file(&path).expect("rm");
        let theirs = std::os::unix::net::UnixListener::bind(&path).expect("another master");
        drop(ours);
        assert!(path.exists(), "the other master's socket file stays");
        std::os::unix::net::UnixStream::connect(&path).expect("and answers");
        drop(theirs);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Regression (v0.1, issue 9.11): `--control some.toml` or `--listen unix:PATH`
    /// deleted whatever regular file or symlink was at the path.
    #[test]
    fn only_a_dead_socket_file_is_ever_removed() {
        let dir = fresh_dir("rr-stale");
        let file = dir.join("rr-cluster.toml");
        std::fs::write(&file, "workers = 2\n").expect("write");
        let err = clear_stale_socket(&file, "in use").expect_err("a regular file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(file.exists(), "left alone");
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(clear_stale_socket(&link, "in use").is_err());
        assert!(link.exists() && file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_paused_tcp_listener_refuses_then_listens_again_on_the_same_port() {
        // An explicit port (a port-0 socket gets a new ephemeral port when it listens
        // again, as the kernel does not hold an automatic port for a closed socket).
        let (_, listeners) = on_a_free_port(bind_port);
        let addr = listeners[0].local_addr().tcp().expect("tcp");
        let fd = listeners[0].socket.get_ref().as_fd();
        sys::pause_listening(fd).expect("pause");
        let err = std::net::TcpStream::connect(addr).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        sys::resume_listening(fd, 16).expect("listen again");
        std::net::TcpStream::connect(addr).expect("accepted into the backlog");
    }
}
