//! The operating-system calls of the crate, through `rustix`'s safe wrappers, plus the
//! five things that have no safe wrapper: adopting a descriptor number named by the
//! environment, the hook that runs in a forked child before `exec`, registering a
//! socket with tokio's reactor (`AsyncFd::register_with_interest`, unsafe since tokio
//! 1.52 for I/O safety; two blocks), a `recv` into the uninitialized part of a tokio
//! `ReadBuf` (two blocks: the buffer's unfilled part, then marking what `recv` filled),
//! and borrowing the descriptor numbers a frame carries for `sendmsg`. Those seven
//! blocks are the crate's only `unsafe` code, each with its safety argument. The rest
//! of the crate is `#![deny(unsafe_code)]` and sees only functions taking `OwnedFd` and
//! `BorrowedFd`.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags};
use rustix::process::{Pid, Signal};

/// Most descriptors the kernel attaches to one `sendmsg` (`SCM_MAX_FD`). A `recvmsg` on
/// a stream socket returns the descriptors of at most one `sendmsg`, so a control
/// buffer of this size is never truncated by a well-formed peer.
pub(crate) const SCM_MAX_FD: usize = 253;

/// Control-buffer bytes for `SCM_MAX_FD` descriptors.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(SCM_MAX_FD));

/// What one `recvmsg` brought.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    /// Bytes written to the front of the buffer; 0 means end of stream.
    pub(crate) bytes: usize,
    /// The kernel dropped descriptors (`MSG_CTRUNC`): the receiver's descriptor table
    /// was full, or the peer sent more than `SCM_MAX_FD`.
    pub(crate) truncated: bool,
}

