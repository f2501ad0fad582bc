"""The worker's side of an rr-cluster channel: `Worker`.

Threads (all daemon threads, so none of them keeps the process alive):

- ``rr-cluster-reader``: reads the channel (frames and descriptors), queues the
  connections, answers `Ping`, sends the `Ack`s, takes `Drain` and end-of-file;
- ``rr-cluster-heartbeat``: sends `Heartbeat` (and `Ack`) every `Hello.heartbeat_ms`,
  whatever the application's threads are doing, until the process exits;
- ``rr-cluster-accept-N``: shared balancing only, accepts on a listening socket the
  master handed over (`Listener`), until the drain or the worker's own `Suicide`
  (whichever comes first; it closes its copy of the listening socket then);
- ``rr-cluster-deadline``: from the drain on, exits the process just before the
  master's deadline if it is still alive then;
- ``rr-cluster-messages``/``rr-cluster-drain-callbacks``: run the application's
  callbacks, never on the reader.
"""

import errno
import os
import queue
import resource
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
import weakref
from typing import Callable, List, Optional

from . import protocol
from .protocol import (
    ACK_EVERY, MAX_USER_DATA, SCM_MAX_FD, Ack, Connections, Drain, FrameDecoder, Heartbeat,
    Hello, Listener, ListenerInfo, Ping, Pong, ProtocolError, Ready, Suicide, User,
)

__all__ = ["Worker", "Connection", "NotAWorker", "current_worker", "start_worker"]

ENV_FD = "RR_CLUSTER_CHANNEL_FD"
ENV_INODE = "RR_CLUSTER_CHANNEL_INODE"
ENV_PROTOCOL = "RR_CLUSTER_PROTOCOL"
ENV_WORKER_ID = "RR_CLUSTER_WORKER_ID"
ENV_GENERATION = "RR_CLUSTER_GENERATION"

#: Descriptors kept for the worker's own use when the capacity is derived from
#: RLIMIT_NOFILE (the same reserve as the Rust library).
FD_RESERVE = 64
#: Deadline of a drain the worker starts itself (the master is gone; no answer to a
#: Suicide), seconds.
ORPHAN_DEADLINE = 10.0
#: Bytes asked of one recvmsg (frames are at most 64 KiB + 4).
_RECV_SIZE = 256 * 1024
_ANC_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * struct.calcsize("i"))
_INT = struct.calcsize("i")
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)

_current = None
_current_lock = threading.Lock()


def current_worker() -> "Optional[Worker]":
    """The process's `Worker`, once one was created (None before)."""
    return _current


class NotAWorker(RuntimeError):
    """The process was not started by an rr-cluster master (no channel in the
    environment, or the channel named there is not this process's)."""


def log(message: str):
    """One line on stderr (the master logs each line with the worker's slot and pid)."""
    try:
        sys.stderr.write(f"rr_cluster_worker: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


class Connection(socket.socket):
    """A connection the master passed (or, in shared mode, one accepted here): a plain
    `socket.socket` in blocking mode, with `listener`, the index of the master's listener
    it came from (see `Worker.listeners`). Close it when done: the worker counts open
    connections for its heartbeats and its capacity."""

    __slots__ = ("listener", "_release")

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None, *, listener: int = 0,
                 release: Optional[Callable[[], None]] = None):
        super().__init__(family, type, proto, fileno)
        self.listener = listener
        self._release = release

    def _done(self):
        release, self._release = self._release, None
        if release is not None:
            release()

    def _real_close(self, *args, **kwargs):  # every real close (close(), makefile's last)
        try:
            super()._real_close(*args, **kwargs)
        finally:
            self._done()

    def detach(self):
        """The descriptor becomes the caller's: the worker no longer counts it."""
        try:
            return super().detach()
        finally:
            self._done()

    def dup(self):
        sock = super().dup()  # a copy the worker does not count
        sock.listener = self.listener
        return sock


_END = object()  # marks the end of the connections (queued after the drain)


