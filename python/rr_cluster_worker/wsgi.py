"""A threaded HTTP/1.1 WSGI server for the connections an rr-cluster master passes, with
the worker's drain duties (docs/PROTOCOL.md#the-workers-duties) done right.

Design: one selector thread watches every connection that waits for a request (new
ones, and keep-alive ones between requests); a connection with bytes to read goes to a
pool of `threads` threads, which reads one request, runs the application, writes the
response, and hands the connection back to the selector (or serves the next pipelined
request at once). An idle connection costs no thread, so thousands of idle keep-alive
connections are cheap, and a slow application never holds up the heartbeats (they have
their own thread in `Worker`).

The drain, from the master's `Drain` (or the end of its channel, or a suicide):

- no new connection comes; those received before the drain are still served, first
  request included;
- every response whose head is not written yet gets `Connection: close`, and its
  connection is closed after it (so a keep-alive client that sends one more request gets
  a full answer, not a reset);
- a connection that stays idle is closed only after `idle_grace` seconds (2 by default),
  counted from the drain or from its last response, whichever is later: a request may
  already be on its way;
- the process exits with status 0 once every connection is closed, or just before the
  master's deadline at the latest (1 after an uncaught exception).
"""

import email.utils
import errno
import io
import os
import queue
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Optional
from urllib.parse import unquote_to_bytes

from wsgiref.util import FileWrapper

from .worker import start_worker

__all__ = ["serve_wsgi", "WSGIServer"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
               "te", "trailer", "upgrade"}
_NO_BODY_STATUS = (204, 304)
_REASONS = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 505: "HTTP Version Not Supported"}
_LINGER = 1.0  # seconds a closed-for-writing connection waits for the client's FIN
_WAIT = object()  # no whole request head yet, nothing more to read now: back to the selector


#: The slowest a client may take a response, bytes per second on average: one call of
#: `_send_all` (a response head, a body chunk) gets max(request_timeout, its length /
#: MIN_SEND_RATE) seconds in all, then the connection is closed. (1 KiB/s: well below a
#: throttled mobile link; the kernel's socket buffers come on top. Kestrel's minimum
#: response rate is 240 bytes/s.) None or 0: no such limit, only each wait's.
MIN_SEND_RATE = 1024


def _send_all(sock: socket.socket, data, min_rate: Optional[float] = MIN_SEND_RATE):
    """`sock.sendall(data)`, with the socket's timeout bounding each wait for room (a
    stalled client), not the whole call: `sendall`'s timeout covers all of it (Python
    3.5 and later), which cuts a large response to a client that reads steadily. The
    whole call is bounded too, by max(timeout, len(data) / min_rate) seconds: a client
    taking a byte now and then (each wait just under the timeout) does not hold the
    thread for ever (unless `min_rate` is None or 0). Raises `socket.timeout` after
    either."""
    with memoryview(data) as view, view.cast("B") as rest:
        total = len(rest)
        if not total:
            return
        start = time.monotonic()
        n = sock.send(rest)
        if n >= total:
            return  # the usual case: all of it at once
        rest = rest[n:]
        wait = sock.gettimeout()
        end = start + max(wait or 0.0, total / min_rate) if min_rate else float("inf")
        changed = False
        try:
            while rest:
                left = end - time.monotonic()
                if left <= 0:
                    raise socket.timeout(f"the client took {total - len(rest)} of {total} "
                                         f"bytes in {end - start:.1f} s")
                if wait is None or left < wait:
                    sock.settimeout(left)  # the last wait ends with the whole call's time
                    changed = True
                n = sock.send(rest)
                rest = rest[n:]
        finally:
            if changed:
                sock.settimeout(wait)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    """The client closed or reset the connection, or was too slow."""