/// `recvmsg` with `MSG_CMSG_CLOEXEC`: reads bytes into `buf` and appends every received
/// descriptor, already close-on-exec, to `fds`.
///
/// `sendfd`'s `recv_with_fd` passes no flags, so it can neither set `CLOEXEC`
/// atomically (a `fork` in another thread could inherit the descriptor) nor report
/// `MSG_CTRUNC`; this is its receive half done with both.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<Received> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// `sendmsg` of `data` with the descriptors `fds` attached (`SCM_RIGHTS`), without
/// blocking and without `SIGPIPE`: a closed peer is an `EPIPE` error, whatever the
/// process does with the signal. `sendfd`'s `send_with_fd` passes no flags, and a
/// program that restored the default `SIGPIPE` would die of a worker dying mid-send.
///
/// `fds` are descriptors the caller holds open for the call (at most
/// [`SCM_MAX_FD`]; the kernel refuses more with `EINVAL`).
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[RawFd],
) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD || fds.iter().any(|&fd| fd < 0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `BorrowedFd` is `repr(transparent)` over `RawFd` and valid for any value
    // but -1; every value here is non-negative (checked above). The borrows live only
    // for this call, during which the caller holds the descriptors open (the contract
    // of this function and of `ChannelWriter::try_send`, as of `sendfd` before it).
    let borrowed: &[BorrowedFd<'_>] =
        unsafe { std::slice::from_raw_parts(fds.as_ptr().cast::<BorrowedFd<'_>>(), fds.len()) };
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(borrowed))
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    Ok(rustix::net::sendmsg(
        socket,
        &[io::IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// The inode of the socket open as descriptor `raw` in this process, read from
/// `/proc/self/fd` (`None` when `raw` is not an open socket). No descriptor is touched.
pub(crate) fn socket_inode_of(raw: RawFd) -> Option<u64> {
    if raw < 0 {
        return None;
    }
    let target = std::fs::read_link(format!("/proc/self/fd/{raw}")).ok()?;
    let target = target.to_str()?;
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inode of an open socket.
pub(crate) fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// Takes ownership of a descriptor named by the environment (`RR_CLUSTER_CHANNEL_FD`,
/// `LISTEN_FDS`): checks through `/proc/self/fd` that it is an open socket (without
/// touching a number that may not be ours), then marks it close-on-exec so that the
/// process's own children do not inherit it.
///
/// The caller guarantees that nothing else in the process owns `raw` (each inherited
/// number is adopted once: the worker refuses a second adoption, `LISTEN_FDS` is read
/// once at start).
pub(crate) fn adopt_inherited_socket(raw: RawFd) -> io::Result<OwnedFd> {
    if socket_inode_of(raw).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not an open socket"),
        ));
    }
    // SAFETY: /proc/self/fd just showed `raw` open and a socket in this process; the
    // environment handed it to this process to own, and the caller adopts each
    // inherited number at most once, so no other object owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let flags = rustix::io::fcntl_getfd(&fd)?;
    rustix::io::fcntl_setfd(&fd, flags | rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// Arranges for a worker child, between `fork` and `exec`, to
/// - receive SIGKILL when the thread that spawned it dies (`PR_SET_PDEATHSIG`), and
///   fail the spawn if the master already died before that was set;
/// - inherit `channel` (which is close-on-exec in the master) across `exec`.
///
/// The caller spawns from a thread that lives as long as the master: the death signal
/// follows the spawning thread, not the process.
pub(crate) fn prepare_worker_command(
    cmd: &mut tokio::process::Command,
    channel: BorrowedFd<'_>,
    master_pid: u32,
) {
    let fd = channel.as_raw_fd();
    let master = Pid::from_raw(master_pid as i32);
    // SAFETY: the closure runs in the forked child before exec. It makes only raw
    // system calls through rustix's linux_raw backend (prctl, getppid, fcntl), which
    // are async-signal-safe, allocates nothing (errors are built from raw OS codes) and
    // takes no lock. `fd` is open in the child: the master keeps its copy open until
    // `spawn` returns, and the child's table is a copy of the master's.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
            if rustix::process::getppid() != master {
                // The master died before the death signal was armed.
                return Err(io::Error::from_raw_os_error(Errno::SRCH.raw_os_error()));
            }
            let channel = BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(channel, rustix::io::FdFlags::empty())
                .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
            Ok(())
        });
    }
}

/// Writes all of `bytes` to a non-blocking socket from a context that cannot await
/// (a panic hook), waiting with `poll` for room, for at most `timeout` in all.
pub(crate) fn send_all_for(
    socket: BorrowedFd<'_>,
    mut bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !bytes.is_empty() {
        // MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
        match rustix::net::send(socket, bytes, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
            Ok(n) => {
                bytes = &bytes[n..];
                continue;
            }
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut pfd = [rustix::event::PollFd::new(
            &socket,
            rustix::event::PollFlags::OUT,
        )];
        let wait =
            rustix::event::Timespec::try_from(left.min(Duration::from_secs(1))).unwrap_or_default();
        let _ = rustix::event::poll(&mut pfd, Some(&wait));
    }
    Ok(())
}

/// `accept` failed for lack of descriptors or memory: retrying at once would spin.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

/// Accepts per wake-up preceded by [`connection_waiting`]; past them the backlog is
/// taken to be flooded and emptied without asking (at saturation: a few `poll`s per
/// batch, not one per connection).
pub(crate) const POLLED_ACCEPTS: usize = 8;

/// Whether a connection waits on a listening socket (`poll` with a zero timeout). An
/// `accept` that fails with `EAGAIN` costs far more: Linux allocates a whole socket,
/// file and inode for it first and frees them again. `true` when `poll` fails, so that
/// the caller tries `accept` and learns the truth there.
pub(crate) fn connection_waiting(listener: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        &listener,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).map_or(true, |ready| ready > 0)
}

/// `accept4` with the new socket non-blocking and close-on-exec: one system call.
pub(crate) fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::net::SocketFlags;
    Ok(rustix::net::accept_with(
        listener,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
    )?)
}

/// Makes a descriptor non-blocking (`FIONBIO`), and hands it back.
pub(crate) fn set_nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    Ok(fd)
}

/// `accept` failed for this one connection only (it was reset before we took it).
pub(crate) fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::CONNABORTED | Errno::INTR | Errno::PROTO | Errno::PERM)
    )
}

/// How a failed send to a worker's channel is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFailure {
    /// The socket buffer is full: retry once it is writable.
    Full,
    /// The worker's end is closed: it is gone.
    Gone,
    /// Anything else (`ETOOMANYREFS`: too many descriptors in flight for this user;
    /// `ENOBUFS`, `ENOMEM`): the worker is fine, retry a little later.
    Busy,
}

