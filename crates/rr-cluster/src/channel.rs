//! A framed Unix stream that carries file descriptors: the link between the master
//! and one worker.
//!
//! Sending: each frame goes out in one `sendmsg` (descriptors as `SCM_RIGHTS`; with
//! `MSG_NOSIGNAL`, a closed peer is an error, never `SIGPIPE`); a partial write keeps the rest of the frame in a pending buffer that is
//! flushed before any later frame, so frames never interleave. Sends never block:
//! [`ChannelWriter::try_send`] reports a full channel instead.
//!
//! The reactor watches the socket for reading only. A registration for writability
//! would wake the process every time the peer reads (Linux signals write space to the
//! writer on each read), which for the master is once per frame it sends. Sends are
//! made directly; only a sender that met a full socket waits for writability, through
//! a short-lived registration of a duplicate descriptor ([`ChannelWriter::writable`]).
//!
//! Receiving: a frame's descriptors travel with its first segment (one `sendmsg` per
//! frame; a tail sent later carries none), and on Linux a `recvmsg` on a stream socket
//! stops right after a segment that carried descriptors, or within it when the buffer
//! is full. So the descriptors a read returns belong to the frame holding the read's
//! last byte. The reader keeps them with that byte's offset in the stream; each frame
//! takes the descriptors read with a byte of its own, and must take as many as its
//! message names ([`Message::fd_count`]). Any other count, or descriptors read with
//! no frame's byte, is a protocol error; stray descriptors are closed when dropped,
//! never leaked.
//!
//! A truncated control message (`MSG_CTRUNC`: the receiver's descriptor table was
//! full, so the kernel dropped descriptors) is not an error: the frame the read
//! belongs to gets the descriptors that did arrive, and the shortfall is counted in
//! [`ChannelReader::lost`]. The connections behind the dropped descriptors are lost,
//! the channel is not, and no other frame's descriptors are taken for them (a frame
//! split across reads, its first part read with its descriptors dropped, would
//! otherwise be handed the next frame's).
//!
//! The Node.js dialect ([`crate::node`]) uses the same socket with newline-delimited
//! JSON: [`ChannelReader::recv_line`]. Node's reader does not place descriptors by
//! offset: it keeps the descriptors of its latest read that brought any (one handle)
//! for the next complete `NODE_HANDLE` line. A handle line that a read cuts in two (a
//! read of 64 KiB ends inside it, which takes at least ~64 KiB of lines without
//! descriptors in front of it) is delivered with its own descriptor, but only if no
//! other handle line follows in the read that completes it: the later descriptor would
//! replace the first (the first line gets the second connection, the second none).
//! So a writer set up with [`ChannelWriter::guard_exposed_handles`] calls a send with
//! descriptors that follows [`EXPOSED_AFTER`] bytes or more without any "exposed", and
//! sends no other descriptor until the peer acknowledged it
//! ([`ChannelWriter::ack_handle`]); handle lines back to back, or after shorter runs,
//! are never cut (each read ends right after a segment that carried descriptors).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::protocol::{self, HEADER_LEN, MAX_FRAME_LEN, Message, ProtocolError};
use crate::sys;

/// Descriptors a reader holds for frames not yet complete, at most.
pub(crate) const MAX_PENDING_FDS: usize = 4 * sys::SCM_MAX_FD;

const INITIAL_BUFFER: usize = 8 * 1024;

/// How long [`ChannelWriter::writable`] waits when it cannot watch the socket.
const NO_WATCH_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// How long the background flush of a frame's tail waits after a send failed for a
/// reason that says nothing about the peer (`ENOBUFS`, `ENOMEM`).
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Retries of [`BUSY_RETRY`] in a row (10 s) before the background flush gives a
/// frame's tail up, and the channel with it.
const MAX_BUSY_RETRIES: u32 = 1000;

/// Bytes without descriptors after which a guarded writer's next send with
/// descriptors is exposed ([`ChannelWriter::guard_exposed_handles`]): half of Node's
/// 64 KiB read, so that a handle line after a shorter run always ends the read that
/// holds its first byte.
pub(crate) const EXPOSED_AFTER: u64 = 32 * 1024;

/// The longest start of a line too long that the reader keeps
/// ([`ChannelReader::too_long_line_head`]).
const LINE_HEAD: usize = 32;