class Worker:
    """The worker's end of the channel, adopted from the environment.

    Creating it adopts the channel (checks `RR_CLUSTER_CHANNEL_INODE`, sets close-on-exec,
    removes the `RR_CLUSTER_*` variables from `os.environ`), reads the master's `Hello`
    (version first), negotiates the protocol version and starts the channel reader.
    `ready()` then tells the master to send connections and starts the heartbeats; take
    them with `accept()` or by iterating over the worker, until the drain ends them.

    Raises `NotAWorker` outside an rr-cluster pool, `ProtocolError` (`VersionMismatch`)
    when the master cannot be talked to: report it and exit non-zero without `ready()`.

    Options: `max_connections` (default: RLIMIT_NOFILE less `reserve`), `message_queue`
    (bound of `messages`), `handshake_timeout` (seconds), `orphan_deadline` (the drain's
    deadline when the master is gone), `handle_errors` (uncaught exceptions announce a
    suicide: `sys.excepthook`, `threading.excepthook`), `exit_at_deadline` (exit the
    process just before the drain's deadline if it is still alive then).
    """

    def __init__(self, *, max_connections: Optional[int] = None, reserve: int = FD_RESERVE,
                 message_queue: int = 1024, handshake_timeout: float = 30.0,
                 orphan_deadline: float = ORPHAN_DEADLINE, handle_errors: bool = True,
                 exit_at_deadline: bool = True, environ=None):
        global _current
        env = os.environ if environ is None else environ
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        sock, self.offered_version, env_id = _adopt_channel(env)
        self._sock = sock
        try:
            self.version = protocol.negotiate(self.offered_version)
        except ProtocolError:
            sock.close()
            raise
        self._decoder = FrameDecoder(self.version)
        self._write_broken = False
        self.reserve = reserve
        self._max_connections = max_connections
        self.orphan_deadline = orphan_deadline
        self.exit_at_deadline = exit_at_deadline

        try:
            self.hello: Hello = self._read_hello(handshake_timeout)
        except BaseException:
            self._decoder.close_pending()
            sock.close()
            raise
        if env_id is not None and env_id != str(self.hello.worker_id):
            log(f"Hello names slot {self.hello.worker_id}, {ENV_WORKER_ID} said {env_id}")
        #: The worker's slot (0..N), stable across restarts of the slot.
        self.id: int = self.hello.worker_id
        #: How many times the pool had been reloaded when this worker started.
        self.generation: int = self.hello.generation
        self.heartbeat_ms: int = self.hello.heartbeat_ms
        #: The master's listeners (`ListenerInfo(kind, address)`), indexed by
        #: `Connection.listener`.
        self.listeners: List[ListenerInfo] = list(self.hello.listeners)
        self.pid = os.getpid()

        self._incoming: "queue.Queue" = queue.Queue()
        self.messages: "queue.Queue[bytes]" = queue.Queue(maxsize=max(1, message_queue))
        #: Application messages dropped because `messages` was full.
        self.dropped_messages = 0
        self._active = 0  # connections held (queued ones included)
        self._acked = 0
        self._ack_after = ACK_EVERY
        self._ack_lock = threading.Lock()
        # The last Ack announced a capacity of 0 (the master sends nothing until the next
        # Ack); the next connection to close asks the heartbeat thread for one.
        self._window_shut = False
        self._beat_wake = threading.Condition(threading.Lock())
        self._ack_wanted = False
        self._ready = False
        self._closed_incoming = False
        #: Set when the drain begins (master's Drain, end of file, or a Suicide left
        #: unanswered): no new connection comes after the ones already queued.
        self.draining = threading.Event()
        #: Set as soon as the worker is leaving (drain, or its own Suicide): HTTP
        #: responses from then on carry `Connection: close`.
        self.closing = threading.Event()
        #: Set when the channel ended (end of file, reset, protocol error).
        self.channel_closed = threading.Event()
        self.master_gone = False
        self.drain_reason: Optional[str] = None
        #: time.monotonic() at which the master SIGKILLs (None before the drain).
        self.deadline: Optional[float] = None
        #: time.monotonic() by which to be done: a little before `deadline`.
        self.finish_by: Optional[float] = None
        self._deadline_from_master = False
        self.drain_started: Optional[float] = None
        #: Exit status the serve_* functions use: 1 after an uncaught exception.
        self.exit_code = 0
        self.suicide_reason: Optional[str] = None
        # A Suicide went out whole: the master reads it before anything after it (the
        # end of the channel included), and takes this worker for leaving.
        self._suicide_sent = False
        self._drain_callbacks: List[Callable] = []
        self._message_callback: Optional[Callable] = None
        # Shared balancing: set once this worker takes no more connections from the
        # listening sockets (its Suicide, or the drain); the accept threads then close
        # their copies, and the other workers take what comes next.
        self._stop_accept = threading.Event()
        self._wakeups: List[socket.socket] = []
        # Every socket of the accept threads (listening sockets, wake-up ends): a forked
        # child closes its copies.
        self._accept_socks: List[socket.socket] = []
        self._accept_threads: List[threading.Thread] = []
        self._watchdog: Optional[threading.Thread] = None
        self._hooks_installed = False
        # handle_signals(): our handler, and the handlers it replaced (restored in a
        # forked child).
        self._signal_handler = None
        self._previous_handlers = {}
        # Set in a forked child (multiprocessing, os.fork in a handler): the object is
        # the parent's, so it does nothing here (no Suicide, drain, hook or callback).
        self._inert = False

        with _current_lock:
            _current = self
        # A forked child (multiprocessing, a pre-fork server) must not keep the channel
        # open (the master would not see this worker's end), nor act as the worker. A
        # weak reference: the hook outlives the worker.
        ref = weakref.ref(self)

        def after_fork_in_child():
            worker = ref()
            if worker is not None:
                worker._after_fork_in_child()

        os.register_at_fork(after_in_child=after_fork_in_child)
        if handle_errors:
            self.install_error_hooks()
        self._reader = threading.Thread(target=self._read_loop, name="rr-cluster-reader",
                                        daemon=True)
        self._reader.start()
        self._heartbeat_stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop,
                                           name="rr-cluster-heartbeat", daemon=True)

    # --- public API ------------------------------------------------------------------

    @property
    def heartbeat_interval(self) -> float:
        """`Hello.heartbeat_ms` in seconds."""
        return max(self.heartbeat_ms, 1) / 1000.0

    @property
    def active(self) -> int:
        """Connections held now (received and not yet closed, queued ones included)."""
        return self._active

    @property
    def received(self) -> int:
        """Descriptors taken off the channel since the start (`lost` included)."""
        return self._decoder.received

    @property
    def lost(self) -> int:
        """Connections the kernel dropped on their way here (descriptor table full)."""
        return self._decoder.lost

    @property
    def max_connections(self) -> int:
        """The most connections this worker takes: `max_connections`, else the
        descriptor limit (RLIMIT_NOFILE) less the reserve, at least 16."""
        if self._max_connections is not None:
            return max(0, int(self._max_connections))
        try:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (OSError, ValueError):
            soft = 1024
        if soft == resource.RLIM_INFINITY or soft < 0:
            soft = 1 << 31
        return max(soft - self.reserve, 16)

    @property
    def capacity(self) -> int:
        """How many more connections this worker can take now (`Ack.capacity`)."""
        return max(0, min(self.max_connections - self._active, 0xFFFFFFFF))

    def ready(self):
        """Tells the master to send connections (`Ready`, then a version-2 `Ack`) and
        starts the heartbeats. Once; later calls do nothing."""
        with self._lock:
            if self._ready or self.draining.is_set():
                return  # once; and never after the drain began (nothing would be served)
            self._ready = True
        self._send(Ready(self.pid & 0xFFFFFFFF, self.version))
        if self.version >= 2:
            self._send_ack()
        self._heartbeat.start()

    def accept(self, timeout: Optional[float] = None) -> Optional[Connection]:
        """The next connection; None once the drain has begun and every connection
        received before it was taken. Raises `TimeoutError` after `timeout` seconds."""
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no connection within the timeout") from None
        if item is _END:
            self._incoming.put(_END)  # for every other consumer
            return None
        return item

    def __iter__(self):
        """Connections as they come, until the drain (then the iteration ends)."""
        while True:
            conn = self.accept()
            if conn is None:
                return
            yield conn

    def send(self, data: bytes):
        """A `User` message to the master (at most 65 524 bytes)."""
        if not self._ready:
            raise RuntimeError("messages go to the master after ready(), not before")
        data = bytes(data)
        if len(data) > MAX_USER_DATA:
            raise ValueError(f"a user message holds at most {MAX_USER_DATA} bytes, not {len(data)}")
        if not self._send(User(data)):
            raise ConnectionError("the channel to the master is closed")

    def on_message(self, callback: Callable[[bytes], None]):
        """Calls `callback(data)` for every message from the master, on a thread of its
        own (instead of reading `messages`)."""
        with self._lock:
            start = self._message_callback is None
            self._message_callback = callback
        if start:
            threading.Thread(target=self._message_loop, name="rr-cluster-messages",
                             daemon=True).start()

    def on_drain(self, callback: Callable[["Worker"], None]):
        """Calls `callback(worker)` once when the drain begins (at once if it has), on a
        thread of its own."""
        if self._inert:
            return
        with self._lock:
            if not self.draining.is_set():
                self._drain_callbacks.append(callback)
                return
        self._run_callbacks([callback])

    def wait_draining(self, timeout: Optional[float] = None) -> bool:
        """Waits for the drain to begin; whether it has."""
        return self.draining.wait(timeout)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Waits until no connection is held (`active` is 0); whether it is."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._active > 0:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 1.0))
            return True

    def time_left(self) -> Optional[float]:
        """Seconds until `finish_by` (None before the drain)."""
        if self.finish_by is None:
            return None
        return max(0.0, self.finish_by - time.monotonic())

    def suicide(self, reason: str, exit_code: int = 0):
        """Leave on our own: sends `Suicide { reason }` (the master starts a replacement
        at once and answers with `Drain`); responses carry `Connection: close` from now.
        The drain itself begins with the master's `Drain` (connections it sent before it
        read the Suicide are still served), or after `orphan_deadline` without one. In
        shared mode the worker stops accepting at once (its copies of the listening
        sockets are closed; connections already accepted are still served): the other
        workers take the new ones."""
        if self._inert:
            return  # a forked child: the worker is its parent
        with self._lock:
            first = self.suicide_reason is None
            if first:
                self.suicide_reason = reason
            self.exit_code = max(self.exit_code, exit_code)
        if not first:
            return
        self.closing.set()
        self._stop_accepting()
        if not self._ready:
            # Nothing to announce before Ready (the master counts a boot failure when the
            # process exits), and no connection to wait for.
            self._begin_drain("suicide before ready", 0.5, from_master=False)
            return
        msg = Suicide(_truncate_reason(reason))
        if self._send(msg, timeout=0.5):
            self._suicide_sent = True
            threading.Thread(target=self._await_drain, name="rr-cluster-suicide",
                             daemon=True).start()
        elif self._write_broken:
            self._unannounced_end()
        else:
            # The channel is busy (another frame being written, or the master slow to
            # read), not closed: the master still sends connections and the heartbeats
            # keep this worker in rotation, so draining now would close connections it
            # is still given. Keep trying; drain without the Suicide only if the write
            # side breaks (or when the master's Drain or end of file comes first).
            threading.Thread(target=self._send_suicide, args=(msg,), name="rr-cluster-suicide",
                             daemon=True).start()

    def _send_suicide(self, msg):
        while not self.draining.is_set():
            if self._send(msg, timeout=0.5):
                self._suicide_sent = True
                self._await_drain()
                return
            if self._write_broken:
                self._unannounced_end()
                return

    def _await_drain(self):
        """After our Suicide: the master answers with Drain; without one in time, drain
        anyway."""
        if not self.draining.wait(self.orphan_deadline):
            log(f"no Drain {self.orphan_deadline:g} s after the Suicide: draining anyway")
            self._begin_drain("suicide (unanswered)", self.orphan_deadline, from_master=False)

    def _unannounced_end(self):
        """Going down without a Suicide the master got (the write side is broken: the
        master closed its end, or a frame was cut short): end the channel, so that the
        master sees the end and sends nothing more here, then drain as an orphan (no
        Drain will come). The Rust library does the same."""
        self._shutdown_channel()
        self._begin_drain("suicide (channel closed)", self.orphan_deadline, from_master=False)

    def _shutdown_channel(self, how: int = socket.SHUT_RDWR):
        self._write_broken = True
        try:
            self._sock.shutdown(how)
        except OSError:
            pass

    def install_error_hooks(self):
        """Uncaught exceptions (any thread) print their traceback as usual, then announce
        a `Suicide` and make the exit status 1. In the main thread the hook also waits,
        until the drain's deadline, for the open connections to finish."""
        if self._hooks_installed:
            return
        self._hooks_installed = True
        previous_sys = sys.excepthook
        previous_threading = threading.excepthook

        def sys_hook(exc_type, exc, tb):
            previous_sys(exc_type, exc, tb)
            if self._inert or issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                return
            self._crashed(exc_type, exc, main_thread=True)

        def thread_hook(args):
            previous_threading(args)
            if self._inert or args.exc_type is SystemExit:
                return
            self._crashed(args.exc_type, args.exc_value, main_thread=False)

        sys.excepthook = sys_hook
        threading.excepthook = thread_hook

    def handle_signals(self):
        """SIGTERM (and SIGINT): leave gracefully (Suicide, drain, exit 0); a second one
        exits at once. Call from the main thread. A forked child gets the handlers back
        that this replaced (the default ones, normally)."""
        if self._inert:
            return

        def handler(signum, frame):
            if os.getpid() != self.pid or self._inert:
                # A forked child that still has our handler: do what it would do without.
                _previous_signal_action(signum, frame, self._previous_handlers.get(signum))
                return
            if self.suicide_reason is not None:
                _flush_std()
                os._exit(128 + signum)
            reason = f"received {signal.Signals(signum).name}"
            # Not in the handler itself: it may have interrupted this very worker's code.
            threading.Thread(target=self.suicide, args=(reason,), name="rr-cluster-signal",
                             daemon=True).start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if sig not in self._previous_handlers:
                self._previous_handlers[sig] = previous
            signal.signal(sig, handler)
        self._signal_handler = handler

    def exit(self, code: Optional[int] = None):
        """Flushes stdout/stderr and ends the process at once with `code` (default:
        `exit_code`), whatever other threads are doing."""
        _flush_std()
        os._exit(self.exit_code if code is None else code)

    def _after_fork_in_child(self):
        # The child has one thread (this one); locks other threads of the parent held
        # at the fork stay held here: fresh ones, before anything else.
        self._inert = True
        self._write_broken = True
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._beat_wake = threading.Condition(threading.Lock())
        self._drain_callbacks = []
        self._message_callback = None
        # SIGTERM/SIGINT: the child's own (multiprocessing's terminate() must end it,
        # not make it announce this worker's suicide and wait for a drain).
        handler = self._signal_handler
        for sig, previous in self._previous_handlers.items():
            try:
                if handler is not None and signal.getsignal(sig) is handler:
                    signal.signal(sig, signal.SIG_DFL if previous is None else previous)
            except (OSError, ValueError, TypeError):
                pass
        # The parent's sockets: the channel, and (shared mode) the listening sockets and
        # the accept threads' wake-up socketpairs (a write to one would wake the parent).
        socks = [self._sock] + self._wakeups + self._accept_socks
        self._wakeups = []
        self._accept_socks = []
        self._accept_threads = []
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass

    # --- channel: writing ------------------------------------------------------------

    def _send(self, msg, timeout: Optional[float] = None) -> bool:
        """Writes one frame; False when the channel is closed (or, with a timeout, the
        frame could not go out in time)."""
        data = protocol.encode_to_master(msg)
        end = None if timeout is None else time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            if self._write_broken:
                return False
            view = memoryview(data)
            poller = None
            while view:
                try:
                    n = self._sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    view = view[n:]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._write_broken = True
                    return False
                if poller is None:
                    poller = select.poll()
                    poller.register(self._sock.fileno(), select.POLLOUT)
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    if len(view) < len(data):
                        self._write_broken = True  # a frame's tail is missing: no more frames
                    return False
                poller.poll(1000 if left is None else max(1, int(left * 1000)))
            return True
        finally:
            self._send_lock.release()

    def _send_ack(self):
        # One at a time (the reader and the heartbeat thread both send them): the
        # threshold kept is the one of the Ack the master gets last.
        with self._ack_lock:
            with self._lock:
                received = self._decoder.received
                self._acked = max(self._acked, received)
                capacity = self.capacity
                self._ack_after = protocol.ack_after(capacity)
                self._window_shut = capacity == 0
                ack = Ack(received, self._decoder.lost, capacity)
            return self._send(ack)

    # --- channel: reading ------------------------------------------------------------

    def _read_hello(self, timeout: float) -> Hello:
        self._sock.settimeout(timeout)
        try:
            while True:
                # Version first (decode_hello); descriptors read with the Hello's bytes
                # are a protocol error (unclaimed), like any frame's surplus.
                item = self._decoder.next_frame(
                    lambda payload, _version: protocol.decode_hello(payload))
                if item is not None:
                    return item[0]
                if not self._recv_once():
                    raise ProtocolError("the channel closed before the master's Hello")
        except socket.timeout:
            raise ProtocolError(f"no Hello from the master within {timeout:g} s") from None
        finally:
            self._sock.settimeout(None)

    def _recv_once(self) -> bool:
        """One recvmsg into the decoder; False at end of stream."""
        data, ancdata, flags, _ = self._sock.recvmsg(_RECV_SIZE, _ANC_SIZE, _MSG_CMSG_CLOEXEC)
        fds = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % _INT
                fds.extend(struct.unpack(f"{usable // _INT}i", cdata[:usable]))
        truncated = bool(flags & socket.MSG_CTRUNC)
        if truncated:
            log(f"MSG_CTRUNC: the kernel dropped descriptors on their way here "
                f"({len(fds)} arrived; descriptor table full? raise RLIMIT_NOFILE)")
        if not data:
            self._decoder.feed(b"", fds, truncated)
            return False
        self._decoder.feed(data, fds, truncated)
        return True

    def _read_loop(self):
        error = None
        try:
            while True:
                while True:
                    with self._lock:
                        # `received` (the decoder's) and `_active` go up in one step, so
                        # that an Ack (heartbeat thread) never counts a connection as
                        # received but not held, and over-announces its capacity.
                        item = self._decoder.next_frame()
                        if item is not None and isinstance(item[0], Connections):
                            self._active += len(item[1])
                    if item is None:
                        break
                    self._handle(*item)
                try:
                    more = self._recv_once()
                except (ConnectionResetError, BrokenPipeError):
                    more = False
                if not more:
                    self._decoder.at_eof()
                    break
        except ProtocolError as e:
            error = e
        except OSError as e:
            error = e
        except BaseException as e:  # a bug here must not leave the worker deaf
            error = e
            traceback.print_exc()
        finally:
            self._decoder.close_pending()
        self.channel_closed.set()
        if error is None:
            self.master_gone = True
            self._begin_drain("the master closed the channel", self.orphan_deadline,
                              from_master=False, tighten=True)
            return
        log(f"channel to the master failed: {error}")
        self.master_gone = True
        # Nothing reads the channel any more (the stream cannot be trusted after a
        # protocol error; the reader failed otherwise): say why, then end the channel,
        # so that the master sends no more connections here, rather than keep sending
        # (heartbeats would keep this worker in rotation).
        what = "protocol error" if isinstance(error, ProtocolError) else "channel reader failed"
        sent = self._ready and self._send(Suicide(_truncate_reason(f"{what}: {error}")),
                                          timeout=0.2)
        self.exit_code = max(self.exit_code, 1)
        if sent or self._suicide_sent or self._deadline_from_master:
            # The master reads the Suicide before the end of the channel (or it sent its
            # Drain already): the worker is leaving, and the end is no loss to it; it
            # waits for the drain's deadline. Only the write side is shut: a send of the
            # master's failing on a channel shut both ways could make it take the end
            # for a lost worker before it reads the Suicide. Drain as an orphan would.
            self._shutdown_channel(socket.SHUT_WR)
            self._begin_drain(what, self.orphan_deadline, from_master=False,
                              tighten=not self._deadline_from_master)
        else:
            # The master sees the end without a Suicide: a lost worker, killed 1 s after
            # its channel closed. Be quick.
            self._shutdown_channel()
            self._begin_drain(what, 0.9, from_master=False, tighten=True)

    def _handle(self, msg, fds):
        if isinstance(msg, Connections):
            lost = msg.count - len(fds)
            if lost:
                log(f"descriptor table full: the kernel dropped {lost} connection(s) on "
                    f"their way to this worker ({self.lost} in all); raise RLIMIT_NOFILE")
            self._deliver(msg.listener, fds, counted=True)
            if self.version >= 2 and self._decoder.received - self._acked >= self._ack_after:
                self._send_ack()
        elif isinstance(msg, Ping):
            if self.version >= 2:
                self._send_ack()
            self._send(Pong())
        elif isinstance(msg, Drain):
            self._begin_drain("drain requested by the master", msg.deadline_ms / 1000.0,
                              from_master=True)
        elif isinstance(msg, User):
            try:
                self.messages.put_nowait(msg.data)
            except queue.Full:
                self.dropped_messages += 1
                n = self.dropped_messages
                if n & (n - 1) == 0:
                    log(f"message from the master dropped ({n} in all): the application "
                        f"does not read Worker.messages")
        elif isinstance(msg, Listener):
            for fd in fds:
                self._adopt_listener(msg.listener, fd)
        else:  # a second Hello
            log("unexpected second Hello from the master; ignored")

    def _deliver(self, listener: int, fds: List[int], counted: bool = False):
        """Queues connections; `counted`: `_active` already counts them (the reader
        raised it with `received`)."""
        with self._lock:
            late = self._closed_incoming
            if late and counted:
                self._active -= len(fds)
            elif not late and not counted:
                self._active += len(fds)
        if late:
            log(f"{len(fds)} connection(s) after the drain: closed")
            protocol._close_all(fds)
            with self._cond:
                self._cond.notify_all()
            return
        for fd in fds:
            try:
                conn = Connection(fileno=fd, listener=listener, release=self._release)
            except OSError as e:
                log(f"a received descriptor is not a socket ({e}): closed")
                protocol._close_all([fd])
                self._release()
                continue
            try:
                conn.setblocking(True)  # the flags were the master's: set the mode
            except OSError:
                pass
            self._incoming.put(conn)

    def _release(self):
        if self._inert:
            return  # a forked child closing its copy
        with self._cond:
            self._active -= 1
            if self._active <= 0:
                self._cond.notify_all()
            reopen = self._window_shut
        if reopen:
            # Room again: tell the master now, not at the next heartbeat.
            with self._beat_wake:
                self._ack_wanted = True
                self._beat_wake.notify()

    # --- shared balancing ------------------------------------------------------------

    def _adopt_listener(self, index: int, fd: int):
        with self._lock:
            late = self._closed_incoming or self._stop_accept.is_set()
        if late:  # after our Suicide or the drain: nothing more is taken
            protocol._close_all([fd])
            return
        try:
            lsock = socket.socket(fileno=fd)
            # The open file description is shared with the master and the other workers:
            # keep it non-blocking (as the master has it), never make it blocking.
            lsock.setblocking(False)
        except OSError as e:
            log(f"the listening socket for listener {index} is unusable: {e}")
            protocol._close_all([fd])
            return
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        t = threading.Thread(target=self._accept_loop, args=(index, lsock, wake_r),
                             name=f"rr-cluster-accept-{index}", daemon=True)
        with self._lock:
            # Checked again under the lock `_stop_accepting` takes: a stop that came
            # meanwhile either sees this thread's wake-up or is seen here. Started under
            # the lock too: `_stop_accepting` joins the threads it finds, and a thread
            # not yet started cannot be joined.
            stopped = self._stop_accept.is_set()
            if not stopped:
                self._wakeups.append(wake_w)
                self._accept_socks.extend((lsock, wake_r))
                self._accept_threads.append(t)
                t.start()
        if stopped:
            for s in (lsock, wake_r, wake_w):
                s.close()

    def _stop_accepting(self):
        """Shared mode: the accept threads stop taking connections and close their
        listening sockets. Returns once they have (at most 1 s each); a connection an
        accept thread took before it stopped is queued, not lost."""
        if self._inert:
            return  # a forked child: the accept threads are the parent's
        with self._lock:
            self._stop_accept.set()
            wakeups, self._wakeups = self._wakeups, []
            threads = list(self._accept_threads)
        for w in wakeups:
            try:
                w.send(b"x")
                w.close()
            except OSError:
                pass
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=1.0)

    def _accept_loop(self, index: int, lsock: socket.socket, wake: socket.socket):
        poller = select.poll()
        poller.register(lsock.fileno(), select.POLLIN)
        poller.register(wake.fileno(), select.POLLIN)
        try:
            while not self._stop_accept.is_set():
                events = poller.poll(1000)
                if self._stop_accept.is_set():
                    break
                if any(fd == wake.fileno() for fd, _ in events):
                    # A wake-up without the stop (a stray byte: never leave it unread,
                    # or every poll returns at once and the loop spins).
                    if not _drain_wakeup(wake):
                        poller.unregister(wake.fileno())  # its other end is closed
                if not any(fd == lsock.fileno() for fd, _ in events):
                    continue
                while not self._stop_accept.is_set():
                    if self.capacity <= 0:
                        time.sleep(0.01)
                        break
                    try:
                        fd, _ = lsock._accept()  # raw descriptor: no socket object churn
                    except (BlockingIOError, InterruptedError):
                        break  # another worker took it
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log(f"accept failed: {e}")
                            time.sleep(0.1)
                            break
                        if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                            continue
                        raise
                    try:
                        os.set_inheritable(fd, False)
                    except OSError:
                        pass
                    self._deliver(index, [fd])
        finally:
            # Stop taking connections: the listening socket is closed first.
            lsock.close()
            wake.close()

    # --- drain -----------------------------------------------------------------------

    def _begin_drain(self, reason: str, seconds: float, *, from_master: bool,
                     tighten: bool = False):
        if self._inert:
            return  # a forked child: the drain is the parent's
        now = time.monotonic()
        seconds = max(0.0, seconds)
        with self._lock:
            deadline = now + seconds
            if self.deadline is None:
                self.deadline = deadline
            elif from_master and not self._deadline_from_master:
                self.deadline = deadline  # the master's word replaces our own guess
            elif tighten or from_master:
                self.deadline = min(self.deadline, deadline)
            if from_master:
                self._deadline_from_master = True
            left = self.deadline - now
            # Be done a little before the SIGKILL: a tenth of the time, 20 ms to 1 s.
            margin = min(max(left / 10.0, 0.02), 1.0)
            self.finish_by = self.deadline - min(margin, left / 2.0)
            first = not self.draining.is_set()
            if first:
                self.drain_reason = reason
                self.drain_started = now
            callbacks, self._drain_callbacks = self._drain_callbacks, []
        self.closing.set()
        self.draining.set()
        # Shared mode: the accept threads close their listeners now (done already if
        # our own Suicide came first).
        self._stop_accepting()
        if first:
            with self._lock:
                # Every connection taken before the drain is queued: end the queue.
                self._closed_incoming = True
            self._incoming.put(_END)
            if self.exit_at_deadline:
                self._watchdog = threading.Thread(target=self._deadline_watch,
                                                  name="rr-cluster-deadline", daemon=True)
                self._watchdog.start()
            if callbacks:
                self._run_callbacks(callbacks)
        with self._cond:
            self._cond.notify_all()

    def _deadline_watch(self):
        while True:
            left = self.finish_by - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.05))
        if self._active:
            log(f"drain deadline: exiting with {self._active} connection(s) still open")
        self.exit()

    def _run_callbacks(self, callbacks):
        def run():
            for cb in callbacks:
                try:
                    cb(self)
                except Exception:
                    traceback.print_exc()

        threading.Thread(target=run, name="rr-cluster-drain-callbacks", daemon=True).start()

    def _discard_queued(self):
        """Closes the connections nobody will take (the main thread died)."""
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if item is _END:
                self._incoming.put(_END)
                return
            item.close()

    # --- heartbeats, messages, errors ------------------------------------------------

    def _heartbeat_loop(self):
        # A Heartbeat and an Ack every interval; between them, an Ack alone when a
        # connection closed while the last Ack announced no capacity.
        interval = self.heartbeat_interval
        next_beat = time.monotonic()
        while True:
            with self._lock:
                beat = Heartbeat(min(self._active, 0xFFFFFFFF), self._decoder.received)
            if not self._send(beat):
                return  # the channel is closed
            if self.version >= 2 and not self._send_ack():
                return
            next_beat += interval
            now = time.monotonic()
            if next_beat < now:  # we were held up: do not burst to catch up
                next_beat = now + interval
            while now < next_beat:
                with self._beat_wake:
                    if not self._ack_wanted:
                        self._beat_wake.wait(next_beat - now)
                    wanted, self._ack_wanted = self._ack_wanted, False
                if self._heartbeat_stop.is_set():
                    return
                if wanted and self._window_shut and self.version >= 2 and not self._send_ack():
                    return
                now = time.monotonic()

    def _message_loop(self):
        while True:
            data = self.messages.get()
            cb = self._message_callback
            try:
                cb(data)
            except Exception:
                traceback.print_exc()

    def _crashed(self, exc_type, exc, *, main_thread: bool):
        if self._inert:
            return
        try:
            text = f"{exc_type.__name__}: {exc}"
        except Exception:
            text = exc_type.__name__ if isinstance(exc_type, type) else "exception"
        where = "" if main_thread else f" in thread {threading.current_thread().name}"
        self.suicide(f"uncaught exception{where}: {text}", exit_code=1)
        if not main_thread:
            return
        # The main thread is gone: nobody takes queued connections any more. Finish the
        # ones being served (their threads live on) until the drain's deadline.
        if not self._ready:
            return
        self.draining.wait(self.orphan_deadline + 1)
        self._discard_queued()
        left = self.time_left()
        self.wait_idle(left if left is not None else self.orphan_deadline)