class _Conn:
    __slots__ = ("sock", "buf", "idle_since", "head_started", "seen_readable",
                 "linger_until", "listener", "peer", "local", "requests", "fd", "closed")

    def __init__(self, sock: socket.socket, listener: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        # The last traffic: the last response, or the last byte of a request head.
        self.idle_since = time.monotonic()
        # When the first byte of a request head not yet complete arrived (None: none).
        self.head_started: Optional[float] = None
        # When the selector saw bytes (or the end) waiting, if that is why a pool thread
        # has the connection now (None otherwise): they arrived by then.
        self.seen_readable: Optional[float] = None
        self.linger_until = 0.0
        self.listener = listener
        self.requests = 0
        self.closed = False
        try:
            self.peer = sock.getpeername()
        except OSError:
            self.peer = None
        try:
            self.local = sock.getsockname()
        except OSError:
            self.local = None

    def recv_more(self) -> bool:
        """Appends what the socket has (blocking, with the socket's timeout); False at
        end of stream."""
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise _ClientGone("timed out") from None
        except OSError as e:
            raise _ClientGone(str(e)) from None
        if not data:
            return False
        self.buf += data
        return True

    def recv_now(self) -> Optional[bool]:
        """Appends what the socket has now, without waiting: True if bytes came, False
        at end of stream, None when nothing is waiting. One read(2): a socket with a
        timeout is non-blocking underneath (its own recv() would poll first)."""
        if self.sock.gettimeout() is None:  # a blocking descriptor: ask first
            if not _readable(self.sock):
                return None
            return self.recv_more()
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            raise _ClientGone(str(e)) from None
        if not data:
            return False
        self.buf += data
        return True


class _Input(io.RawIOBase):
    """`wsgi.input`: the request body (Content-Length or chunked), read on demand. It
    sends `100 Continue` before the first read when the client asked for it."""

    def __init__(self, conn: _Conn, length: Optional[int], chunked: bool,
                 send_continue: Optional[Callable[[], None]], max_chunk_line: int = 4096):
        super().__init__()
        self._conn = conn
        self._left = length or 0  # Content-Length: bytes left; chunked: of this chunk
        self._chunked = chunked
        self._done = not chunked and not length
        self._continue = send_continue
        self._pending = bytearray()  # read ahead by readline
        self._max_line = max_chunk_line
        self.broken = False  # the body could not be read to its end

    def readable(self):
        return True

    @property
    def finished(self) -> bool:
        return self._done and not self._pending

    def _need(self):
        if self._continue is not None:
            cont, self._continue = self._continue, None
            cont()
        if not self._conn.recv_more():
            self.broken = True
            raise ConnectionError("the client closed the connection inside the request body")

    def _line(self) -> bytes:
        buf = self._conn.buf
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                return line
            if len(buf) > self._max_line:
                self.broken = True
                raise ValueError("malformed chunked body: a line is too long")
            self._need()

    def _next_chunk(self):
        line = self._line().split(b";", 1)[0].strip()
        try:
            if not line or any(c not in b"0123456789abcdefABCDEF" for c in line):
                raise ValueError
            size = int(line, 16)
        except ValueError:
            self.broken = True
            raise ValueError(f"malformed chunked body: bad chunk size {line[:40]!r}") from None
        if size == 0:
            while self._line().strip():  # trailer fields: ignored
                pass
            self._done = True
        self._left = size

    def _read_raw(self, n: int) -> bytes:
        """Up to n body bytes (at least 1 unless the body is done)."""
        if self._pending:
            out = bytes(self._pending[:n])
            del self._pending[:n]
            return out
        while not self._done:
            if self._left == 0:
                if not self._chunked:
                    self._done = True
                    break
                self._next_chunk()
                continue
            buf = self._conn.buf
            if not buf:
                self._need()
                continue
            take = min(n, self._left, len(buf))
            out = bytes(buf[:take])
            del buf[:take]
            self._left -= take
            if self._left == 0:
                if self._chunked:
                    # The CRLF after the chunk's data.
                    while len(self._conn.buf) < 2:
                        self._need()
                    if self._conn.buf[:2] != b"\r\n":
                        self.broken = True
                        raise ValueError("malformed chunked body: no CRLF after a chunk")
                    del self._conn.buf[:2]
                else:
                    self._done = True
            return out
        return b""

    def read(self, size=-1):
        if size is None or size < 0:
            parts = []
            while True:
                chunk = self._read_raw(1 << 16)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        if size == 0:
            return b""
        parts, want = [], size
        while want > 0:
            chunk = self._read_raw(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, size=-1):
        limit = size if size is not None and size >= 0 else None
        out = bytearray()
        while limit is None or len(out) < limit:
            chunk = self._read_raw(8192 if limit is None else min(8192, limit - len(out)))
            if not chunk:
                break
            i = chunk.find(b"\n")
            if i >= 0:
                out += chunk[:i + 1]
                self._pending[:0] = chunk[i + 1:]
                break
            out += chunk
        return bytes(out)

    def readlines(self, hint=-1):
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def discard(self, limit: int) -> bool:
        """Reads and drops the rest of the body, at most `limit` bytes; whether it is
        all gone (the connection may then serve another request)."""
        if self._continue is not None:
            return self._done and not self._pending  # the client waits for our 100
        self._pending.clear()
        total = 0
        try:
            while not self._done:
                chunk = self._read_raw(65536)
                total += len(chunk)
                if total > limit:
                    return False
        except (ConnectionError, ValueError, _ClientGone, OSError):
            return False
        return True


class _Exchange:
    """One request's response: start_response, write, framing."""

    def __init__(self, server, conn, method, version, keep_alive, body: _Input):
        self.server = server
        self.conn = conn
        self.method = method
        self.version = version  # (1, 0) or (1, 1)
        self.keep_alive = keep_alive  # what the request allows
        self.body = body
        self.status = None
        self.code = 0
        self.headers = None
        self.head_sent = False
        self.close = not keep_alive
        self.chunked = False
        self.length = None  # Content-Length of the response, when known
        self.sent = 0
        self.head_only = method == "HEAD"

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit() \
                or (len(status) > 3 and status[3] != " ") or "\r" in status or "\n" in status:
            raise ValueError(f"invalid WSGI status {status!r}")
        checked = []
        for item in headers:
            name, value = item
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"header names and values must be str: {item!r}")
            if not name or any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
                raise ValueError(f"invalid header {item!r}")
            checked.append((name, value))
        self.status = status
        self.code = int(status[:3])
        self.headers = checked
        return self.write

    def _head(self, total: Optional[int]):
        """Writes the response head; `total` is the body's length when known."""
        server = self.server
        if self.status is None:
            raise AssertionError("the application wrote a body before start_response")
        no_body = self.code in _NO_BODY_STATUS or 100 <= self.code < 200
        lines = [f"HTTP/1.1 {self.status}\r\n"]
        have_date = have_server = False
        for name, value in self.headers:
            low = name.lower()
            if low in _HOP_BY_HOP:
                if low == "connection" and "close" in value.lower():
                    self.close = True
                continue  # the server frames the response and manages the connection
            if low == "content-length":
                try:
                    self.length = int(value.strip())
                    if self.length < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(f"invalid Content-Length {value!r}") from None
            elif low == "date":
                have_date = True
            elif low == "server":
                have_server = True
            lines.append(f"{name}: {value}\r\n")
        if self.length is None and not no_body:
            if total is not None:
                self.length = total
                lines.append(f"Content-Length: {total}\r\n")
            elif self.head_only:
                pass  # no body follows a HEAD response whatever its headers say
            elif self.version >= (1, 1):
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.close = True  # HTTP/1.0: the end of the body is the end of the connection
        if no_body:
            self.length = 0
        # The drain duty: from the drain on, every response says the connection ends.
        if server.closing():
            self.close = True
        if not self.body.finished and self.body._continue is not None:
            self.close = True  # the client still waits to send a body we never asked for
        if not have_date:
            lines.append(f"Date: {email.utils.formatdate(usegmt=True)}\r\n")
        if not have_server and server.server_header:
            lines.append(f"Server: {server.server_header}\r\n")
        if self.close:
            lines.append("Connection: close\r\n")
        elif self.version < (1, 1):
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        self.head_sent = True
        self._send("".join(lines).encode("latin-1"))

    def _send(self, data):
        try:
            _send_all(self.conn.sock, data, self.server.min_send_rate)
        except socket.timeout:
            raise _ClientGone("write timed out") from None
        except OSError as e:
            raise _ClientGone(str(e)) from None

    def write(self, data):
        """The legacy `write()` callable, and the path of every body chunk."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"WSGI body chunks must be bytes, not {type(data).__name__}")
        if not self.head_sent:
            self._head(None)
        if not data or self.head_only or self.code in _NO_BODY_STATUS:
            return
        if self.length is not None:
            room = self.length - self.sent
            if len(data) > room:
                data = bytes(data[:room])
                self.close = True  # the application wrote more than its Content-Length
            if not data:
                return
        self.sent += len(data)
        if self.chunked:
            self._send(b"%x\r\n" % len(data) + bytes(data) + b"\r\n")
        else:
            self._send(data)

    def finish(self, single: Optional[bytes] = None):
        if single is not None and not self.head_sent:
            self._head(len(single))
            self.write(single)
        elif not self.head_sent:
            self._head(0)
        if self.chunked and not self.head_only:
            self._send(b"0\r\n\r\n")
        if self.length is not None and self.sent < self.length and not self.head_only:
            self.close = True  # short body: the client can only tell by the connection ending


class WSGIServer:
    """The HTTP/1.1 server behind `serve_wsgi`: add connections with `add()`.

    `worker` is anything with the `Worker` attributes `closing`, `draining`,
    `drain_started` and `id` (a `Worker`, normally).
    """

    def __init__(self, app, worker, *, threads: int = 32, idle_grace: float = 2.0,
                 keepalive_timeout: float = 75.0, request_timeout: float = 30.0,
                 max_header_size: int = 64 * 1024, max_discard: int = 1 << 20,
                 server_header: Optional[str] = "rr-cluster-python", access_log: bool = False,
                 min_send_rate: Optional[float] = MIN_SEND_RATE):
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if min_send_rate is not None and min_send_rate < 0:
            raise ValueError("min_send_rate must be positive, 0 or None")
        self.app = app
        self.worker = worker
        self.threads = threads
        self.idle_grace = max(0.0, idle_grace)
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.min_send_rate = min_send_rate
        self.max_header_size = max_header_size
        self.max_discard = max_discard
        self.server_header = server_header
        self.access_log = access_log
        self._tasks: "queue.Queue" = queue.Queue()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending = deque()  # (what, conn) for the selector thread
        self._idle = {}  # fd -> _Conn waiting for a request
        self._lingering = {}  # fd -> _Conn closed for writing, waiting for the FIN
        self._lock = threading.Lock()
        self._all_closed = threading.Condition(self._lock)
        self._open = 0
        self._shut = False
        self._started = False
        self._threads = []
        self._selector_thread = None

    # --- public ----------------------------------------------------------------------

    def start(self):
        if self._started:
            return
        self._started = True
        t = threading.Thread(target=self._select_loop, name="rr-wsgi-selector", daemon=True)
        self._selector_thread = t
        t.start()
        self._threads.append(t)
        for i in range(self.threads):
            t = threading.Thread(target=self._pool_loop, name=f"rr-wsgi-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def add(self, sock: socket.socket, listener: Optional[int] = None):
        """Serves a connection (the server closes it)."""
        if listener is None:
            listener = getattr(sock, "listener", 0)
        try:
            sock.settimeout(self.request_timeout)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = _Conn(sock, listener)
        with self._lock:
            self._open += 1
        self._post("idle", conn)

    def close(self):
        """Stops the server's threads and closes every connection at once (no drain:
        for tests and embedding; `serve_wsgi` never needs it)."""
        self._shut = True
        for _ in range(self.threads):
            self._tasks.put(None)
        self._post("wake", None)
        if self._selector_thread is not None:
            self._selector_thread.join(2)
        for conn in list(self._idle.values()) + list(self._lingering.values()):
            self._close_now(conn)
        self._idle.clear()
        self._lingering.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def open_connections(self) -> int:
        return self._open

    def closing(self) -> bool:
        return self.worker.closing.is_set()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Waits until every connection is closed; whether they are."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._all_closed:
            while self._open > 0:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._all_closed.wait(0.5 if left is None else min(left, 0.5))
        return True

    # --- the selector thread ---------------------------------------------------------

    def _post(self, what, conn):
        self._pending.append((what, conn))
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the wake-up buffer is full: the selector is awake anyway

    def _select_loop(self):
        sel = self._selector
        while not self._shut:
            while self._pending:
                what, conn = self._pending.popleft()
                if conn is None:
                    continue  # a wake-up only
                table = self._idle if what == "idle" else self._lingering
                try:
                    sel.register(conn.sock, selectors.EVENT_READ, what)
                    table[conn.fd] = conn
                except (ValueError, KeyError, OSError):
                    self._close_now(conn)
            timeout = self._expire(time.monotonic())
            try:
                events = sel.select(timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for key, _ in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                fd = key.fd
                if key.data == "idle":
                    conn = self._idle.pop(fd, None)
                    if conn is None:
                        continue
                    self._unregister(conn)
                    conn.seen_readable = now
                    self._tasks.put(conn)
                else:
                    conn = self._lingering.get(fd)
                    if conn is not None:
                        self._linger_read(conn)

    def _unregister(self, conn):
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _expire(self, now: float) -> float:
        """Closes connections idle too long; the time until the next check."""
        draining = self.worker.draining.is_set()
        started = self.worker.drain_started or now
        timeout = 1.0
        for fd, conn in list(self._idle.items()):
            if draining:
                since = max(conn.idle_since, started)
                limit = self.idle_grace
            else:
                since = conn.idle_since
                limit = self.keepalive_timeout
            left = since + limit - now
            if conn.head_started is not None:
                # Part of a request head: the rest is due within request_timeout of its
                # first byte (a client sending a byte now and then holds no thread, and
                # not the connection forever either).
                left = min(left, conn.head_started + self.request_timeout - now)
            if left <= 0:
                del self._idle[fd]
                self._unregister(conn)
                overdue = conn.head_started is not None and \
                    now - conn.head_started >= self.request_timeout
                if _readable(conn.sock):
                    conn.seen_readable = now  # a request arrived at the last moment
                    self._tasks.put(conn)
                elif overdue:
                    # Part of a head, and its time is up: a thread answers 408 (as when
                    # it sees the deadline itself), reading first what came meanwhile.
                    self._tasks.put(conn)
                else:
                    self._start_linger(conn, unregistered=True)
            else:
                timeout = min(timeout, left)
        for fd, conn in list(self._lingering.items()):
            left = conn.linger_until - now
            if left <= 0:
                del self._lingering[fd]
                self._unregister(conn)
                self._close_now(conn)
            else:
                timeout = min(timeout, left)
        if draining:
            timeout = min(timeout, 0.1)
        return max(timeout, 0.005)

    def _start_linger(self, conn, unregistered=False):
        """Half-close: the client sees the end of the stream; we wait (briefly) for its
        FIN before closing, so that bytes it sent meanwhile do not turn into a reset that
        destroys the response it has not read yet."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)  # from now on read by the selector thread only
        except OSError:
            self._close_now(conn)
            return
        conn.linger_until = time.monotonic() + _LINGER
        if threading.current_thread() is self._selector_thread:
            try:
                self._selector.register(conn.sock, selectors.EVENT_READ, "linger")
                self._lingering[conn.fd] = conn
            except (ValueError, KeyError, OSError):
                self._close_now(conn)
        else:
            self._post("linger", conn)

    def _linger_read(self, conn):
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    break
        except (BlockingIOError, InterruptedError):
            return  # not yet
        except OSError:
            pass
        self._lingering.pop(conn.fd, None)
        self._unregister(conn)
        self._close_now(conn)

    def _close_now(self, conn):
        if conn.closed:
            return
        conn.closed = True
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._all_closed:
            self._open -= 1
            if self._open <= 0:
                self._all_closed.notify_all()

    # --- the pool --------------------------------------------------------------------

    def _pool_loop(self):
        while True:
            conn = self._tasks.get()
            if conn is None:
                return  # close()
            try:
                self._serve(conn)
            except BaseException:
                # Whatever escapes, the thread stays in the pool: a thread lost here
                # would leave its connection open and the pool a thread smaller.
                traceback.print_exc()
                self._close_now(conn)

    def _serve(self, conn: _Conn):
        while True:
            try:
                keep = self._one_request(conn)
            except _ClientGone:
                keep = False
                self._close_now(conn)
                return
            if keep is _WAIT:
                # No whole head yet (or only empty lines): the selector watches the
                # connection; no thread waits for a slow or idle client.
                self._post("idle", conn)
                return
            if not keep:
                self._start_linger(conn)
                return
            conn.idle_since = time.monotonic()
            if not conn.buf:
                self._post("idle", conn)
                return
            # A pipelined request is already here: serve it now.

    def _read_head(self, conn: _Conn):
        """The request head (without its final CRLFCRLF); None if the client closed
        before sending one; `_WAIT` when no whole head has arrived and nothing more can
        be read now (the connection goes back to the selector: a pool thread never
        waits for a head). A head must be whole within `request_timeout` of its first
        byte's arrival (408 after that); what arrived meanwhile is read before that is
        checked, so time spent queued for a busy pool never counts against the client."""
        seen, conn.seen_readable = conn.seen_readable, None
        start = 0
        arrived = None  # the bytes just read were here by then (None: no read yet)
        while True:
            # Ignore empty lines before a request (RFC 9112, 2.2): they are not the
            # start of a head, and alone they leave the connection idle (no traffic).
            while conn.buf[:2] == b"\r\n":
                del conn.buf[:2]
            if not conn.buf:
                conn.head_started = None
                start = 0
            else:
                if conn.head_started is None:
                    conn.head_started = time.monotonic() if arrived is None else arrived
                if arrived is not None:
                    conn.idle_since = time.monotonic()  # a head's bytes are traffic
            i = conn.buf.find(b"\r\n\r\n", start)
            if i > self.max_header_size:
                raise _BadRequest(431, "request head too large")
            if i >= 0:
                head = bytes(conn.buf[:i])
                del conn.buf[:i + 4]
                conn.head_started = None
                return head
            if len(conn.buf) > self.max_header_size:
                raise _BadRequest(431, "request head too large")
            start = max(0, len(conn.buf) - 3)
            more = conn.recv_now()
            # The bytes just read were here by now; the first read's first one by the
            # time the selector saw it (the pool may have been busy since).
            arrived = seen if seen is not None else time.monotonic()
            seen = None
            if more is None:  # nothing more now: the head is late, or not yet
                if conn.head_started is not None and \
                        time.monotonic() - conn.head_started >= self.request_timeout:
                    raise _BadRequest(408, "the request head did not arrive in time")
                return _WAIT
            if not more:
                if conn.buf.strip():
                    raise _ClientGone("the client closed inside a request head")
                return None

    def _one_request(self, conn: _Conn) -> bool:
        """Serves one request; whether the connection may serve another (`_WAIT`: no
        whole request head yet)."""
        try:
            head = self._read_head(conn)
        except _BadRequest as e:
            self._error(conn, e.status, str(e))
            return False
        if head is _WAIT:
            return _WAIT
        if head is None:
            self._close_now(conn)
            raise _ClientGone("closed")
        try:
            environ, keep_alive, body, version, method = self._environ(conn, head)
        except _BadRequest as e:
            self._error(conn, e.status, str(e))
            return False
        conn.requests += 1
        ex = _Exchange(self, conn, method, version, keep_alive, body)
        result = None
        try:
            result = self.app(environ, ex.start_response)
            try:
                n = len(result)
            except TypeError:
                n = None
            if n is not None and n <= 1 and not ex.head_sent:
                data = b"".join(result)
                ex.finish(bytes(data))
            else:
                for chunk in result:
                    ex.write(chunk)
                ex.finish()
        except _ClientGone:
            self._close_now(conn)
            raise
        except SystemExit as e:
            # sys.exit() in a handler ends a gunicorn worker; here the worker leaves
            # gracefully: this request fails, the others finish, the master replaces it.
            # As the process would have exited: None is 0, a message 1, -1 is 255.
            code = e.code % 256 if isinstance(e.code, int) else (0 if e.code is None else 1)
            self.worker.suicide(f"the WSGI application called sys.exit({e.code!r})",
                                exit_code=code)
            if not ex.head_sent:
                self._error(conn, 500, "internal server error")
                return False
            self._close_now(conn)
            raise _ClientGone("application exited after the head was sent") from None
        except Exception:
            print(f"rr_cluster_worker: error in the WSGI application ({method} "
                  f"{environ.get('REQUEST_URI', '')}):", file=sys.stderr)
            traceback.print_exc()
            if not ex.head_sent:
                self._error(conn, 500, "internal server error")
                return False
            self._close_now(conn)
            raise _ClientGone("application failed after the head was sent") from None
        finally:
            if hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    traceback.print_exc()
        if self.access_log:
            print(f'{conn.peer} "{method} {environ.get("REQUEST_URI", "")}" {ex.code} {ex.sent}',
                  file=sys.stderr)
        if ex.close or body.broken:
            return False
        if not body.finished and not body.discard(self.max_discard):
            return False
        return True

    def _error(self, conn: _Conn, status: int, message: str):
        body = f"{status} {_REASONS.get(status, 'Error')}: {message}\n".encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        try:
            _send_all(conn.sock, head + body, self.min_send_rate)
        except OSError:
            pass

    def _environ(self, conn: _Conn, head: bytes):
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # latin-1 decodes everything; kept for clarity
            raise _BadRequest(400, "undecodable head") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "malformed request line")
        method, target, proto = parts
        if not method or not method.isascii() or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in method):
            raise _BadRequest(400, "malformed method")
        if proto == "HTTP/1.1":
            version = (1, 1)
        elif proto == "HTTP/1.0":
            version = (1, 0)
        elif proto.startswith("HTTP/"):
            raise _BadRequest(505, f"{proto} is not supported")
        else:
            raise _BadRequest(400, "malformed request line")
        headers = []
        for line in lines[1:]:
            if not line:
                continue
            if line[0] in " \t":
                raise _BadRequest(400, "obsolete line folding")
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, f"malformed header line {line[:60]!r}")
            headers.append((name.lower(), value.strip(" \t")))

        env = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "SERVER_PROTOCOL": proto,
            "REQUEST_URI": target,
            "RAW_URI": target,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
            "rr_cluster.worker": self.worker,
            "rr_cluster.listener": conn.listener,
        }
        path = target
        if target.startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
        elif target == "*":
            path = ""
        elif not target.startswith("/"):
            raise _BadRequest(400, "malformed request target")
        path, _, query = path.partition("?")
        path = path.partition("#")[0]
        env["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        env["QUERY_STRING"] = query

        content_length = None
        transfer_encoding = None
        connection_tokens = set()
        expect = None
        host = None
        for name, value in headers:
            if name == "content-length":
                if not value.isdigit():
                    raise _BadRequest(400, "invalid Content-Length")
                if content_length is not None and int(value) != content_length:
                    raise _BadRequest(400, "conflicting Content-Length headers")
                content_length = int(value)
                env["CONTENT_LENGTH"] = value
                continue
            if name == "content-type":
                env["CONTENT_TYPE"] = value
                continue
            if name == "transfer-encoding":
                transfer_encoding = (transfer_encoding + ", " + value) if transfer_encoding else value
            elif name == "connection":
                connection_tokens.update(t.strip().lower() for t in value.split(","))
            elif name == "expect":
                expect = value.lower()
            elif name == "host":
                if host is not None:
                    raise _BadRequest(400, "more than one Host header")
                host = value
            if "_" in name:
                continue  # could pass for another header once turned into HTTP_*
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in env:
                sep = "; " if key == "HTTP_COOKIE" else ", "
                env[key] = env[key] + sep + value
            else:
                env[key] = value

        chunked = False
        if transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
            if version < (1, 1):
                raise _BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            if not codings or codings[-1] != "chunked" or codings.count("chunked") != 1:
                raise _BadRequest(501, f"unsupported Transfer-Encoding {transfer_encoding!r}")
            if len(codings) > 1:
                raise _BadRequest(501, f"unsupported Transfer-Encoding {transfer_encoding!r}")
            if content_length is not None:
                raise _BadRequest(400, "both Transfer-Encoding and Content-Length")
            chunked = True
            env.pop("CONTENT_LENGTH", None)
        if version >= (1, 1):
            keep_alive = "close" not in connection_tokens
        else:
            keep_alive = "keep-alive" in connection_tokens and "close" not in connection_tokens
        if version >= (1, 1) and host is None:
            raise _BadRequest(400, "an HTTP/1.1 request without Host")

        send_continue = None
        if expect is not None:
            if expect != "100-continue":
                raise _BadRequest(417, f"unsupported expectation {expect!r}")
            if version >= (1, 1) and (chunked or content_length):
                def send_continue(conn=conn):
                    try:
                        _send_all(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError as e:
                        raise ConnectionError(f"cannot send 100 Continue: {e}") from None
        body = _Input(conn, content_length, chunked, send_continue)
        env["wsgi.input"] = body

        # SERVER_NAME / SERVER_PORT, REMOTE_ADDR / REMOTE_PORT.
        local, peer = conn.local, conn.peer
        if isinstance(local, tuple):
            server_name, server_port = local[0], str(local[1])
        else:
            server_name, server_port = "localhost", "80"
        if host:
            h = host
            if h.startswith("["):
                end = h.find("]")
                name, port = h[1:end], h[end + 2:] if end >= 0 and h[end + 1:end + 2] == ":" else ""
            else:
                name, _, port = h.partition(":")
            if name:
                server_name = name
            if port.isdigit():
                server_port = port
            elif not isinstance(local, tuple):
                server_port = "80"
        env["SERVER_NAME"] = server_name
        env["SERVER_PORT"] = server_port
        if isinstance(peer, tuple):
            env["REMOTE_ADDR"] = peer[0]
            env["REMOTE_PORT"] = str(peer[1])
        else:
            env["REMOTE_ADDR"] = ""
        return env, keep_alive, body, version, method


def _readable(sock) -> bool:
    """Bytes (or the end of stream) waiting, without blocking: a poll, since a socket's
    own methods would wait for its timeout."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


def serve_wsgi(app, *, threads: int = 32, idle_grace: float = 2.0,
               keepalive_timeout: float = 75.0, request_timeout: float = 30.0,
               worker=None, handle_signals: bool = True, exit: bool = True,
               on_drain=None, server_header: Optional[str] = "rr-cluster-python",
               access_log: bool = False, min_send_rate: Optional[float] = MIN_SEND_RATE,
               **worker_options):
    """Serves the WSGI application `app` on the connections the master passes, with a
    pool of `threads` threads, until the drain is done; then exits the process (status
    0; 1 after an uncaught exception), or returns the status with `exit=False`.

    `idle_grace`: during the drain, idle keep-alive connections are closed after this
    long (seconds). `keepalive_timeout`: outside the drain, after this long.
    `request_timeout`: the longest wait for a request's bytes or the client's reading.
    `min_send_rate`: a response (each head, body chunk) gets max(request_timeout, its
    length / min_send_rate) seconds to go out in all; after that the connection is closed
    (None or 0: no such limit).
    `on_drain(worker)`: called (on a thread of its own) when the drain begins.
    Other keyword arguments go to `Worker` (when `worker` is not given).
    """
    if worker is None:
        worker = start_worker(**worker_options)
    server = WSGIServer(app, worker, threads=threads, idle_grace=idle_grace,
                        keepalive_timeout=keepalive_timeout, request_timeout=request_timeout,
                        server_header=server_header, access_log=access_log,
                        min_send_rate=min_send_rate)
    server.start()
    if handle_signals and threading.current_thread() is threading.main_thread():
        worker.handle_signals()
    if on_drain is not None:
        worker.on_drain(on_drain)
    worker.ready()
    for conn in worker:
        server.add(conn)
    left = worker.time_left()
    server.wait_closed(left)
    code = worker.exit_code
    if exit:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.exit(code)
    return code