/// Errors of a channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The socket failed.
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    /// A frame broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A frame claims more descriptors than have arrived.
    #[error("frame claims {claimed} descriptors but only {available} arrived")]
    MissingFds {
        /// Descriptors the frame names.
        claimed: usize,
        /// Descriptors waiting in the FIFO.
        available: usize,
    },
    /// Descriptors arrived that no frame claims; they were closed.
    #[error("{count} descriptors arrived that no frame claims")]
    UnclaimedFds {
        /// How many.
        count: usize,
    },
    /// The peer sent descriptors faster than frames claim them.
    #[error("{count} descriptors pending, more than the limit of {max}")]
    TooManyPendingFds {
        /// How many are pending.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A line of the Node.js dialect is longer than the limit.
    #[error("line of {len} bytes exceeds the limit of {max} bytes")]
    LineTooLong {
        /// Its length (so far).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("channel closed in the middle of a frame ({buffered} bytes buffered)")]
    TruncatedFrame {
        /// Bytes of the incomplete frame.
        buffered: usize,
    },
    /// The peer is gone (the channel was closed or reset).
    #[error("channel closed by the peer")]
    Closed,
}

/// Why a non-blocking send did not happen. In every case nothing was sent and the
/// caller still owns the descriptors.
#[derive(Debug)]
pub enum TrySendError {
    /// The socket buffer is full (or a previous frame is still being flushed, or,
    /// for a guarded writer, an exposed send with descriptors waits for its
    /// acknowledgement): retry once the channel is writable.
    Full,
    /// The send failed for a reason that says nothing about the peer (`ETOOMANYREFS`:
    /// too many descriptors in flight for this user; `ENOBUFS`, `ENOMEM`): retry a
    /// little later.
    Busy(io::Error),
    /// The peer is gone (`EPIPE`, `ECONNRESET`).
    Closed(io::Error),
}

impl TrySendError {
    fn from_io(e: io::Error) -> TrySendError {
        match sys::send_failure(&e) {
            sys::SendFailure::Full => TrySendError::Full,
            sys::SendFailure::Gone => TrySendError::Closed(e),
            sys::SendFailure::Busy => TrySendError::Busy(e),
        }
    }
}

/// A channel's socket, non-blocking and registered with the reactor for reading only.
#[derive(Debug)]
pub struct ChannelStream(AsyncFd<UnixStream>);

/// Splits a connected stream into its receiving and sending halves.
pub fn split(stream: ChannelStream) -> (ChannelReader, Arc<ChannelWriter>) {
    let stream = Arc::new(stream.0);
    (
        ChannelReader {
            stream: Arc::clone(&stream),
            decoder: FrameDecoder::default(),
        },
        Arc::new(ChannelWriter {
            stream,
            pending: Mutex::new(Pending::default()),
            fds_sent: AtomicU64::new(0),
            guarded: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            exposed: AtomicU64::new(0),
            long_run: AtomicBool::new(false),
            handle_acked: Notify::new(),
        }),
    )
}

/// Makes a connected stream non-blocking and registers it with the current runtime's
/// reactor, for reading.
pub fn from_std(stream: UnixStream) -> io::Result<ChannelStream> {
    stream.set_nonblocking(true)?;
    sys::register_owned_for(stream, Interest::READABLE).map(ChannelStream)
}

/// The receiving half: frames with the descriptors they claim.
#[derive(Debug)]
pub struct ChannelReader {
    stream: Arc<AsyncFd<UnixStream>>,
    decoder: FrameDecoder,
}

impl ChannelReader {
    /// The next frame and its descriptors; `Ok(None)` at a clean end of stream.
    ///
    /// Cancel-safe: bytes and descriptors read so far stay buffered in `self`.
    pub async fn recv<M: Message>(&mut self) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        self.recv_with(protocol::decode_payload::<M>).await
    }

    /// Descriptors the kernel dropped on their way in (`MSG_CTRUNC`: this process's
    /// descriptor table was full), since the reader was created. Frames that claimed
    /// them were handed out with the descriptors that did arrive.
    pub fn lost(&self) -> u64 {
        self.decoder.lost
    }

    /// Whether descriptors came with the line [`ChannelReader::recv_line`] returned or
    /// reported too long last (they were closed): a read that brought descriptors ended
    /// inside it.
    pub(crate) fn line_came_with_fds(&self) -> bool {
        self.decoder.last_line_fds
    }

    /// The first bytes (up to 32) of the line [`ChannelReader::recv_line`] reported too
    /// long last.
    pub(crate) fn too_long_line_head(&self) -> &[u8] {
        &self.decoder.long_head[..self.decoder.long_head_len]
    }

    /// The next line of the Node.js dialect, without its newline; `Ok(None)` at a clean
    /// end of stream. Descriptors that arrive with lines are closed (a Node.js worker
    /// has no business sending any to its master; [`ChannelReader::line_came_with_fds`]
    /// tells which line they came with). A line longer than `max` is
    /// [`ChannelError::LineTooLong`], once, and is skipped: the next call returns the
    /// line after it.
    ///
    /// Cancel-safe, like [`ChannelReader::recv`].
    pub async fn recv_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, ChannelError> {
        loop {
            if let Some(line) = self.decoder.next_line(max)? {
                return Ok(Some(line));
            }
            let received = self.read_more().await?;
            self.decoder.close_line_fds();
            if received.bytes == 0 {
                if self.decoder.start != self.decoder.end {
                    return Err(ChannelError::TruncatedFrame {
                        buffered: self.decoder.end - self.decoder.start,
                    });
                }
                return Ok(None);
            }
        }
    }

    /// One `recvmsg` into the decoder's buffer.
    async fn read_more(&mut self) -> Result<sys::Received, ChannelError> {
        let stream = &self.stream;
        let (spare, fds) = self.decoder.read_target();
        let received = loop {
            // `poll_read_ready` keeps the task's waker in the registration's own slot
            // (this half is the channel's only reader), where `readable()` would queue
            // a waiter, under a lock, per wait.
            let mut guard = std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
            let fds_before = fds.len();
            match guard.try_io(|socket| sys::recv_with_fds(socket.get_ref().as_fd(), spare, fds)) {
                Ok(Ok(received)) => {
                    // A read stops short of the buffer's end only when the socket is
                    // empty or at a segment that carried descriptors (even descriptors
                    // the kernel then dropped: `truncated`). Short and without any:
                    // empty, so wait for the reactor instead of making a `recvmsg`
                    // sure to fail with EAGAIN. (A segment that comes meanwhile is
                    // reported by the reactor's next turn.)
                    if received.bytes > 0
                        && received.bytes < spare.len()
                        && fds.len() == fds_before
                        && !received.truncated
                    {
                        guard.clear_ready();
                    }
                    break received;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if is_disconnect(&e) => return Err(ChannelError::Closed),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        };
        self.decoder.filled(received)?;
        Ok(received)
    }

    /// The handshake: the first frame, decoded with
    /// [`protocol::decode_hello`] so that a version mismatch is named as such.
    pub async fn recv_hello(&mut self) -> Result<Option<protocol::Hello>, ChannelError> {
        Ok(self
            .recv_with(protocol::decode_hello)
            .await?
            .map(|(hello, _)| hello))
    }

    async fn recv_with<M: Message>(
        &mut self,
        decode: fn(&[u8]) -> Result<M, ProtocolError>,
    ) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        loop {
            if let Some(frame) = self.decoder.next_frame(decode)? {
                return Ok(Some(frame));
            }
            let received = self.read_more().await?;
            if received.bytes == 0 {
                return self.decoder.at_eof().map(|()| None);
            }
        }
    }
}

/// The sending half, shared by everyone who writes to one peer.
#[derive(Debug)]
pub struct ChannelWriter {
    stream: Arc<AsyncFd<UnixStream>>,
    pending: Mutex<Pending>,
    /// Descriptors handed to the kernel, counted (under `pending`) just before the
    /// `sendmsg` that carries them, so that the peer cannot acknowledge one that is not
    /// counted yet; taken back if that `sendmsg` fails.
    fds_sent: AtomicU64,
    /// Exposed sends with descriptors are held ([`ChannelWriter::guard_exposed_handles`]).
    guarded: AtomicBool,
    /// Guarded: acknowledgements taken ([`ChannelWriter::ack_handle`]), at most
    /// `fds_sent`.
    acked: AtomicU64,
    /// Guarded: `fds_sent` just after the last exposed send (0: none yet). Nothing with
    /// descriptors goes while `acked` is below it.
    exposed: AtomicU64,
    /// Guarded: the run of bytes without descriptors since the last send with some has
    /// reached [`EXPOSED_AFTER`]: the next such send is exposed.
    long_run: AtomicBool,
    /// Guarded: an acknowledgement took `acked` up to `exposed`.
    handle_acked: Notify,
}

#[derive(Debug, Default)]
struct Pending {
    /// The unsent tail of a partially written frame.
    bytes: Vec<u8>,
    /// A task is flushing `bytes`.
    flushing: bool,
    /// [`ChannelWriter::shutdown_write`] came while `bytes` waited: half-close once
    /// they are out.
    shut_write: bool,
    /// Guarded writer: bytes sent without descriptors since the last send with some.
    run: u64,
    /// Errors the next flushes meet instead of sending (tests of failures the kernel
    /// will not produce on demand).
    #[cfg(test)]
    inject: VecDeque<io::Error>,
}

impl ChannelWriter {
    /// Sends one encoded frame (with `fds` as `SCM_RIGHTS`) without blocking.
    ///
    /// On success the kernel holds the descriptors (the caller may close its copies) and
    /// the frame will arrive whole: an unsent tail is flushed by a background task
    /// before any later frame.
    ///
    /// A guarded writer ([`ChannelWriter::guard_exposed_handles`]) reports a send with
    /// descriptors [`TrySendError::Full`] while an exposed one waits for its
    /// acknowledgement.
    pub fn try_send(self: &Arc<Self>, frame: &[u8], fds: &[RawFd]) -> Result<(), TrySendError> {
        let mut pending = self.lock();
        let guarded = self.guarded.load(Ordering::Relaxed);
        if guarded && !fds.is_empty() && self.exposed_unacked() {
            return Err(TrySendError::Full);
        }
        if !pending.bytes.is_empty() {
            match self.flush_locked(&mut pending) {
                Ok(true) => {}
                Ok(false) => return Err(TrySendError::Full),
                Err(e) => return Err(TrySendError::from_io(e)),
            }
        }
        let fds_before = self.fds_sent.load(Ordering::Relaxed);
        if !fds.is_empty() {
            self.fds_sent
                .store(fds_before + fds.len() as u64, Ordering::Release);
        }
        let written = loop {
            let socket = self.stream.get_ref().as_fd();
            let result = if fds.is_empty() {
                sys::send_now(socket, frame)
            } else {
                sys::send_with_fds(socket, frame, fds)
            };
            match result {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fds_sent.store(fds_before, Ordering::Release);
                    return Err(TrySendError::from_io(e));
                }
            }
        };
        if guarded {
            self.track_run(&mut pending, frame.len(), fds.len(), fds_before);
        }
        if written < frame.len() {
            pending.bytes.extend_from_slice(&frame[written..]);
            if !pending.flushing {
                pending.flushing = true;
                let writer = Arc::clone(self);
                tokio::spawn(async move { writer.flush_in_background().await });
            }
        }
        Ok(())
    }

    /// Guarded writer: one more send went out (`fds` descriptors, `len` bytes).
    fn track_run(&self, pending: &mut Pending, len: usize, fds: usize, fds_before: u64) {
        if fds == 0 {
            pending.run = pending.run.saturating_add(len as u64);
        } else {
            if pending.run >= EXPOSED_AFTER {
                self.exposed
                    .store(fds_before + fds as u64, Ordering::SeqCst);
            }
            pending.run = 0;
        }
        let long = pending.run >= EXPOSED_AFTER;
        if long != self.long_run.load(Ordering::Relaxed) {
            self.long_run.store(long, Ordering::Relaxed);
        }
    }

    /// Holds back sends with descriptors that could reach a Node.js reader in the same
    /// read as another's (see the module documentation): from now on, a send with
    /// descriptors after [`EXPOSED_AFTER`] bytes without any is exposed, and until
    /// [`ChannelWriter::ack_handle`] has taken its acknowledgement no other send with
    /// descriptors goes. For a peer that acknowledges each send with descriptors, in
    /// order, and gets one descriptor per send.
    pub(crate) fn guard_exposed_handles(&self) {
        self.guarded.store(true, Ordering::Relaxed);
    }

    /// Descriptors handed to the kernel so far (an upper bound on what the peer can
    /// have received: each is counted just before its `sendmsg`).
    pub(crate) fn fds_sent(&self) -> u64 {
        self.fds_sent.load(Ordering::Acquire)
    }

    /// Takes the peer's acknowledgement of a send with descriptors (Node's
    /// `NODE_HANDLE_ACK` or `NACK`, which come in order). `None` when none is owed (the
    /// acknowledgement is ignored); otherwise whether it was that of the exposed send
    /// that held the others back. Called by one task (the channel's reader).
    pub(crate) fn ack_handle(&self) -> Option<bool> {
        let acked = self.acked.load(Ordering::Relaxed);
        if acked >= self.fds_sent() {
            return None;
        }
        // SeqCst: the store-buffering pattern with `WorkerLink::wait_for_room`, which
        // reads this after setting its flag, where the caller takes the flag after
        // this.
        self.acked.store(acked + 1, Ordering::SeqCst);
        let cleared = acked + 1 == self.exposed.load(Ordering::SeqCst);
        if cleared {
            self.handle_acked.notify_waiters();
        }
        Some(cleared)
    }

    /// An exposed send with descriptors waits for its acknowledgement.
    fn exposed_unacked(&self) -> bool {
        self.exposed.load(Ordering::SeqCst) > self.acked.load(Ordering::SeqCst)
    }

    /// How many sends with descriptors may go now, as far as the guard is concerned:
    /// 0 while an exposed one waits for its acknowledgement, 1 when the next would be
    /// exposed, otherwise any number. Three loads, no lock.
    pub(crate) fn handle_room(&self) -> u64 {
        if self.exposed_unacked() {
            0
        } else if self.long_run.load(Ordering::Relaxed) {
            1
        } else {
            u64::MAX
        }
    }

    /// Completes when no exposed send with descriptors waits for its acknowledgement.
    async fn wait_handle_room(&self) {
        loop {
            let acked = self.handle_acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if !self.exposed_unacked() {
                return;
            }
            acked.await;
        }
    }

    /// Sends one frame, waiting while the channel is full (or busy: then it retries
    /// every 10 ms; or, guarded, while an exposed send with descriptors waits for its
    /// acknowledgement, if this one has descriptors).
    pub async fn send(self: &Arc<Self>, frame: &[u8], fds: &[RawFd]) -> Result<(), ChannelError> {
        loop {
            if !fds.is_empty() && self.guarded.load(Ordering::Relaxed) {
                self.wait_handle_room().await;
            }
            match self.try_send(frame, fds) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full) => self.writable().await?,
                Err(TrySendError::Busy(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(TrySendError::Closed(_)) => return Err(ChannelError::Closed),
            }
        }
    }

    /// Encodes and sends one message without descriptors, waiting while full.
    pub async fn send_msg<M: Message>(self: &Arc<Self>, msg: &M) -> Result<(), ChannelError> {
        let frame = protocol::frame(msg)?;
        self.send(&frame, &[]).await
    }

    /// Completes when the socket may accept more bytes (or has failed: the next send
    /// says how). Registers a duplicate of the socket for writability while it waits,
    /// so that nothing is woken by write space while nobody waits for it.
    ///
    /// When that watch cannot be set up (no descriptor left: `EMFILE`), it waits
    /// [`NO_WATCH_RETRY`] instead, so that a caller that retries its send in a loop
    /// does not spin.
    pub async fn writable(&self) -> io::Result<()> {
        let watch = self
            .stream
            .get_ref()
            .try_clone()
            .and_then(|dup| sys::register_owned_for(dup, Interest::WRITABLE));
        match watch {
            Ok(watch) => watch.writable().await.map(drop),
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch a full channel; retrying shortly");
                tokio::time::sleep(NO_WATCH_RETRY).await;
                Ok(())
            }
        }
    }

    /// Shuts the socket down both ways: the peer sees the end of the stream even while
    /// other handles to this writer live on (or a descendant of the peer holds its end),
    /// and this side's reader ends.
    pub fn shutdown(&self) {
        let _ = sys::shutdown(self.stream.get_ref().as_fd());
    }

    /// Half-closes the socket: the peer reads end-of-file after what was sent, the
    /// unsent tail of a frame included (then the background flush half-closes once the
    /// tail is out; a later send fails as after a half-close).
    pub(crate) fn shutdown_write(&self) {
        let mut pending = self.lock();
        if pending.bytes.is_empty() {
            let _ = sys::shutdown_write(self.stream.get_ref().as_fd());
        } else {
            pending.shut_write = true;
        }
    }

    /// The socket, for a last-gasp blocking write (the worker's panic hook) made
    /// under [`ChannelWriter::with_exclusive`].
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.get_ref().as_fd()
    }

    /// Runs `f` with the pending state locked, so that a blocking writer (the panic
    /// hook) cannot interleave with a frame in flight. `None` if the lock is busy.
    pub(crate) fn with_exclusive<R>(&self, f: impl FnOnce(bool) -> R) -> Option<R> {
        let pending = match self.pending.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(f(pending.bytes.is_empty()))
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock leaves `Pending` consistent (plain buffer).
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes as much of the pending tail as the socket takes. `Ok(true)` when done
    /// (and then makes a half-close that waited for the tail). On error the tail stays.
    fn flush_locked(&self, pending: &mut Pending) -> io::Result<bool> {
        let socket = self.stream.get_ref().as_fd();
        while !pending.bytes.is_empty() {
            #[cfg(test)]
            if let Some(e) = pending.inject.pop_front() {
                return Err(e);
            }
            match sys::send_now(socket, &pending.bytes) {
                Ok(n) => {
                    pending.bytes.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if pending.shut_write {
            pending.shut_write = false;
            let _ = sys::shutdown_write(socket);
        }
        Ok(true)
    }

    /// Flushes the pending tail as the socket takes it. While the tail waits every
    /// `try_send` reports the channel full or busy, so no frame can start inside
    /// another: a send that failed for want of kernel memory is retried; when the peer
    /// is gone (or memory stays short for [`MAX_BUSY_RETRIES`]) the tail is given up
    /// and the socket shut down both ways, so that nothing follows a torn frame.
    async fn flush_in_background(self: Arc<Self>) {
        let mut busy = 0;
        loop {
            if self.writable().await.is_err() {
                break;
            }
            let retry = {
                let mut pending = self.lock();
                match self.flush_locked(&mut pending) {
                    Ok(false) => false,
                    Ok(true) => {
                        pending.flushing = false;
                        return;
                    }
                    Err(e)
                        if sys::send_failure(&e) == sys::SendFailure::Busy
                            && busy < MAX_BUSY_RETRIES =>
                    {
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, unsent = pending.bytes.len(), "a frame's tail cannot be sent; channel shut down");
                        pending.bytes.clear();
                        pending.shut_write = false;
                        pending.flushing = false;
                        let _ = sys::shutdown(self.stream.get_ref().as_fd());
                        return;
                    }
                }
            };
            if retry {
                busy += 1;
                tokio::time::sleep(BUSY_RETRY).await;
            } else {
                busy = 0;
            }
        }
        // The reactor is gone (the runtime is shutting down). The tail stays: a later
        // `try_send` flushes it first.
        self.lock().flushing = false;
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::NotConnected
            | io::ErrorKind::ConnectionAborted
    )
}

/// Bytes and descriptors received but not yet handed out as frames.
#[derive(Debug)]
struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    /// Which frame `fds` belong to, read by read, in order: every read that returned
    /// descriptors or reported `MSG_CTRUNC`.
    batches: VecDeque<FdBatch>,
    /// The descriptors of `fds` that `batches` account for.
    batched: usize,
    /// The offset in the stream of `buf[0]`.
    base: u64,
    /// Descriptors dropped by the kernel, in all.
    lost: u64,
    /// The rest of a line too long is skipped (the Node.js dialect).
    skipping: bool,
    /// Lines: bytes after `start` known to hold no newline (the next search starts
    /// there, so that a line that arrives in many reads is scanned once).
    scanned: usize,
    /// Lines: the offset in the stream of the last byte of the latest read that brought
    /// descriptors (they were closed), until the line that holds it is handed out.
    fd_mark: Option<u64>,
    /// Lines: an earlier read that brought descriptors ended inside the line in
    /// progress.
    line_fds: bool,
    /// Lines: descriptors came with the line handed out (or reported too long) last.
    last_line_fds: bool,
    /// Lines: the first bytes of the line reported too long last.
    long_head: [u8; LINE_HEAD],
    long_head_len: usize,
}

/// The descriptors one `recvmsg` returned.
#[derive(Debug, Clone, Copy)]
struct FdBatch {
    /// The offset in the stream of the read's last byte: its frame's.
    at: u64,
    /// How many arrived.
    count: usize,
    /// The kernel dropped others (`MSG_CTRUNC`).
    truncated: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            fds: VecDeque::new(),
            batches: VecDeque::new(),
            batched: 0,
            base: 0,
            lost: 0,
            skipping: false,
            scanned: 0,
            fd_mark: None,
            line_fds: false,
            last_line_fds: false,
            long_head: [0; LINE_HEAD],
            long_head_len: 0,
        }
    }
}

