"""A fake rr-cluster master for the tests: a socketpair, a worker subprocess with the
channel in its environment, and the protocol spoken from the test."""

import array
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time

from conftest import HERE, PYTHON_DIR
from rr_cluster_worker import protocol as p

APPS = os.path.join(HERE, "apps")


class FakeMaster:
    def __init__(self, args, *, offer="2", heartbeat_ms=200, worker_id=0, generation=0,
                 listeners=(p.ListenerInfo("tcp", "127.0.0.1:0"),), hello=True,
                 nofile=None, inode=None, extra_env=None):
        self.sock, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = PYTHON_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for key in [k for k in env if k.startswith("RR_CLUSTER_")]:
            del env[key]
        env["RR_CLUSTER_CHANNEL_FD"] = str(child.fileno())
        env["RR_CLUSTER_CHANNEL_INODE"] = str(os.fstat(child.fileno()).st_ino if inode is None else inode)
        if offer is not None:
            env["RR_CLUSTER_PROTOCOL"] = offer
        env["RR_CLUSTER_WORKER_ID"] = str(worker_id)
        env["RR_CLUSTER_GENERATION"] = str(generation)
        env.update(extra_env or {})
        preexec = None
        if nofile is not None:
            def preexec():
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        self.heartbeat_ms = heartbeat_ms
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *args], env=env, pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=preexec, start_new_session=True)
        child.close()
        self.messages = queue.Queue()
        self.log = []  # (monotonic time, message)
        self.stderr = []
        self.stdout = []
        self.eof = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._pipe, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._pipe, args=(self.proc.stdout, self.stdout), daemon=True),
        ]
        for t in self._threads:
            t.start()
        if hello:
            self.send(p.Hello(1, worker_id, generation, heartbeat_ms, tuple(listeners)))

    # --- I/O -------------------------------------------------------------------------

    def _read(self):
        dec = p.FrameDecoder(2)
        try:
            while True:
                data, anc, flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                fds = []
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
                if fds:
                    for fd in fds:
                        os.close(fd)
                    self.messages.put(AssertionError(f"the worker sent {len(fds)} descriptors"))
                if not data:
                    break
                dec.feed(data)
                while True:
                    item = dec.next_frame(p.decode_to_master)
                    if item is None:
                        break
                    msg, _ = item
                    self.log.append((time.monotonic(), msg))
                    self.messages.put(msg)
        except p.ProtocolError as e:
            self.messages.put(AssertionError(f"the worker broke the protocol: {e}"))
        except OSError:
            pass
        self.eof.set()
        self.messages.put(None)

    @staticmethod
    def _pipe(stream, lines):
        for line in iter(stream.readline, b""):
            lines.append(line.decode("utf-8", "replace").rstrip("\n"))
        stream.close()

    def send(self, msg, fds=()):
        data = p.encode_to_worker(msg)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def send_connections(self, socks, listener=0):
        """Sends the sockets (one frame; the master's copies are closed after)."""
        self.send(p.Connections(listener, len(socks)), [s.fileno() for s in socks])
        for s in socks:
            s.close()

    def next(self, timeout=5.0):
        """The next message; AssertionError on timeout or end of stream."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s; stderr: {self.stderr_text()}") from None
        if msg is None:
            self.messages.put(None)
            raise AssertionError(f"the channel ended; stderr: {self.stderr_text()}")
        if isinstance(msg, AssertionError):
            raise msg
        return msg

    def expect(self, kind, timeout=5.0, skip=(p.Heartbeat, p.Ack)):
        """The next message of type `kind`, skipping `skip` types (anything else fails)."""
        end = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, end - time.monotonic()))
            if isinstance(msg, kind):
                return msg
            if not isinstance(msg, skip):
                raise AssertionError(f"expected {kind.__name__}, got {msg!r}")

    def wait_eof(self, timeout=5.0):
        assert self.eof.wait(timeout), "the worker's channel did not end"

    def wait_exit(self, timeout=10.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit within {timeout} s; stderr: "
                                 f"{self.stderr_text()}") from None

    def stderr_text(self):
        return "\n".join(self.stderr[-40:])

    def heartbeats(self, since=0.0, until=None):
        return [(t, m) for t, m in list(self.log) if isinstance(m, p.Heartbeat)
                and t >= since and (until is None or t <= until)]

    def close_channel(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def kill(self):
        """Kills the worker if it is still alive (by its PID, while known alive)."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        self.sock.close()
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except Exception:
                pass
        return False


# --- TCP and HTTP helpers -----------------------------------------------------------

class Listener:
    """A TCP listening socket on 127.0.0.1:0 standing for the master's listener."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.addr = self.sock.getsockname()

    def pair(self, timeout=5.0):
        """(client socket, accepted socket)."""
        client = socket.create_connection(self.addr, timeout=timeout)
        self.sock.settimeout(timeout)
        server, _ = self.sock.accept()
        return client, server

    def close(self):
        self.sock.close()


def request(sock, path="/", keep_alive=True, method="GET", headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if not keep_alive:
        lines.append("Connection: close")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self):
        return f"Response({self.status}, {self.headers}, {self.body!r})"


def read_response(sock, timeout=10.0, buf=None, head_only=False):
    """One HTTP/1.1 response (Content-Length or chunked bodies)."""
    sock.settimeout(timeout)
    data = buf if buf is not None else bytearray()

    def fill():
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"end of stream after {bytes(data)[:200]!r}")
        data.extend(chunk)

    while b"\r\n\r\n" not in data:
        fill()
    i = data.index(b"\r\n\r\n")
    head = bytes(data[:i]).decode("latin-1").split("\r\n")
    del data[:i + 4]
    status = int(head[0].split(" ")[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if head_only or status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b"")
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in data:
                fill()
            j = data.index(b"\r\n")
            size = int(bytes(data[:j]), 16)
            del data[:j + 2]
            while len(data) < size + 2:
                fill()
            body += data[:size]
            del data[:size + 2]
            if size == 0:
                break
        return Response(status, headers, bytes(body))
    n = int(headers.get("content-length", "0"))
    while len(data) < n:
        fill()
    body = bytes(data[:n])
    del data[:n]
    return Response(status, headers, body)


def at_eof(sock, timeout=5.0) -> bool:
    """Whether the peer closes the connection (EOF or reset) within the timeout."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