/// Classifies a send error. Only a closed peer means the worker is gone.
pub(crate) fn send_failure(e: &io::Error) -> SendFailure {
    if e.kind() == io::ErrorKind::WouldBlock {
        return SendFailure::Full;
    }
    match Errno::from_io_error(e) {
        Some(Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN | Errno::CONNREFUSED) => {
            SendFailure::Gone
        }
        _ => SendFailure::Busy,
    }
}

/// `recv` into the unfilled part of `buf`, without asking tokio's reactor: for a
/// socket whose reads do not go through tokio (yet). `WouldBlock` if nothing is there.
pub(crate) fn recv_now(socket: BorrowedFd<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: `recv` only writes into the slice; it never de-initializes a byte.
    let unfilled = unsafe { buf.unfilled_mut() };
    let ((received, _), _) = rustix::net::recv(socket, unfilled, RecvFlags::DONTWAIT)?;
    let n = received.len();
    // SAFETY: `recv` initialized the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

/// `send` (no `SIGPIPE`), without asking tokio's reactor.
pub(crate) fn send_now(socket: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        socket,
        data,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// `sendmsg` of several buffers (no `SIGPIPE`), without asking tokio's reactor.
pub(crate) fn send_vectored_now(
    socket: BorrowedFd<'_>,
    bufs: &[io::IoSlice<'_>],
) -> io::Result<usize> {
    // Linux takes at most `UIO_MAXIOV` (1024) buffers per call; a short write says
    // the rest goes in the next.
    Ok(rustix::net::sendmsg(
        socket,
        &bufs[..bufs.len().min(1024)],
        &mut rustix::net::SendAncillaryBuffer::default(),
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// A connected TCP socket's peer address.
pub(crate) fn peer_addr(socket: BorrowedFd<'_>) -> Option<std::net::SocketAddr> {
    rustix::net::getpeername(socket).ok()??.try_into().ok()
}

/// A TCP socket's local address.
pub(crate) fn local_addr(socket: BorrowedFd<'_>) -> Option<std::net::SocketAddr> {
    rustix::net::getsockname(socket).ok()?.try_into().ok()
}

/// The error says only that the socket was not ready (or the call was interrupted):
/// wait for the reactor and try again.
pub(crate) fn is_not_ready(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// `shutdown(SHUT_RDWR)`: ends both directions of a socket for every holder.
pub(crate) fn shutdown(socket: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(socket, rustix::net::Shutdown::Both)?)
}

/// `shutdown(SHUT_WR)`: the peer reads end-of-file once it has read what was sent.
pub(crate) fn shutdown_write(socket: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(socket, rustix::net::Shutdown::Write)?)
}

/// Stops a listening TCP socket without closing it: pending and new connection
/// attempts are refused (`shutdown(SHUT_RD)` moves a Linux listener to CLOSE while it
/// keeps its bound address); [`resume_listening`] listens again on the same port.
pub(crate) fn pause_listening(socket: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::shutdown(socket, rustix::net::Shutdown::Read)?)
}

/// Whether `socket` is a stream socket that listens (`SO_TYPE`, `SO_ACCEPTCONN`).
pub(crate) fn is_listening_stream(socket: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(
        rustix::net::sockopt::socket_type(socket)? == rustix::net::SocketType::STREAM
            && rustix::net::sockopt::socket_acceptconn(socket)?,
    )
}

/// `listen()` again on a socket paused by [`pause_listening`].
pub(crate) fn resume_listening(socket: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    Ok(rustix::net::listen(socket, backlog)?)
}

/// Binds a Unix stream socket at `path` that only its owner may use: the socket gets
/// mode 0600 *before* `bind` creates the file (Linux takes the file's mode from the
/// socket's), so there is no window in which another user could connect.
pub(crate) fn bind_private_unix(path: &std::path::Path) -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::fs::fchmod(&socket, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::bind(&socket, &rustix::net::SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&socket, 64)?;
    Ok(socket)
}

/// `TCP_NODELAY` on a listening socket, which Linux copies to every connection
/// accepted on it (a Node.js worker fed sockets through `server.emit('connection')`
/// does not set it, nor does a Rust worker). Best effort: not an error on a Unix
/// socket.
pub(crate) fn set_nodelay(socket: BorrowedFd<'_>) {
    let _ = rustix::net::sockopt::set_tcp_nodelay(socket, true);
}

/// Whether `TCP_NODELAY` is on (false for a Unix socket).
#[cfg(test)]
pub(crate) fn tcp_nodelay(socket: BorrowedFd<'_>) -> bool {
    rustix::net::sockopt::tcp_nodelay(socket).unwrap_or(false)
}

/// The user id of the peer of a connected Unix socket.
///
/// Through tokio's `peer_cred`, which reads `SO_PEERCRED` into plain integers: rustix's
/// `UCred` holds the pid as a non-zero type, and the kernel says pid 0 for a peer in a
/// PID namespace this process cannot see (a client on the host, a master in a
/// container).
pub(crate) fn peer_uid(socket: &tokio::net::UnixStream) -> io::Result<u32> {
    Ok(socket.peer_cred()?.uid())
}

/// Whether this process may execute the file at `path` (`access(X_OK)`: the mode
/// bits, for this process's user and groups; for root, any execute bit).
pub(crate) fn executable(path: &std::path::Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

/// This process's real user id.
pub(crate) fn getuid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The calling process's id, as the kernel knows it.
pub(crate) fn getpid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// The soft limit on open descriptors (`RLIMIT_NOFILE`), if there is one.
pub(crate) fn nofile_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Registers a socket object with tokio's reactor, for reading and writing.
pub(crate) fn register_owned<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>>
where
    OwnedFd: From<T>,
{
    register_owned_for(
        inner,
        tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
    )
}

/// [`register_owned`], handing the socket back when it cannot be registered (epoll
/// out of memory), so that the caller can try again.
pub(crate) fn try_register_owned<T: AsRawFd>(
    inner: T,
) -> Result<tokio::io::unix::AsyncFd<T>, (T, io::Error)>
where
    OwnedFd: From<T>,
{
    // SAFETY: as in `register_owned_for`: `inner` owns an open descriptor, keeps it
    // open and unchanged while the AsyncFd holds it, and reports the same number.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            inner,
            tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
        )
    }
    .map_err(|e| e.into_parts())
}

/// Registers a socket object with tokio's reactor for the readiness in `interest` only.
///
/// `OwnedFd: From<T>` means `T` owns its descriptor outright (std sockets, and enums
/// of them); such a `T` keeps it open until dropped and always reports the same
/// number, which is what `AsyncFd::register_with_interest` requires.
pub(crate) fn register_owned_for<T: AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>>
where
    OwnedFd: From<T>,
{
    // SAFETY: per the bound above, `inner` owns an open descriptor, keeps it open and
    // unchanged for as long as the AsyncFd holds it (until drop or into_inner), and
    // `as_raw_fd` returns that same number every time.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, interest) }
        .map_err(io::Error::from)
}

/// SIGTTIN, SIGTTOU: gunicorn's "one worker more / fewer".
pub(crate) const SIGTTIN: i32 = Signal::TTIN.as_raw();
pub(crate) const SIGTTOU: i32 = Signal::TTOU.as_raw();

/// A worker process the master may signal, held from spawn to reap.
///
/// Signals go through a pidfd (Linux 5.3+): once the process has been reaped the
/// pidfd refers to nothing and a signal fails with `ESRCH`, so a reaped pid that the
/// kernel gave to another process can never be hit. The worker's process group is
/// signalled by its id, the worker's pid, and only while the worker is not reaped: a
/// group id cannot be given to another group while its leader, even a zombie, holds
/// it. [`ProcessHandle::reap`] kills what the worker left in its group before it
/// reaps it, and [`ProcessHandle::kill`] does nothing once it has. On kernels without
/// pidfds the handle signals by pid, under the same rule.
#[derive(Debug, Clone)]
pub(crate) struct ProcessHandle {
    inner: std::sync::Arc<ProcessInner>,
}

#[derive(Debug)]
struct ProcessInner {
    pid: Pid,
    pidfd: Option<OwnedFd>,
    /// Set, under the lock, once the process is reaped: no signal after that.
    reaped: std::sync::Mutex<bool>,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`, a child of this process that has not been reaped (the
    /// caller holds its `Child` and has not waited for it yet, so the pid cannot have
    /// been reused).
    pub(crate) fn open(pid: u32) -> io::Result<ProcessHandle> {
        let pid = Pid::from_raw(pid as i32)
            .ok_or_else(|| io::Error::from_raw_os_error(Errno::INVAL.raw_os_error()))?;
        // Without pidfds (ENOSYS: kernel before 5.3; EPERM: a seccomp profile that
        // refuses them) the handle signals by pid. The pid is our unreaped child's,
        // so it cannot be reused until we reap it. Any other error (EMFILE) is one.
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            Err(Errno::NOSYS | Errno::PERM) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(ProcessHandle {
            inner: std::sync::Arc::new(ProcessInner {
                pid,
                pidfd,
                reaped: std::sync::Mutex::new(false),
            }),
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.inner.pid.as_raw_nonzero().get() as u32
    }

    /// A handle without a pidfd, as on a kernel without them.
    #[cfg(test)]
    fn without_pidfd(pid: u32) -> ProcessHandle {
        let handle = ProcessHandle::open(pid).expect("handle");
        ProcessHandle {
            inner: std::sync::Arc::new(ProcessInner {
                pid: handle.inner.pid,
                pidfd: None,
                reaped: std::sync::Mutex::new(false),
            }),
        }
    }

    fn reaped(&self) -> std::sync::MutexGuard<'_, bool> {
        self.inner.reaped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGKILLs the process, and every process left in its process group (workers are
    /// started as group leaders: `sh -c 'sleep 30 & exec worker'` leaves `sleep` in
    /// the worker's group). A process already gone is not an error, nor one reaped.
    pub(crate) fn kill(&self) -> io::Result<()> {
        let reaped = self.reaped();
        if *reaped {
            return Ok(());
        }
        self.kill_group_unreaped();
        let sent = match &self.inner.pidfd {
            Some(pidfd) => rustix::process::pidfd_send_signal(pidfd, Signal::KILL),
            None => rustix::process::kill_process(self.inner.pid, Signal::KILL),
        };
        drop(reaped);
        match sent {
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// SIGKILLs what is in the worker's process group. Only while the worker is not
    /// reaped (the caller holds the lock and saw `reaped` false): the group id is the
    /// worker's pid, which names no other group while the worker holds it.
    fn kill_group_unreaped(&self) {
        let _ = rustix::process::kill_process_group(self.inner.pid, Signal::KILL);
    }

    /// Waits for the process to exit, SIGKILLs what it left in its process group (no
    /// descendant outlives a worker there), then reaps it.
    pub(crate) async fn reap(&self, mut child: tokio::process::Child) -> io::Result<ExitStatus> {
        self.exited().await;
        {
            let mut reaped = self.reaped();
            // Only once it has exited: a worker alive is not its group's to lose.
            if self.exit_state() == Some(true) {
                self.kill_group_unreaped();
            }
            if let Some(status) = child.try_wait()? {
                *reaped = true;
                return Ok(status);
            }
        }
        // Not reapable yet (`exited` could not wait): reaped the usual way, and the
        // group is not signalled again.
        let status = child.wait().await;
        *self.reaped() = true;
        status
    }

    /// Whether the process has exited and is not reaped (`waitid` with `WNOHANG` and
    /// `WNOWAIT`, which leaves it to be reaped); `None` when that cannot be told (it
    /// was reaped by someone else: `ECHILD`).
    fn exit_state(&self) -> Option<bool> {
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        waitid(WaitId::Pid(self.inner.pid), options)
            .ok()
            .map(|s| s.is_some())
    }

    /// Returns once the process has exited (a zombie, not reaped).
    async fn exited(&self) {
        if let Some(pidfd) = &self.inner.pidfd {
            // A pidfd is readable once its process has exited.
            if let Ok(fd) = pidfd.try_clone() {
                if let Ok(fd) = register_owned_for(fd, tokio::io::Interest::READABLE) {
                    let _ = fd.readable().await;
                    return;
                }
            }
        }
        // No pidfd to poll: asked again at each SIGCHLD (the stream is made before the
        // first question, so no exit falls between), and every second regardless.
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        while self.exit_state() == Some(false) {
            let tick = tokio::time::sleep(Duration::from_secs(1));
            match &mut sigchld {
                Some(stream) => {
                    tokio::select! {
                        _ = stream.recv() => {}
                        () = tick => {}
                    }
                }
                None => tick.await,
            }
        }
    }
}

/// How a reaped process ended.
pub(crate) type ExitStatus = std::process::ExitStatus;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[tokio::test]
    async fn reaping_kills_what_the_process_left_in_its_group_first() {
        reap_kills_the_group(false).await;
    }

    #[tokio::test]
    async fn without_a_pidfd_the_exit_is_seen_at_sigchld() {
        reap_kills_the_group(true).await;
    }

    async fn reap_kills_the_group(without_pidfd: bool) {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; exit 7"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("pid");
        let handle = if without_pidfd {
            ProcessHandle::without_pidfd(pid)
        } else {
            ProcessHandle::open(pid).expect("handle")
        };
        let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).await.expect("read");
        let left: u32 = line.trim().parse().expect("the sleep's pid");
        let status = tokio::time::timeout(Duration::from_secs(10), handle.reap(child))
            .await
            .expect("reaped in time")
            .expect("reaped");
        assert_eq!(status.code(), Some(7));
        // The sleep, SIGKILLed while its group still existed: gone, or a zombie until
        // whoever adopted it reaps it.
        let mut gone = false;
        for _ in 0..500 {
            match std::fs::read_to_string(format!("/proc/{left}/stat")) {
                Err(_) => gone = true,
                Ok(stat) => {
                    gone = stat
                        .rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                }
            }
            if gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone, "the process the worker left in its group lives on");
        // Reaped: nothing is signalled any more, by pid or by group.
        assert!(*handle.reaped());
        handle.kill().expect("a no-op");
    }

    #[test]
    fn a_waiting_connection_is_seen_without_accepting_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(!connection_waiting(listener.as_fd()), "nothing yet");
        // On loopback `connect` returns once the connection is in the accept queue.
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        assert!(connection_waiting(listener.as_fd()), "one waits");
        assert!(connection_waiting(listener.as_fd()), "and is still there");
        let _accepted = listener.accept().expect("accept");
        assert!(!connection_waiting(listener.as_fd()), "taken");
    }

    #[test]
    fn received_fds_are_cloexec_and_counted() {
        let (a, b) = UnixStream::pair().expect("pair");
        let files: Vec<std::fs::File> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        sendfd::SendWithFd::send_with_fd(&a, b"abc", &raw).expect("send");
        let mut buf = [0u8; 16];
        let mut fds = VecDeque::new();
        let got = recv_with_fds(b.as_fd(), &mut buf, &mut fds).expect("recv");
        assert_eq!(got.bytes, 3);
        assert!(!got.truncated);
        assert_eq!(fds.len(), 3);
        for fd in &fds {
            let flags = rustix::io::fcntl_getfd(fd).expect("flags");
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        }
    }

    #[test]
    fn adopt_rejects_closed_and_non_sockets() {
        assert!(adopt_inherited_socket(-1).is_err());
        assert!(adopt_inherited_socket(987_654).is_err());
        let file = std::fs::File::open("/dev/null").expect("open");
        let err = adopt_inherited_socket(file.as_raw_fd()).expect_err("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn socket_inodes_match() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let ino = inode(a.as_fd()).expect("fstat");
        assert_eq!(socket_inode_of(a.as_raw_fd()), Some(ino));
        let file = std::fs::File::open("/dev/null").expect("open");
        assert_eq!(socket_inode_of(file.as_raw_fd()), None);
    }

    #[test]
    fn send_failures_are_classified() {
        let e = |errno: Errno| io::Error::from_raw_os_error(errno.raw_os_error());
        assert_eq!(send_failure(&e(Errno::AGAIN)), SendFailure::Full);
        assert_eq!(send_failure(&e(Errno::PIPE)), SendFailure::Gone);
        assert_eq!(send_failure(&e(Errno::CONNRESET)), SendFailure::Gone);
        // In-flight descriptors over the sender's RLIMIT_NOFILE: the worker is fine.
        assert_eq!(send_failure(&e(Errno::TOOMANYREFS)), SendFailure::Busy);
        assert_eq!(send_failure(&e(Errno::NOBUFS)), SendFailure::Busy);
    }

    #[test]
    fn a_reaped_child_cannot_be_signalled() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let handle = ProcessHandle::open(child.id()).expect("pidfd");
        child.wait().expect("reap");
        // Whatever now runs under that pid, the handle reaches nothing.
        handle.kill().expect("a gone process is not an error");
    }

    #[test]
    fn private_unix_sockets_are_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rr-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let _socket = bind_private_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