impl FrameDecoder {
    /// The next complete frame in the buffer, if any.
    fn next_frame<M: Message>(
        &mut self,
        decode: fn(&[u8]) -> Result<M, ProtocolError>,
    ) -> Result<Option<(M, Vec<OwnedFd>)>, ChannelError> {
        let avail = &self.buf[self.start..self.end];
        let Some(len) = protocol::peek_len(avail)? else {
            return self.check_unclaimed().map(|()| None);
        };
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = decode(&avail[HEADER_LEN..HEADER_LEN + len])?;
        let first = self.base + self.start as u64;
        let after = first + (HEADER_LEN + len) as u64;
        self.consume(HEADER_LEN + len);
        // This frame's descriptors: those read with one of its bytes.
        let batch = match self.batches.front() {
            Some(b) if b.at < first => {
                let count = self.fds.len();
                self.clear_fds();
                return Err(ChannelError::UnclaimedFds { count });
            }
            Some(b) if b.at < after => self.batches.pop_front(),
            _ => None,
        };
        // One read's worth per frame (its first segment's).
        if self.batches.front().is_some_and(|b| b.at < after) {
            let count = self.fds.len();
            self.clear_fds();
            return Err(ChannelError::UnclaimedFds { count });
        }
        let (available, truncated) = batch.map_or((0, false), |b| (b.count, b.truncated));
        let claimed = msg.fd_count();
        if claimed < available {
            let count = self.fds.len();
            self.clear_fds();
            return Err(ChannelError::UnclaimedFds { count });
        }
        if claimed > available {
            if !truncated {
                self.clear_fds();
                return Err(ChannelError::MissingFds { claimed, available });
            }
            // The kernel dropped the rest (MSG_CTRUNC).
            self.lost += (claimed - available) as u64;
        }
        self.batched -= available;
        let fds = self.fds.drain(..available).collect();
        self.check_unclaimed()?;
        Ok(Some((msg, fds)))
    }

