//! The operating-system calls of the crate, through `rustix`'s safe wrappers, plus the
//! five things that have no safe wrapper: adopting a descriptor number named by the
//! environment, the hook that runs in a forked child before `exec`, registering a
//! socket or a pidfd with tokio's reactor (`AsyncFd::register_with_interest`, unsafe
//! since tokio 1.52 for I/O safety; three blocks), a `recv` into the uninitialized part
//! of a tokio `ReadBuf` (two blocks: the buffer's unfilled part, then marking what
//! `recv` filled), and borrowing the descriptor numbers a frame carries for `sendmsg`.
//! Those eight blocks are the crate's only `unsafe` code, each with its safety
//! argument. The rest of the crate is `#![deny(unsafe_code)]` and sees only functions
//! taking `OwnedFd` and `BorrowedFd`.
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
/// - inherit no descriptor of the master's but its standard streams and `channel`:
///   every descriptor from 3 up is made close-on-exec (what the master itself opens
///   already is; this catches what it inherited without the flag: a lock file, a
///   readiness pipe, sockets of a service manager it did not adopt), found in
///   `/proc/self/fd` (without `/proc`, nothing is changed);
/// - inherit `channel` (which is close-on-exec in the master) across `exec`, as
///   descriptor [`WORKER_CHANNEL_FD`] (3) whatever its number in the master: a master
///   with many descriptors has its channels at numbers above a worker's soft limit
///   (below), where a program that uses `select` could not use them. The number the
///   channel has in the master is closed at `exec` like the rest;
/// - get back the soft `RLIMIT_NOFILE` the master had before
///   [`raise_nofile_limit`] raised it (a program that uses `select` cannot take
///   descriptors above 1023; a worker raises its own limit if it wants more).
///
/// The caller spawns from a thread that lives as long as the master: the death signal
/// follows the spawning thread, not the process. It keeps the returned
/// [`ChannelSlot`] until the spawn has returned.
pub(crate) fn prepare_worker_command(
    cmd: &mut tokio::process::Command,
    channel: BorrowedFd<'_>,
    master_pid: u32,
) -> ChannelSlot {
    use std::mem::ManuallyDrop;
    // The spawn makes a close-on-exec pipe for the child to report a failed `exec`
    // on; were the child's end of it at 3, the `dup2` below would replace it (the
    // spawn would pass for a success, and the child would write its `exec` error
    // into the channel). With 3 taken in the master while the spawn runs (by a copy
    // of the channel, if 3 was free), no descriptor the spawn makes is 3. Best
    // effort: without it, 3 was in use already.
    let slot = ChannelSlot {
        _reserved: rustix::io::fcntl_dupfd_cloexec(channel, WORKER_CHANNEL_FD)
            .ok()
            .filter(|copy| copy.as_raw_fd() == WORKER_CHANNEL_FD),
    };
    let fd = channel.as_raw_fd();
    let master = Pid::from_raw(master_pid as i32);
    let nofile = NOFILE_SOFT_BEFORE_RAISE.get().map(|&soft| {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        rustix::process::Rlimit {
            current: Some(hard.map_or(soft, |hard| soft.min(hard))),
            maximum: hard,
        }
    });
    // SAFETY: the closure runs in the forked child before exec. It makes only raw
    // system calls through rustix's linux_raw backend (prctl, getppid, open, getdents64,
    // fcntl, dup2, close, prlimit64), which are async-signal-safe, allocates nothing
    // (the directory is read into a buffer on the stack, its path is a literal C
    // string, errors are built from raw OS codes) and takes no lock. `fd` is open in
    // the child: the master keeps its copy open until `spawn` returns, and the child's
    // table is a copy of the master's. Each number borrowed from `/proc/self/fd` is
    // open in the child while it is borrowed: nothing in the child closes a
    // descriptor meanwhile (the child runs this one thread), and only its flags are
    // changed. Descriptor 3 is borrowed (and owned, without ever being closed:
    // `ManuallyDrop`) only once it is known open: `F_DUPFD_CLOEXEC` from 3 up gave a
    // higher number, or `dup2` just made it. Whatever 3 was before is not needed:
    // 0 to 2 are the standard streams, every other descriptor is close-on-exec (the
    // loop above; the spawn's own are too), and none of the spawn's is 3 (`slot`).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
            if rustix::process::getppid() != master {
                // The master died before the death signal was armed.
                return Err(io::Error::from_raw_os_error(Errno::SRCH.raw_os_error()));
            }
            if let Ok(dir) = rustix::fs::open(
                c"/proc/self/fd",
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ) {
                let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
                let mut entries = rustix::fs::RawDir::new(&dir, &mut buf);
                while let Some(Ok(entry)) = entries.next() {
                    if let Some(n) = fd_number(entry.file_name().to_bytes()) {
                        if n > 2 {
                            let _ = rustix::io::fcntl_setfd(
                                BorrowedFd::borrow_raw(n),
                                rustix::io::FdFlags::CLOEXEC,
                            );
                        }
                    }
                }
            }
            let os = |e: Errno| io::Error::from_raw_os_error(e.raw_os_error());
            if fd != WORKER_CHANNEL_FD {
                let channel = BorrowedFd::borrow_raw(fd);
                // The lowest free number from 3 up: 3 itself if it is free.
                let copy =
                    rustix::io::fcntl_dupfd_cloexec(channel, WORKER_CHANNEL_FD).map_err(os)?;
                if copy.as_raw_fd() == WORKER_CHANNEL_FD {
                    let _ = ManuallyDrop::new(copy); // kept: it is the channel now
                } else {
                    // 3 is open: replaced by the channel (atomically, with `dup2`).
                    drop(copy);
                    let mut three = ManuallyDrop::new(OwnedFd::from_raw_fd(WORKER_CHANNEL_FD));
                    rustix::io::dup2(channel, &mut three).map_err(os)?;
                }
            }
            // Inherited across `exec`: neither `dup2` onto the channel's own number
            // nor `F_DUPFD_CLOEXEC` clears close-on-exec.
            rustix::io::fcntl_setfd(
                BorrowedFd::borrow_raw(WORKER_CHANNEL_FD),
                rustix::io::FdFlags::empty(),
            )
            .map_err(os)?;
            if let Some(limit) = nofile {
                // Best effort: the worker runs with the raised limit otherwise.
                let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
            }
            Ok(())
        });
    }
    slot
}

