//! Every `unsafe` block and every `libc` call of the crate, each with its safety
//! argument. The rest of the crate is `#![deny(unsafe_code)]` and sees only safe
//! functions taking `OwnedFd`/`BorrowedFd`.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors the kernel attaches to one `sendmsg` (`SCM_MAX_FD`). A `recvmsg` on
/// a stream socket returns the descriptors of at most one `sendmsg`, so a control
/// buffer of this size is never truncated by a well-formed peer.
pub(crate) const SCM_MAX_FD: usize = 253;

/// Room for one `cmsghdr` carrying `SCM_MAX_FD` descriptors, aligned for `cmsghdr`.
const CMSG_WORDS: usize = (mem::size_of::<libc::cmsghdr>() + SCM_MAX_FD * 4).div_ceil(8) + 1;

/// What one `recvmsg` brought.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    /// Bytes written to the front of the buffer; 0 means end of stream.
    pub(crate) bytes: usize,
    /// The kernel dropped descriptors because the control buffer was too small
    /// (`MSG_CTRUNC`). Never happens with a peer that obeys `SCM_MAX_FD`.
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
    let mut cmsg_space = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_space.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&cmsg_space) as _;

    // SAFETY: `socket` is a live descriptor for the duration of the call; `msg` points
    // at `iov` (describing `buf`, writable for `buf.len()` bytes) and at `cmsg_space`
    // (writable for `msg_controllen` bytes, 8-byte aligned); all outlive the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }

    // SAFETY: `msg` was filled in by a successful recvmsg, so the CMSG_* walk stays
    // within `msg_controllen` bytes of `cmsg_space`. Each SCM_RIGHTS payload holds
    // `(cmsg_len - CMSG_LEN(0)) / 4` descriptors that the kernel just installed in our
    // table and that nothing else owns, so wrapping each in an OwnedFd is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let payload = header.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push_back(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Takes ownership of a descriptor named by the environment (`RR_CLUSTER_CHANNEL_FD`,
/// `LISTEN_FDS`): checks that it is open and a socket, and marks it close-on-exec so
/// that the process's own children do not inherit it.
pub(crate) fn adopt_inherited_socket(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: fcntl(F_GETFD) on any integer is harmless; it fails with EBADF when the
    // number is not an open descriptor.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `st` is a plain-data out parameter; fstat writes it or fails.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: `raw` is open (checked above) and `st` is valid for writes.
    if unsafe { libc::fstat(raw, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not a socket"),
        ));
    }
    // SAFETY: sets a flag on an open descriptor; no memory is involved.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the environment handed this descriptor to this process to own; it is open
    // (checked above) and no other object in this process claims it: callers adopt each
    // inherited number once, and remove the variable that named it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
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
    let master_pid = master_pid as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec. It only calls
    // async-signal-safe functions (prctl, getppid, fcntl), does not allocate (the error
    // values are built from raw OS codes), and touches no lock. `fd` stays open in the
    // child because the master keeps its end open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != master_pid {
                // The master died before the death signal was armed.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Writes all of `bytes` to a non-blocking socket from a context that cannot await
/// (a panic hook), waiting with `poll` for room, for at most `timeout` in all.
pub(crate) fn send_all_for(
    socket: BorrowedFd<'_>,
    mut bytes: &[u8],
    timeout: std::time::Duration,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of `bytes.len()` bytes and `socket` is open
        // for the duration of the call. MSG_NOSIGNAL: a closed peer is an error, not
        // SIGPIPE.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            bytes = &bytes[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {}
            _ => return Err(err),
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, and the count passed is 1.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
    }
    Ok(())
}

/// Registers a socket object with tokio's reactor.
///
/// `OwnedFd: From<T>` means `T` owns its descriptor outright (std sockets, and enums
/// of them); such a `T` keeps it open until dropped and always reports the same
/// number, which is what `AsyncFd::register` requires.
pub(crate) fn register_owned<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>>
where
    OwnedFd: From<T>,
{
    // SAFETY: per the bound above, `inner` owns an open descriptor, keeps it open and
    // unchanged for as long as the AsyncFd holds it (until drop or into_inner), and
    // `as_raw_fd` returns that same number every time.
    unsafe { tokio::io::unix::AsyncFd::register(inner) }.map_err(io::Error::from)
}

/// `accept` failed for lack of descriptors or memory: retrying at once would spin.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// `accept` failed for this one connection only (it was reset before we took it).
pub(crate) fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
    )
}

/// `shutdown(SHUT_RDWR)`: ends both directions of a socket for every holder.
pub(crate) fn shutdown(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor that is open for the duration of the call.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTTIN, SIGTTOU: gunicorn's "one worker more / fewer".
pub(crate) const SIGTTIN: i32 = libc::SIGTTIN;
pub(crate) const SIGTTOU: i32 = libc::SIGTTOU;

/// Signals the master sends to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Kill,
}

/// Sends `sig` to process `pid`. A process that is already gone is not an error.
pub(crate) fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    if pid <= 0 {
        // 0 and negatives address process groups: never what the caller meant.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let signo = match sig {
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) with a positive pid addresses one process; no memory involved.
    if unsafe { libc::kill(pid, signo) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// The calling process's id, as the kernel knows it.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

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
        let got = recv_with_fds(std::os::fd::AsFd::as_fd(&b), &mut buf, &mut fds).expect("recv");
        assert_eq!(got.bytes, 3);
        assert!(!got.truncated);
        assert_eq!(fds.len(), 3);
        for fd in &fds {
            // SAFETY-free check through std: the flag is visible via fcntl in libc only,
            // so read it here (tests may call into this module's libc).
            // SAFETY: F_GETFD on an open descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0);
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
    fn kill_refuses_process_groups() {
        assert!(kill(0, Signal::Kill).is_err());
        assert!(kill(u32::MAX, Signal::Kill).is_err());
    }
}