    /// Closes every descriptor waiting for a frame.
    fn clear_fds(&mut self) {
        self.fds.clear();
        self.batches.clear();
        self.batched = 0;
    }

    /// The next complete line (without its newline), if any. A line longer than `max`
    /// is reported once and skipped, up to its newline.
    fn next_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, ChannelError> {
        if self.skipping {
            let avail = &self.buf[self.start..self.end];
            match avail.iter().position(|b| *b == b'\n') {
                Some(pos) => {
                    self.skipping = false;
                    self.consume_line(pos + 1);
                }
                None => {
                    self.consume_line(avail.len());
                    return Ok(None);
                }
            }
        }
        let from = self.start + self.scanned;
        let found = self.buf[from..self.end].iter().position(|b| *b == b'\n');
        let Some(pos) = found.map(|p| self.scanned + p) else {
            let len = self.end - self.start;
            if len > max {
                self.keep_long_head();
                self.last_line_fds = self.consume_line(len);
                self.skipping = true;
                return Err(ChannelError::LineTooLong { len, max });
            }
            self.scanned = len;
            return Ok(None);
        };
        if pos > max {
            self.keep_long_head();
            self.last_line_fds = self.consume_line(pos + 1);
            return Err(ChannelError::LineTooLong { len: pos, max });
        }
        let line = self.buf[self.start..self.start + pos].to_vec();
        self.last_line_fds = self.consume_line(pos + 1);
        Ok(Some(line))
    }