/// The descriptor number a worker finds its channel at (`RR_CLUSTER_CHANNEL_FD`,
/// `NODE_CHANNEL_FD`), the first after the standard streams, whatever number the
/// channel has in the master.
pub(crate) const WORKER_CHANNEL_FD: RawFd = 3;

/// Descriptor 3 of the master, taken (by a copy of the channel) while a worker is
/// spawned if it was free: see [`prepare_worker_command`]. Dropped once the spawn has
/// returned.
#[must_use = "held until the spawn returns"]
#[derive(Debug)]
pub(crate) struct ChannelSlot {
    _reserved: Option<OwnedFd>,
}

/// A descriptor number from its name in `/proc/self/fd` (`None` for `.` and `..`).
/// Allocation-free: it runs in a forked child.
fn fd_number(name: &[u8]) -> Option<RawFd> {
    if name.is_empty() || name.len() > 10 {
        return None;
    }
    let mut n: i64 = 0;
    for &b in name {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(b - b'0');
    }
    RawFd::try_from(n).ok()
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

/// Whether this process may write to the file at `path` (`access(W_OK)`: the mode
/// bits for this process's user and groups, and a read-only file system; for root,
/// only the latter).
pub(crate) fn writable(path: &std::path::Path) -> io::Result<()> {
    Ok(rustix::fs::access(path, rustix::fs::Access::WRITE_OK)?)
}

/// Whether this process may create a file in the directory `dir` (`access(W_OK |
/// X_OK)`, as [`writable`]).
pub(crate) fn can_create_in(dir: &std::path::Path) -> io::Result<()> {
    Ok(rustix::fs::access(
        dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )?)
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

/// The soft `RLIMIT_NOFILE` of the process before [`raise_nofile_limit`] first raised
/// it: what worker processes are given back.
static NOFILE_SOFT_BEFORE_RAISE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// What [`raise_nofile_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NofileRaise {
    /// The soft limit was raised from `from` to the hard limit `to`.
    Raised { from: u64, to: u64 },
    /// The soft limit is the hard limit already (`None`: no limit).
    AtHardLimit(Option<u64>),
}

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit: a
/// master holds a few descriptors per worker (its channel, a pidfd, the output
/// pipes) besides the connections it passes on, and the usual soft limit is 1024.
/// Workers get the soft limit from before back ([`prepare_worker_command`]).
pub(crate) fn raise_nofile_limit() -> io::Result<NofileRaise> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            )?;
            let _ = NOFILE_SOFT_BEFORE_RAISE.set(soft);
            Ok(NofileRaise::Raised {
                from: soft,
                to: hard,
            })
        }
        (soft, _) => Ok(NofileRaise::AtHardLimit(soft)),
    }
}