def start_worker(**options) -> Worker:
    """`Worker(**options)`, or the reason printed on stderr and the process ended: status
    2 outside an rr-cluster pool, 1 when the master cannot be talked to (no `Ready` is
    sent: the master counts a boot failure)."""
    try:
        return Worker(**options)
    except NotAWorker as e:
        log(str(e))
        sys.exit(2)
    except ProtocolError as e:
        log(f"cannot start: {e}")
        sys.exit(1)


def _drain_wakeup(sock: socket.socket) -> bool:
    """Reads every byte waiting on a non-blocking wake-up socket; False at its end."""
    try:
        while True:
            if not sock.recv(4096):
                return False
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def _previous_signal_action(signum, frame, previous):
    """What a process does with `signum` under the handler `previous` (a forked child
    that kept the worker's handler): call it, or restore it and take the signal again."""
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        signal.signal(signum, signal.SIG_IGN)
        return
    signal.signal(signum, signal.SIG_DFL)  # also when unknown (None): the default
    os.kill(os.getpid(), signum)


def _truncate_reason(reason: str) -> str:
    data = str(reason).encode("utf-8", "replace")
    if len(data) <= 4000:
        return str(reason)
    return data[:4000].decode("utf-8", "ignore") + "…"


def _adopt_channel(env):
    """The channel socket named by the environment; removes the RR_CLUSTER_* variables."""
    raw_fd = env.get(ENV_FD)
    raw_inode = env.get(ENV_INODE)
    offered = env.get(ENV_PROTOCOL)
    env_id = env.get(ENV_WORKER_ID)
    # Programs this worker starts must not take themselves for workers.
    for key in [k for k in env if k.startswith("RR_CLUSTER_")]:
        try:
            del env[key]
        except KeyError:
            pass
    if raw_fd is None:
        raise NotAWorker(f"{ENV_FD} is not set: this program runs under `rr-cluster run`")
    try:
        fd = int(raw_fd, 10)
        if fd < 0:
            raise ValueError
    except ValueError:
        raise NotAWorker(f"{ENV_FD}={raw_fd!r} is not a descriptor number") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise NotAWorker(f"{ENV_FD}={fd} is not an open descriptor ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotAWorker(f"{ENV_FD}={fd} is not a socket")
    if raw_inode:
        try:
            inode = int(raw_inode, 10)
        except ValueError:
            raise NotAWorker(f"{ENV_INODE}={raw_inode!r} is not a number") from None
        if inode != st.st_ino:
            raise NotAWorker(f"descriptor {fd} is not this process's channel (inode "
                             f"{st.st_ino}, {ENV_INODE} says {inode}): an inherited environment?")
    os.set_inheritable(fd, False)  # FD_CLOEXEC: our own children must not hold the channel
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise NotAWorker(f"{ENV_FD}={fd} is not a Unix stream socket")
    sock.setblocking(True)
    return sock, offered, env_id