    /// Lines: drops the first `n` bytes buffered, the end of a line (or part of one
    /// skipped); whether descriptors came with that line.
    fn consume_line(&mut self, n: usize) -> bool {
        let after = self.base + (self.start + n) as u64;
        let mut fds = std::mem::take(&mut self.line_fds);
        if self.fd_mark.is_some_and(|at| at < after) {
            self.fd_mark = None;
            fds = true;
        }
        self.scanned = 0;
        self.consume(n);
        fds
    }

    /// Lines: keeps the start of the line in progress, reported too long.
    fn keep_long_head(&mut self) {
        let n = (self.end - self.start).min(LINE_HEAD);
        self.long_head[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.long_head_len = n;
    }

    /// Lines: after a read, closes the descriptors it brought (a Node.js worker has no
    /// business sending any to its master) and keeps where they came. Reads are made
    /// only while no complete line is buffered, so an earlier mark still kept is inside
    /// the line in progress.
    fn close_line_fds(&mut self) {
        if let Some(batch) = self.batches.back() {
            if self.fd_mark.is_some() {
                self.line_fds = true;
            }
            self.fd_mark = Some(batch.at);
        }
        self.clear_fds();
    }

    /// Drops the first `n` bytes buffered.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.base += self.end as u64;
            self.start = 0;
            self.end = 0;
        }
    }

    /// With no partial frame buffered, no descriptor can be waiting: a frame's
    /// descriptors arrive with its first byte.
    fn check_unclaimed(&mut self) -> Result<(), ChannelError> {
        if self.start == self.end && !self.fds.is_empty() {
            let count = self.fds.len();
            self.clear_fds();
            return Err(ChannelError::UnclaimedFds { count });
        }
        Ok(())
    }

    /// Room to read into: compacts the buffer and grows it to fit the frame in progress.
    fn read_target(&mut self) -> (&mut [u8], &mut VecDeque<OwnedFd>) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        // peek_len has already rejected lengths above the limit.
        let need = match protocol::peek_len(&self.buf[..self.end]) {
            Ok(Some(len)) => HEADER_LEN + len,
            _ => HEADER_LEN,
        };
        if self.buf.len() < need {
            self.buf.resize(need.min(HEADER_LEN + MAX_FRAME_LEN), 0);
        } else if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(2 * (HEADER_LEN + MAX_FRAME_LEN));
            self.buf.resize(grown, 0);
        }
        (&mut self.buf[self.end..], &mut self.fds)
    }

    fn filled(&mut self, received: sys::Received) -> Result<(), ChannelError> {
        self.end += received.bytes;
        let count = self.fds.len() - self.batched;
        if count > 0 || received.truncated {
            // The read's last byte (none at the end of the stream: no frame's).
            let at = self.base + self.end as u64 - u64::from(received.bytes > 0);
            self.batches.push_back(FdBatch {
                at,
                count,
                truncated: received.truncated,
            });
            self.batched += count;
        }
        if self.fds.len() > MAX_PENDING_FDS {
            let count = self.fds.len();
            self.clear_fds();
            return Err(ChannelError::TooManyPendingFds {
                count,
                max: MAX_PENDING_FDS,
            });
        }
        Ok(())
    }

    fn at_eof(&mut self) -> Result<(), ChannelError> {
        if self.start != self.end {
            self.clear_fds();
            return Err(ChannelError::TruncatedFrame {
                buffered: self.end - self.start,
            });
        }
        self.check_unclaimed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ToMaster, ToWorker, frame};
    use sendfd::SendWithFd;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream as StdUnixStream;

    fn pair() -> (
        StdUnixStream,
        ChannelReader,
        Arc<ChannelWriter>,
        StdUnixStream,
    ) {
        let (a, b) = StdUnixStream::pair().expect("pair");
        let (raw_a, raw_b) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
        let (reader, _) = split(from_std(b).expect("tokio"));
        let (_, writer) = split(from_std(a).expect("tokio"));
        (raw_a, reader, writer, raw_b)
    }

    fn dev_null_fds(n: usize) -> Vec<std::fs::File> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect()
    }

    #[tokio::test]
    async fn frames_and_fds_arrive_in_order() {
        let (_ra, mut reader, writer, _rb) = pair();
        let files = dev_null_fds(5);
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        writer.send_msg(&ToWorker::Ping).await.expect("ping");
        let conns = frame(&ToWorker::Connections {
            listener: 0,
            count: 3,
        })
        .expect("encode");
        writer.send(&conns, &raw[..3]).await.expect("send 3");
        let conns = frame(&ToWorker::Connections {
            listener: 1,
            count: 2,
        })
        .expect("encode");
        writer.send(&conns, &raw[3..]).await.expect("send 2");
        writer
            .send_msg(&ToWorker::User(vec![1; 100]))
            .await
            .expect("user");

        let (m, fds) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
        assert_eq!((m, fds.len()), (ToWorker::Ping, 0));
        let (m, fds) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
        assert_eq!(
            m,
            ToWorker::Connections {
                listener: 0,
                count: 3
            }
        );
        assert_eq!(fds.len(), 3);
        let (m, fds) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
        assert_eq!(
            m,
            ToWorker::Connections {
                listener: 1,
                count: 2
            }
        );
        assert_eq!(fds.len(), 2);
        let (m, _) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
        assert_eq!(m, ToWorker::User(vec![1; 100]));
        drop(writer);
        drop(_ra);
        assert!(
            reader
                .recv::<ToWorker>()
                .await
                .expect("clean eof")
                .is_none()
        );
    }

    #[tokio::test]
    async fn partial_writes_keep_frames_whole() {
        let (raw_a, mut reader, writer, _rb) = pair();
        // Fill the socket until it refuses, with frames of varied sizes.
        let mut sent = Vec::new();
        for i in 0..10_000u32 {
            let msg = ToWorker::User(vec![(i % 251) as u8; (i as usize * 37) % 5000]);
            let bytes = frame(&msg).expect("encode");
            match writer.try_send(&bytes, &[]) {
                Ok(()) => sent.push(msg),
                Err(TrySendError::Full) => break,
                Err(TrySendError::Closed(e) | TrySendError::Busy(e)) => panic!("failed: {e}"),
            }
        }
        assert!(
            sent.len() > 10 && sent.len() < 10_000,
            "filled after {} frames",
            sent.len()
        );
        // One more, sent asynchronously, must come after all the others.
        let last = ToWorker::User(b"last".to_vec());
        let w = Arc::clone(&writer);
        let l = last.clone();
        let sender = tokio::spawn(async move { w.send_msg(&l).await });
        sent.push(last);
        for expected in &sent {
            let (got, _) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
            assert_eq!(&got, expected);
        }
        sender.await.expect("join").expect("send");
        drop(raw_a);
    }

    #[tokio::test]
    async fn unclaimed_fds_are_an_error_and_closed() {
        let (raw_a, mut reader, _writer, _rb) = pair();
        let files = dev_null_fds(2);
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let ping = frame(&ToWorker::Ping).expect("encode");
        raw_a.send_with_fd(&ping, &raw).expect("send");
        let err = reader.recv::<ToWorker>().await.expect_err("unclaimed");
        assert!(
            matches!(err, ChannelError::UnclaimedFds { count: 2 }),
            "{err}"
        );
        assert!(reader.decoder.fds.is_empty());
    }

    #[tokio::test]
    async fn missing_fds_are_an_error() {
        let (raw_a, mut reader, _writer, _rb) = pair();
        let files = dev_null_fds(1);
        let conns = frame(&ToWorker::Connections {
            listener: 0,
            count: 2,
        })
        .expect("encode");
        raw_a
            .send_with_fd(&conns, &[files[0].as_raw_fd()])
            .expect("send");
        let err = reader.recv::<ToWorker>().await.expect_err("missing");
        assert!(
            matches!(
                err,
                ChannelError::MissingFds {
                    claimed: 2,
                    available: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_control_message_loses_descriptors_not_the_channel() {
        // What the kernel does when the receiver's table is full: the bytes of a
        // 3-descriptor frame arrive with 1 descriptor and MSG_CTRUNC.
        let mut d = FrameDecoder::default();
        let bytes = frame(&ToWorker::Connections {
            listener: 0,
            count: 3,
        })
        .expect("encode");
        let files = dev_null_fds(1);
        let (spare, fds) = d.read_target();
        spare[..bytes.len()].copy_from_slice(&bytes);
        fds.push_back(OwnedFd::from(files.into_iter().next().expect("file")));
        d.filled(sys::Received {
            bytes: bytes.len(),
            truncated: true,
        })
        .expect("not an error");
        let (msg, fds) = d
            .next_frame(protocol::decode_payload::<ToWorker>)
            .expect("ok")
            .expect("frame");
        assert!(matches!(msg, ToWorker::Connections { count: 3, .. }));
        assert_eq!(fds.len(), 1, "the one that arrived");
        assert_eq!(d.lost, 2);
        // Without truncation a short frame is still a protocol error.
        let (spare, _) = d.read_target();
        spare[..bytes.len()].copy_from_slice(&bytes);
        d.filled(sys::Received {
            bytes: bytes.len(),
            truncated: false,
        })
        .expect("filled");
        assert!(matches!(
            d.next_frame(protocol::decode_payload::<ToWorker>),
            Err(ChannelError::MissingFds {
                claimed: 3,
                available: 0
            })
        ));
    }

    /// One `recvmsg` as the kernel would return it: `bytes`, with `fds` arrived.
    fn read_into(d: &mut FrameDecoder, bytes: &[u8], fds: Vec<OwnedFd>, truncated: bool) {
        let (spare, queue) = d.read_target();
        spare[..bytes.len()].copy_from_slice(bytes);
        queue.extend(fds);
        d.filled(sys::Received {
            bytes: bytes.len(),
            truncated,
        })
        .expect("filled");
    }

    fn inode(fd: &OwnedFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::File::from(fd.try_clone().expect("dup"))
            .metadata()
            .expect("fstat")
            .ino()
    }

    #[test]
    fn a_frame_whose_descriptors_were_dropped_never_takes_the_next_frames() {
        // Frame A is split across two reads (the buffer was full): its first part came
        // with MSG_CTRUNC and none of its descriptor. The second read holds the rest
        // of A, then all of B with B's descriptor (a read stops after a segment with
        // descriptors, not before).
        let a = frame(&ToWorker::Connections {
            listener: 0,
            count: 1,
        })
        .expect("encode");
        let b = frame(&ToWorker::Connections {
            listener: 1,
            count: 1,
        })
        .expect("encode");
        let (b_fd, _peer) = UnixStream::pair().expect("pair");
        let b_fd = OwnedFd::from(b_fd);
        let b_inode = inode(&b_fd);
        let mut d = FrameDecoder::default();
        read_into(&mut d, &a[..3], vec![], true);
        let mut rest = a[3..].to_vec();
        rest.extend_from_slice(&b);
        read_into(&mut d, &rest, vec![b_fd], false);
        let (msg, fds) = d
            .next_frame(protocol::decode_payload::<ToWorker>)
            .expect("ok")
            .expect("frame");
        assert!(matches!(msg, ToWorker::Connections { listener: 0, .. }));
        assert!(
            fds.is_empty(),
            "A's descriptor was dropped; it must not get B's"
        );
        assert_eq!(d.lost, 1);
        let (msg, fds) = d
            .next_frame(protocol::decode_payload::<ToWorker>)
            .expect("ok")
            .expect("frame");
        assert!(matches!(msg, ToWorker::Connections { listener: 1, .. }));
        assert_eq!(fds.len(), 1);
        assert_eq!(inode(&fds[0]), b_inode, "B gets its own descriptor");
        assert_eq!(d.lost, 1);
    }

    #[test]
    fn descriptors_with_a_frame_that_claims_none_are_an_error_at_once() {
        // A peer that sends a descriptor with a message that carries none (a worker
        // sending one to its master): refused with that frame, even while the next
        // frame is still partial.
        let ping = frame(&ToWorker::Ping).expect("encode");
        let next = frame(&ToWorker::User(vec![7; 64])).expect("encode");
        let mut d = FrameDecoder::default();
        let fds = dev_null_fds(1).into_iter().map(OwnedFd::from).collect();
        read_into(&mut d, &ping, fds, false);
        read_into(&mut d, &next[..10], vec![], false);
        assert!(matches!(
            d.next_frame(protocol::decode_payload::<ToWorker>),
            Err(ChannelError::UnclaimedFds { count: 1 })
        ));
        assert!(d.fds.is_empty() && d.batches.is_empty());
    }

    #[tokio::test]
    async fn lines_are_read_whole_and_bounded() {
        use std::io::Write;
        let (mut raw_a, mut reader, _writer, _rb) = pair();
        raw_a.write_all(b"{\"a\":1}\n{\"b\"").expect("write");
        assert_eq!(
            reader.recv_line(100).await.expect("ok"),
            Some(b"{\"a\":1}".to_vec())
        );
        raw_a.write_all(b":2}\n").expect("write");
        assert_eq!(
            reader.recv_line(100).await.expect("ok"),
            Some(b"{\"b\":2}".to_vec())
        );
        // A line too long is reported, then skipped to its newline: the next line
        // is read whole, however the long one arrives.
        raw_a.write_all(&[b'x'; 200]).expect("write");
        assert!(matches!(
            reader.recv_line(100).await,
            Err(ChannelError::LineTooLong { .. })
        ));
        raw_a.write_all(&[b'y'; 300]).expect("write");
        raw_a.write_all(b"yy\n{\"c\":3}\n").expect("write");
        assert_eq!(
            reader.recv_line(100).await.expect("ok"),
            Some(b"{\"c\":3}".to_vec())
        );
        raw_a
            .write_all(&[&[b'z'; 150][..], b"\n{\"d\":4}\n"].concat())
            .expect("write");
        assert!(matches!(
            reader.recv_line(100).await,
            Err(ChannelError::LineTooLong { len: 150, .. })
        ));
        assert_eq!(
            reader.recv_line(100).await.expect("ok"),
            Some(b"{\"d\":4}".to_vec())
        );
    }

    /// A line that arrives a byte at a time was searched for its newline from its start
    /// on every read: a 64 KiB line cost some 2^31 comparisons.
    #[test]
    fn a_line_in_many_reads_is_scanned_once() {
        let mut d = FrameDecoder::default();
        for i in 0..1000 {
            read_into(&mut d, b"x", Vec::new(), false);
            assert_eq!(d.next_line(4096).expect("ok"), None);
            assert_eq!(d.scanned, i + 1, "the search goes on where it stopped");
        }
        read_into(&mut d, b"\n{}\n", Vec::new(), false);
        assert_eq!(d.next_line(4096).expect("ok"), Some(vec![b'x'; 1000]));
        assert_eq!(d.next_line(4096).expect("ok"), Some(b"{}".to_vec()));
        assert_eq!(d.scanned, 0);
    }

    #[test]
    fn a_line_knows_whether_descriptors_came_with_it() {
        let mut d = FrameDecoder::default();
        let files = dev_null_fds(2);
        let mut files = files.into_iter().map(OwnedFd::from);
        // A read that brought a descriptor ends inside the second line.
        read_into(
            &mut d,
            b"{}\n{\"a\"",
            vec![files.next().expect("fd")],
            false,
        );
        d.close_line_fds();
        assert!(d.fds.is_empty(), "closed at once");
        assert_eq!(d.next_line(100).expect("ok"), Some(b"{}".to_vec()));
        assert!(!d.last_line_fds);
        assert_eq!(d.next_line(100).expect("ok"), None);
        read_into(&mut d, b":1}\n[]\n", Vec::new(), false);
        d.close_line_fds();
        assert_eq!(d.next_line(100).expect("ok"), Some(b"{\"a\":1}".to_vec()));
        assert!(d.last_line_fds);
        assert_eq!(d.next_line(100).expect("ok"), Some(b"[]".to_vec()));
        assert!(!d.last_line_fds);
        // One too long: reported with its start.
        let long = [&br#"{"cmd":"NODE_HANDLE","type":"#[..], &[b'x'; 200][..]].concat();
        read_into(&mut d, &long, vec![files.next().expect("fd")], false);
        d.close_line_fds();
        assert!(matches!(
            d.next_line(100),
            Err(ChannelError::LineTooLong { .. })
        ));
        assert!(d.last_line_fds);
        assert_eq!(&d.long_head[..d.long_head_len], &long[..LINE_HEAD]);
    }

    /// Node keeps the descriptors of a read for the next complete handle line: two
    /// handles in the read that completes the first, cut by the read before, swap
    /// descriptors. A handle after a long run of lines without one goes alone.
    #[tokio::test]
    async fn an_exposed_handle_holds_back_the_next_until_its_ack() {
        let (_ra, _reader, writer, _rb) = pair();
        let files = dev_null_fds(4);
        let fd = |i: usize| [files[i].as_raw_fd()];
        let handle = b"{\"cmd\":\"NODE_HANDLE\"}\n";
        // Unguarded (the binary dialect): nothing held.
        writer.try_send(&[b' '; 40_000], &[]).expect("sent");
        writer.try_send(handle, &fd(0)).expect("sent");
        writer.try_send(handle, &fd(1)).expect("sent");
        assert_eq!(writer.fds_sent(), 2);

        let (_ra, _reader, writer, _rb) = pair();
        writer.guard_exposed_handles();
        // Back to back, or after a short run: no limit.
        writer.try_send(handle, &fd(0)).expect("sent");
        writer.try_send(&[b' '; 1000], &[]).expect("sent");
        writer.try_send(handle, &fd(1)).expect("sent");
        assert_eq!(writer.handle_room(), u64::MAX);
        // A long run: the next handle goes, and then none until it is acknowledged.
        for _ in 0..33 {
            writer.try_send(&[b' '; 1000], &[]).expect("sent");
        }
        assert_eq!(writer.handle_room(), 1);
        writer.try_send(handle, &fd(2)).expect("sent");
        assert_eq!(writer.handle_room(), 0);
        assert!(matches!(
            writer.try_send(handle, &fd(3)),
            Err(TrySendError::Full)
        ));
        writer.try_send(b"{}\n", &[]).expect("lines without go");
        let w = Arc::clone(&writer);
        let later = tokio::spawn(async move {
            let files = dev_null_fds(1);
            w.send(b"{\"cmd\":\"NODE_HANDLE\"}\n", &[files[0].as_raw_fd()])
                .await
        });
        tokio::task::yield_now().await;
        assert!(!later.is_finished());
        assert_eq!(writer.fds_sent(), 3, "it waits");
        assert_eq!(writer.ack_handle(), Some(false));
        assert_eq!(writer.ack_handle(), Some(false));
        assert_eq!(writer.handle_room(), 0);
        assert_eq!(writer.ack_handle(), Some(true), "the exposed one");
        tokio::time::timeout(std::time::Duration::from_secs(10), later)
            .await
            .expect("sent once acknowledged")
            .expect("join")
            .expect("sent");
        assert_eq!(writer.fds_sent(), 4);
        writer.try_send(handle, &fd(3)).expect("sent");
        // Acknowledgements for no handle are refused.
        for _ in 0..2 {
            assert!(writer.ack_handle().is_some());
        }
        assert_eq!(writer.ack_handle(), None);
    }

    #[tokio::test]
    async fn master_side_rejects_any_fd() {
        let (raw_a, mut reader, _writer, _rb) = pair();
        let files = dev_null_fds(1);
        let pong = frame(&ToMaster::Pong).expect("encode");
        raw_a
            .send_with_fd(&pong, &[files[0].as_raw_fd()])
            .expect("send");
        assert!(matches!(
            reader.recv::<ToMaster>().await,
            Err(ChannelError::UnclaimedFds { count: 1 })
        ));
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        use std::io::Write;
        let (mut raw_a, mut reader, _writer, _rb) = pair();
        raw_a
            .write_all(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes())
            .expect("write");
        assert!(matches!(
            reader.recv::<ToWorker>().await,
            Err(ChannelError::Protocol(
                ProtocolError::MessageTooLarge { .. }
            ))
        ));

        let (mut raw_a, mut reader, _writer, _rb) = pair();
        let ping = frame(&ToWorker::User(vec![0; 50])).expect("encode");
        raw_a.write_all(&ping[..20]).expect("write");
        drop(raw_a);
        drop(_writer);
        assert!(matches!(
            reader.recv::<ToWorker>().await,
            Err(ChannelError::TruncatedFrame { buffered: 20 })
        ));
    }

    #[tokio::test]
    async fn large_frame_across_many_reads() {
        let (_ra, mut reader, writer, _rb) = pair();
        let big = ToWorker::User(vec![42; MAX_FRAME_LEN - 64]);
        let w = Arc::clone(&writer);
        let b = big.clone();
        let task = tokio::spawn(async move {
            for _ in 0..5 {
                w.send_msg(&b).await.expect("send");
            }
        });
        for _ in 0..5 {
            let (got, _) = reader.recv::<ToWorker>().await.expect("ok").expect("frame");
            assert_eq!(got, big);
        }
        task.await.expect("join");
    }

    #[tokio::test]
    async fn send_to_a_closed_peer_is_closed() {
        let (raw_a, reader, writer, raw_b) = pair();
        drop(reader);
        drop(raw_b);
        let _ = raw_a;
        let err = writer.send_msg(&ToWorker::Ping).await.expect_err("closed");
        assert!(matches!(err, ChannelError::Closed), "{err}");
    }

    /// Sends frames of the largest size until one is only partly written (its tail
    /// waits in `pending`, a background flush waiting for write space). Returns the
    /// messages sent, that one included.
    fn fill_until_partial(writer: &Arc<ChannelWriter>) -> Vec<ToWorker> {
        let mut sent = Vec::new();
        for i in 0..1000u32 {
            let msg = ToWorker::User(vec![(i % 251) as u8; MAX_FRAME_LEN - 64]);
            match writer.try_send(&frame(&msg).expect("encode"), &[]) {
                Ok(()) => sent.push(msg),
                Err(TrySendError::Full) => panic!("full before a partial write"),
                Err(TrySendError::Closed(e) | TrySendError::Busy(e)) => panic!("failed: {e}"),
            }
            if !writer.lock().bytes.is_empty() {
                return sent;
            }
        }
        panic!("no partial write in 1000 frames");
    }

    /// Reads `count` frames (or fails) in a task of its own.
    fn read_frames(
        mut reader: ChannelReader,
        count: usize,
    ) -> tokio::task::JoinHandle<(ChannelReader, Result<Vec<ToWorker>, ChannelError>)> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..count {
                match reader.recv::<ToWorker>().await {
                    Ok(Some((msg, _))) => got.push(msg),
                    Ok(None) => break,
                    Err(e) => return (reader, Err(e)),
                }
            }
            (reader, Ok(got))
        })
    }

    /// Waits (up to 10 s) until `done` holds of the writer's pending state.
    async fn until_pending(writer: &ChannelWriter, done: impl Fn(&Pending) -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !done(&writer.lock()) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition within 10 s");
    }

    fn os_error(errno: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    /// ENOBUFS while a frame's tail is flushed in the background: the tail used to be
    /// dropped with the channel left open, and the next frame followed half a frame.
    #[tokio::test]
    async fn a_busy_flush_keeps_the_tail_and_retries() {
        let (_ra, reader, writer, _rb) = pair();
        let mut sent = fill_until_partial(&writer);
        writer
            .lock()
            .inject
            .push_back(os_error(rustix::io::Errno::NOBUFS));
        let last = ToWorker::User(b"last".to_vec());
        let reading = read_frames(reader, sent.len() + 1);
        until_pending(&writer, |p| p.inject.is_empty()).await;
        writer.send_msg(&last).await.expect("send after the retry");
        sent.push(last);
        let (_reader, got) = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("all frames within 10 s")
            .expect("join");
        assert_eq!(got.expect("frames whole"), sent);
    }

    /// The peer gone while a frame's tail is flushed: the tail is dropped and the socket
    /// shut down, so that no later frame can follow the torn one.
    #[tokio::test]
    async fn a_failed_flush_shuts_the_channel_down() {
        let (_ra, reader, writer, _rb) = pair();
        let sent = fill_until_partial(&writer);
        writer
            .lock()
            .inject
            .push_back(os_error(rustix::io::Errno::PIPE));
        let reading = read_frames(reader, sent.len() + 1);
        until_pending(&writer, |p| !p.flushing).await;
        assert!(writer.lock().bytes.is_empty(), "the tail is given up");
        let ping = frame(&ToWorker::Ping).expect("encode");
        assert!(
            matches!(writer.try_send(&ping, &[]), Err(TrySendError::Closed(_))),
            "nothing follows a torn frame"
        );
        let (_reader, got) = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("the reader ends within 10 s")
            .expect("join");
        assert!(
            matches!(got, Err(ChannelError::TruncatedFrame { .. })),
            "{got:?}"
        );
    }

    /// A half-close while a frame's tail waits: the tail goes first, then end-of-file.
    #[tokio::test]
    async fn a_half_close_waits_for_the_pending_tail() {
        let (_ra, reader, writer, _rb) = pair();
        let sent = fill_until_partial(&writer);
        writer.shutdown_write();
        let reading = read_frames(reader, sent.len() + 1);
        let (mut reader, got) = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("all frames within 10 s")
            .expect("join");
        assert_eq!(got.expect("frames whole"), sent);
        assert!(
            reader
                .recv::<ToWorker>()
                .await
                .expect("clean eof")
                .is_none()
        );
        let ping = frame(&ToWorker::Ping).expect("encode");
        assert!(matches!(
            writer.try_send(&ping, &[]),
            Err(TrySendError::Closed(_))
        ));
    }

    /// The readiness masks of every epoll watch this process holds on the socket with
    /// this inode (/proc/self/fdinfo of an epoll descriptor lists each watch as
    /// `tfd: N events: MASK ...`).
    fn epoll_watches(inode: u64) -> Vec<u32> {
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo")
            .expect("fdinfo")
            .flatten()
        {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in info.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["tfd:", fd, "events:", mask, ..] = words[..] {
                    let fd: RawFd = fd.parse().expect("tfd");
                    if sys::socket_inode_of(fd) == Some(inode) {
                        masks.push(u32::from_str_radix(mask, 16).expect("mask"));
                    }
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn only_a_sender_that_waits_watches_for_write_space() {
        const EPOLLOUT: u32 = 0x4;
        let (raw_a, _reader, writer, raw_b) = pair();
        let inode = sys::socket_inode_of(writer.as_fd().as_raw_fd()).expect("socket");
        // Linux signals write space on every read by the peer: a watch for it would
        // wake the master once per frame its worker reads.
        // (tokio's reactor holds its epoll under two descriptors: a watch is listed
        // once per descriptor.)
        let for_write_space = || epoll_watches(inode).iter().any(|m| m & EPOLLOUT != 0);
        assert!(
            !epoll_watches(inode).is_empty(),
            "the channel is in the reactor"
        );
        assert!(
            !for_write_space(),
            "for reading only: {:x?}",
            epoll_watches(inode)
        );

        let frame = frame(&ToWorker::User(vec![7; 1000])).expect("encode");
        let mut filled = false;
        for _ in 0..100_000 {
            match writer.try_send(&frame, &[]) {
                Ok(()) => {}
                Err(TrySendError::Full) => {
                    filled = true;
                    break;
                }
                Err(TrySendError::Closed(e) | TrySendError::Busy(e)) => panic!("failed: {e}"),
            }
        }
        assert!(filled, "the socket never filled");
        let w = Arc::clone(&writer);
        let waiting = tokio::spawn(async move { w.writable().await });
        let mut watched = false;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
            if for_write_space() {
                watched = true;
                break;
            }
        }
        assert!(watched, "a waiting sender watches for write space");
        assert!(!waiting.is_finished(), "a full socket is not writable");

        // The peer reads everything: the sender is told, and stops watching.
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            match (&raw_b).read(&mut sink) {
                Ok(n) if n > 0 => {}
                Ok(_) => panic!("end of stream"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("writable within 10 s")
            .expect("join")
            .expect("writable");
        assert!(!epoll_watches(inode).is_empty(), "still in the reactor");
        assert!(!for_write_space(), "no longer watched for write space");
        writer.try_send(&frame, &[]).expect("room again");
        drop(raw_a);
    }
}