/// Whether the peer of a connected Unix stream socket has closed it altogether
/// (`POLLHUP`), not only shut down its writing side (then only end-of-file is read,
/// and an answer written still reaches it).
pub(crate) fn peer_hung_up(socket: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        &socket,
        rustix::event::PollFlags::empty(),
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR)
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
        if self.inner.pidfd.is_some() {
            // A pidfd is readable once its process has exited. The handle's own pidfd
            // is watched (no copy: a master holds enough descriptors per worker).
            let watch = PidfdWatch(std::sync::Arc::clone(&self.inner));
            // SAFETY: `PidfdWatch` holds the `ProcessInner` that owns the pidfd, which
            // is never replaced nor closed while an `Arc` to it lives: the number
            // `as_raw_fd` returns is open, the same file, and the same number for as
            // long as the AsyncFd holds the watch.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    watch,
                    tokio::io::Interest::READABLE,
                )
            };
            if let Ok(fd) = registered {
                let _ = fd.readable().await;
                return;
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

/// A process's pidfd, as the reactor watches it: borrowed from the handle's
/// `ProcessInner`, which it keeps alive. Made only for a process with a pidfd.
struct PidfdWatch(std::sync::Arc<ProcessInner>);

impl AsRawFd for PidfdWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
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

    #[tokio::test]
    async fn a_reaped_child_cannot_be_signalled() {
        let child = tokio::process::Command::new("true")
            .process_group(0)
            .spawn()
            .expect("spawn");
        let handle = ProcessHandle::open(child.id().expect("pid")).expect("pidfd");
        // Reaped through the handle (a `wait` of its own would leave the handle
        // believing the pid, and its process group id, still the worker's).
        let status = tokio::time::timeout(Duration::from_secs(10), handle.reap(child))
            .await
            .expect("reaped in time")
            .expect("reaped");
        assert!(status.success());
        assert!(*handle.reaped(), "the handle knows");
        // Whatever now runs under that pid, or leads that group, the handle reaches
        // nothing: `kill` returns before any signal.
        handle.kill().expect("a no-op");
    }

    /// The descriptors of this process that are pidfds of `pid` (`Pid:` in fdinfo).
    fn pidfds_of(pid: u32) -> usize {
        std::fs::read_dir("/proc/self/fdinfo")
            .expect("fdinfo")
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|info| info.lines().any(|l| l == format!("Pid:\t{pid}")))
            })
            .count()
    }

    /// The handle watches its own pidfd for the exit: a master holds no copy of it
    /// per worker.
    #[tokio::test]
    async fn waiting_for_the_exit_copies_no_descriptor() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "read line"])
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn");
        let stdin = child.stdin.take().expect("stdin");
        let pid = child.id().expect("pid");
        let handle = ProcessHandle::open(pid).expect("pidfd");
        assert!(handle.inner.pidfd.is_some(), "a kernel with pidfds");
        // The handle's, and any that tokio's `Child` holds for itself.
        let before = pidfds_of(pid);
        let mut exited = std::pin::pin!(handle.exited());
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(exited.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "the child waits for its input");
        // The exit is being waited for now.
        let while_waiting = pidfds_of(pid);
        drop(stdin); // the child reads end-of-file and exits
        tokio::time::timeout(Duration::from_secs(10), exited)
            .await
            .expect("exited in time");
        tokio::time::timeout(Duration::from_secs(10), handle.reap(child))
            .await
            .expect("reaped in time")
            .expect("reaped");
        assert_eq!(
            while_waiting, before,
            "pidfds of the child while its exit is awaited"
        );
    }

    #[test]
    fn descriptor_numbers_are_read_from_their_names() {
        assert_eq!(fd_number(b"0"), Some(0));
        assert_eq!(fd_number(b"1023"), Some(1023));
        assert_eq!(fd_number(b"2147483647"), Some(i32::MAX));
        assert_eq!(fd_number(b"2147483648"), None);
        assert_eq!(fd_number(b"."), None);
        assert_eq!(fd_number(b".."), None);
        assert_eq!(fd_number(b""), None);
        assert_eq!(fd_number(b"99999999999"), None);
    }

    /// Held by the tests that lower the soft descriptor limit (others only raise it).
    static NOFILE_LOWERED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Lowers the soft descriptor limit below the hard one (as systemd's 1024 of
    /// 524288), by one: parallel tests keep what they have. `None` without limits.
    /// The caller holds [`NOFILE_LOWERED`].
    fn lower_the_soft_nofile_limit() -> Option<u64> {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum?;
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard - 1),
                maximum: Some(hard),
            },
        )
        .expect("lower the soft limit");
        Some(hard)
    }

    /// Regression: the master kept the usual soft limit of 1024 descriptors, and a
    /// few hundred workers (each costs it a channel, pidfds, output pipes) ran it out
    /// of descriptors: boot failures, then a give-up.
    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
        let _lowered = NOFILE_LOWERED.blocking_lock();
        let Some(hard) = lower_the_soft_nofile_limit() else {
            return; // no hard limit: nothing to raise to
        };
        let raised = raise_nofile_limit().expect("raise");
        // Another test's master may have raised it first.
        assert!(
            raised
                == NofileRaise::Raised {
                    from: hard - 1,
                    to: hard
                }
                || raised == NofileRaise::AtHardLimit(Some(hard)),
            "{raised:?}"
        );
        assert_eq!(nofile_limit(), Some(hard));
        assert_eq!(
            raise_nofile_limit().expect("again"),
            NofileRaise::AtHardLimit(Some(hard))
        );
    }

    /// Regression: descriptors the master inherited without close-on-exec (a lock
    /// file, a readiness pipe, sockets of a service manager it did not adopt) leaked
    /// into every worker. The channel stays open, and the worker gets the soft
    /// descriptor limit from before the master raised its own.
    ///
    /// Regression (review, sixth round): the worker got its channel at the master's
    /// number for it, which in a master holding over a thousand descriptors is above
    /// the worker's (restored) soft limit, of no use to `select`. It is at 3 now, and
    /// the master's number is closed.
    #[tokio::test]
    async fn a_worker_inherits_its_channel_and_no_other_descriptor() {
        let inherited = std::fs::File::open("/dev/null").expect("open");
        rustix::io::fcntl_setfd(&inherited, rustix::io::FdFlags::empty()).expect("no cloexec");
        let (_ours, theirs) = UnixStream::pair().expect("pair");
        let _lowered = NOFILE_LOWERED.lock().await;
        let hard = lower_the_soft_nofile_limit();
        raise_nofile_limit().expect("raise");
        // As in a master with many descriptors (where the limit allows).
        let theirs = rustix::io::fcntl_dupfd_cloexec(&theirs, 1500)
            .or_else(|_| rustix::io::fcntl_dupfd_cloexec(&theirs, 10))
            .expect("dup");
        let (leak, channel) = (inherited.as_raw_fd(), theirs.as_raw_fd());
        let socket = inode(theirs.as_fd()).expect("inode");
        let script = format!(
            "for fd in {leak} {channel}; do \
               if [ -e /proc/self/fd/$fd ]; then echo open; else echo closed; fi; \
             done; readlink /proc/$$/fd/{WORKER_CHANNEL_FD}; ulimit -Sn"
        );
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .process_group(0);
        let slot = prepare_worker_command(&mut cmd, theirs.as_fd(), getpid());
        let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
            .await
            .expect("in time")
            .expect("ran");
        drop(slot);
        drop(inherited);
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        let at_three = format!("socket:[{socket}]");
        assert_eq!(
            lines.get(..3),
            Some(&["closed", "closed", at_three.as_str()][..]),
            "descriptors {leak} and {channel}, then 3: {out}"
        );
        if let (Some(hard), Some(before)) = (hard, NOFILE_SOFT_BEFORE_RAISE.get()) {
            assert_eq!(nofile_limit(), Some(hard), "the master's own, raised");
            assert!(*before < hard);
            assert_eq!(lines.get(3), Some(&before.to_string().as_str()), "{out}");
        }
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
