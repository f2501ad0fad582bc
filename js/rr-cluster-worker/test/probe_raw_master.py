#!/usr/bin/env python3
"""A non-Node master for the Node dialect, in plain Python: checks what Node's IPC
channel does with the bytes and descriptors a Rust master will send.

It creates a socketpair, starts `node WORKER` with NODE_CHANNEL_FD pointing at one end
(as the Rust master will), accepts real TCP connections on 127.0.0.1:0 and hands each
one over with ONE sendmsg carrying one JSON line and one descriptor:

    {"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"rr":"connection","listener":0}}\\n

It counts the {"cmd":"NODE_HANDLE_ACK"} lines Node answers with.

    probe_raw_master.py load [--connections N] [--window W] [--concurrency C]
        W = how many handles may be un-ACKed at once (0: no limit, pipelined).
    probe_raw_master.py burst [--connections N]
        accepts N connections, then sends their N handles back to back, no waiting.
    probe_raw_master.py experiments
        edge cases: a NODE_HANDLE without descriptor, a line split across two
        sendmsg, two descriptors in one sendmsg, a full descriptor table (MSG_CTRUNC),
        end of file, a blank line, an unknown serialization mode, a large message,
        close-on-exec of the channel, NODE_-prefixed user messages, a Unix-socket
        connection, a listening socket (shared mode), an unknown handle type, a
        descriptor that is not a socket, TCP_NODELAY after the hand-over.
        --quick skips the one that waits ~6 s (end of file with an idle keep-alive).

Prints one JSON object with the results on stdout (--json) or a readable summary.
Linux, Python 3.9+, standard library only. Every wait is bounded.
"""
import argparse
import concurrent.futures
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PLAIN_WORKER = os.path.normpath(os.path.join(HERE, "..", "..", "..", "examples", "node", "plain.js"))
NODE = os.environ.get("NODE", "node")

HANDLE_LINE = (json.dumps({"cmd": "NODE_HANDLE", "type": "net.Socket",
                           "msg": {"rr": "connection", "listener": 0}},
                          separators=(",", ":")) + "\n").encode()

# A worker that reports over the channel what reaches process.on('message').
ECHO_WORKER = r"""
const fs = require('fs');
process.on('message', (m, handle) => {
  if (handle) { handle.end('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok'); }
  process.send({ echo: m, handle: handle ? handle.constructor.name : null,
                 size: JSON.stringify(m).length });
});
let cloexec = null;
try {
  const flags = fs.readFileSync(`/proc/self/fdinfo/${process.channel.fd}`, 'utf8').match(/flags:\s*(\d+)/)[1];
  cloexec = (parseInt(flags, 8) & 0o2000000) !== 0;
} catch {}
process.send({ rr: 'ready', env_fd: process.env.NODE_CHANNEL_FD ?? null,
               env_mode: process.env.NODE_CHANNEL_SERIALIZATION_MODE ?? null, cloexec });
"""


# A worker that accepts connections itself on a listening socket it is sent.
SHARED_WORKER = r"""
process.on('message', (m, server) => {
  if (!server) return;
  server.on('connection', (s) => s.end(`hello from ${process.pid}`));
  process.send({ listening: server.listening });
});
process.send({ rr: 'ready' });
"""


class Worker:
    """A worker process and the master's end of its channel."""

    def __init__(self, argv, env_extra=None, rlimit_nofile=None, mode="json"):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items()
               if k not in ("NODE_UNIQUE_ID", "NODE_TEST_CONTEXT", "NODE_CHANNEL_FD")}
        env.update({
            "NODE_CHANNEL_FD": str(child.fileno()),
            "NODE_CHANNEL_SERIALIZATION_MODE": mode,
            "RR_CLUSTER_PROTOCOL": "node",
            "RR_CLUSTER_WORKER_ID": "0",
            "RR_CLUSTER_GENERATION": "0",
            "RR_CLUSTER_HEARTBEAT_MS": "1000",
            "RR_CLUSTER_LISTENERS": '[{"kind":"tcp","address":"127.0.0.1:0"}]',
        })
        env.update(env_extra or {})

        def limit():
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # one experiment aborts Node
            if rlimit_nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (rlimit_nofile, rlimit_nofile))

        self.proc = subprocess.Popen(argv, env=env, pass_fds=(child.fileno(),),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=limit)
        child.close()
        self.lock = threading.Condition()
        self.messages = []      # every JSON line from the worker, in order
        self.acks = 0
        self.nacks = 0
        self.eof = False
        self.window = None      # threading.Semaphore when handles are windowed
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        self.stdio = threading.Thread(target=self._drain_stdio, daemon=True)
        self.stdio.start()

    def _drain_stdio(self):
        out, err = self.proc.communicate()
        self.stderr = err

    def _read(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self.lock:
                    self.eof = True
                    self.lock.notify_all()
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            with self.lock:
                for line in lines:
                    msg = json.loads(line)
                    self.messages.append(msg)
                    cmd = msg.get("cmd") if isinstance(msg, dict) else None
                    if cmd == "NODE_HANDLE_ACK":
                        self.acks += 1
                    elif cmd == "NODE_HANDLE_NACK":
                        self.nacks += 1
                    if cmd in ("NODE_HANDLE_ACK", "NODE_HANDLE_NACK") and self.window:
                        self.window.release()
                self.lock.notify_all()

    def wait(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
            return True

    def wait_ready(self, timeout=10):
        ok = self.wait(lambda: any(isinstance(m, dict) and m.get("rr") == "ready"
                                   for m in self.messages), timeout)
        if not ok:
            raise RuntimeError(f"worker not ready: {self.stderr.decode(errors='replace')}")
        return next(m for m in self.messages if isinstance(m, dict) and m.get("rr") == "ready")

    def send_handle(self, fd, line=HANDLE_LINE):
        n = socket.send_fds(self.sock, [line], [fd])
        if n != len(line):  # never for a line this short on an AF_UNIX stream socket
            self.sock.sendall(line[n:])

    def send_line(self, obj):
        self.sock.sendall((json.dumps(obj, separators=(",", ":")) + "\n").encode())

    def exit_code(self, timeout):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.stdio.join(2)  # self.stderr complete
        return code

    def kill(self):
        if self.proc.poll() is None:  # still alive: its pid is still ours
            self.proc.kill()
            self.proc.wait(5)
        self.sock.close()


def http_get(port, timeout=10):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or not body:
        raise RuntimeError(f"bad response: {data[:200]!r}")
    return body


def load(connections, window, concurrency, worker_path=PLAIN_WORKER, timeout=60):
    """Serves `connections` real HTTP connections through one worker."""
    w = Worker([NODE, worker_path])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        w.wait_ready()
        if window > 0:
            w.window = threading.Semaphore(window)
        stop = threading.Event()
        sent = [0]

        def accept_loop():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                with conn:
                    if w.window and not w.window.acquire(timeout=10):
                        raise RuntimeError("no ACK within 10 s")
                    w.send_handle(conn.fileno())
                    sent[0] += 1   # our copy is closed on leaving `with`

        acceptor = threading.Thread(target=accept_loop, daemon=True)
        acceptor.start()
        errors = []
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(http_get, port) for _ in range(connections)]
            for f in concurrent.futures.as_completed(futures, timeout=timeout):
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
        elapsed = time.monotonic() - start
        stop.set()
        acceptor.join(2)
        w.wait(lambda: w.acks + w.nacks >= sent[0], 5)
        # End of file on the channel, no drain: the worker must leave by itself.
        eof_at = time.monotonic()
        w.sock.shutdown(socket.SHUT_WR)
        code = w.exit_code(10)
        return {"connections": connections, "window": window, "concurrency": concurrency,
                "sent": sent[0], "acks": w.acks, "nacks": w.nacks, "errors": len(errors),
                "first_errors": errors[:3], "seconds": round(elapsed, 3),
                "exit_after_eof": code, "exit_seconds": round(time.monotonic() - eof_at, 3)}
    finally:
        listener.close()
        w.kill()


def burst(count, worker_path=PLAIN_WORKER):
    """Accepts `count` connections first, then sends all their handles back to back
    without waiting for a single ACK; then every client sends its request."""
    w = Worker([NODE, worker_path])
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    port = listener.getsockname()[1]
    clients = []
    try:
        w.wait_ready()
        conns = []
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            conns.append(listener.accept()[0])
        start = time.monotonic()
        for conn in conns:
            w.send_handle(conn.fileno())
            conn.close()
        send_seconds = time.monotonic() - start
        w.wait(lambda: w.acks + w.nacks >= count, 20)
        ack_seconds = time.monotonic() - start
        errors = 0
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for c in clients:
            data = read_all(c, 10)
            if not (data.startswith(b"HTTP/1.1 200") and b"Hello from worker" in data):
                errors += 1
        return {"burst": count, "acks": w.acks, "nacks": w.nacks, "errors": errors,
                "send_seconds": round(send_seconds, 3), "all_acked_seconds": round(ack_seconds, 3)}
    finally:
        for c in clients:
            c.close()
        listener.close()
        w.kill()


def tcp_pair():
    """A connected TCP pair: (server side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server_side, _ = srv.accept()
    return server_side, client


def echo_of(w, index, timeout=5):
    """The index-th {echo} message the echo worker sent, or None."""
    def echoes():
        return [m for m in w.messages if isinstance(m, dict) and "echo" in m]
    w.wait(lambda: len(echoes()) > index, timeout)
    e = echoes()
    return e[index] if len(e) > index else None


def read_all(sock, timeout=5):
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


def eof_with_idle_keepalive():
    """(c) End of file while plain.js still holds an idle keep-alive connection."""
    w = Worker([NODE, PLAIN_WORKER])
    try:
        w.wait_ready()
        server_side, client = tcp_pair()
        w.send_handle(server_side.fileno())
        server_side.close()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.settimeout(5)
        first = client.recv(4096)
        t0 = time.monotonic()
        w.sock.shutdown(socket.SHUT_WR)
        code = w.exit_code(15)
        client.close()
        return {"response": first.split(b"\r\n", 1)[0].decode(),
                "exit_code": code, "seconds": round(time.monotonic() - t0, 3)}
    finally:
        w.kill()


def experiments(quick=False):
    r = {}
    echo = [NODE, "-e", ECHO_WORKER]

    # Environment and close-on-exec as the worker sees them.
    w = Worker(echo)
    try:
        ready = w.wait_ready()
        r["worker_env_after_start"] = {"NODE_CHANNEL_FD": ready["env_fd"],
                                       "NODE_CHANNEL_SERIALIZATION_MODE": ready["env_mode"]}
        r["channel_fd_cloexec_in_worker"] = ready["cloexec"]

        # (b) A NODE_HANDLE line with no descriptor.
        w.send_line({"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": {"rr": "connection"}})
        w.wait(lambda: w.nacks + w.acks >= 1, 5)
        r["handle_line_without_fd"] = {"acks": w.acks, "nacks": w.nacks,
                                       "delivered": echo_of(w, 0, 1) is not None,
                                       "worker_alive": w.proc.poll() is None}

        # (b) A line whose descriptor rides its first half; the rest in a second sendmsg.
        acks0, nacks0 = w.acks, w.nacks
        server_side, client = tcp_pair()
        half = len(HANDLE_LINE) // 2
        socket.send_fds(w.sock, [HANDLE_LINE[:half]], [server_side.fileno()])
        server_side.close()
        time.sleep(0.2)  # the worker reads the first half alone
        w.sock.sendall(HANDLE_LINE[half:])
        e = echo_of(w, 0)
        r["line_split_fd_in_first_half"] = {"acks": w.acks - acks0, "nacks": w.nacks - nacks0,
                                            "handle": e and e["handle"],
                                            "served": read_all(client).endswith(b"ok")}
        client.close()

        # A connection of a Unix-socket listener: Node wraps it as a net.Socket too.
        u_srv, u_cli = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        before = len([m for m in w.messages if "echo" in m])
        w.send_handle(u_srv.fileno())
        u_srv.close()
        e = echo_of(w, before)
        r["unix_socket_connection"] = {"handle": e and e["handle"],
                                       "served": read_all(u_cli, 2).endswith(b"ok")}
        u_cli.close()

        # (e) NODE_-prefixed and other user messages: which reach process.on('message')?
        n0 = len([m for m in w.messages if "echo" in m])
        w.send_line({"cmd": "NODE_FOO", "x": 1})
        w.send_line({"cmd": "NODEFOO", "x": 2})
        w.send_line({"hello": "world"})
        w.send_line("a string")
        w.wait(lambda: len([m for m in w.messages if "echo" in m]) >= n0 + 3, 3)
        time.sleep(0.2)
        r["user_messages_delivered"] = [m["echo"] for m in w.messages if "echo" in m][n0:]

        # (e) A large message: no size limit in the JSON mode.
        big = "x" * (8 * 1024 * 1024)
        w.send_line({"big": big})
        e = echo_of(w, n0 + 3, 20)
        r["8MiB_message"] = {"delivered": bool(e and e["size"] > len(big))}

        # (d) Two lines and two descriptors in ONE sendmsg, then a third ordinary one.
        # (Last on this worker: it leaves a descriptor queued in libuv.)
        a_srv, a_cli = tcp_pair()
        b_srv, b_cli = tcp_pair()
        c_srv, c_cli = tcp_pair()
        acks0, nacks0 = w.acks, w.nacks
        socket.send_fds(w.sock, [HANDLE_LINE + HANDLE_LINE], [a_srv.fileno(), b_srv.fileno()])
        a_srv.close()
        b_srv.close()
        w.wait(lambda: w.acks + w.nacks >= acks0 + nacks0 + 2, 5)
        after_two = {"acks": w.acks - acks0, "nacks": w.nacks - nacks0}
        w.send_handle(c_srv.fileno())
        c_srv.close()
        w.wait(lambda: w.acks + w.nacks >= acks0 + nacks0 + 3, 5)
        served = {name: read_all(cli, 1).endswith(b"ok")
                  for name, cli in (("first", a_cli), ("second", b_cli), ("third", c_cli))}
        r["two_fds_in_one_sendmsg"] = {"after_the_two": after_two,
                                       "after_a_third_normal": {"acks": w.acks - acks0,
                                                                "nacks": w.nacks - nacks0},
                                       "served": served}
        for cli in (a_cli, b_cli, c_cli):
            cli.close()

        # (c) End of file (no drain): 'disconnect', and the process exits once idle.
        t0 = time.monotonic()
        w.sock.shutdown(socket.SHUT_WR)
        code = w.exit_code(10)
        r["eof_idle_worker"] = {"exit_code": code, "seconds": round(time.monotonic() - t0, 3)}
    finally:
        w.kill()

    if not quick:
        r["eof_plain_worker_with_idle_keepalive"] = eof_with_idle_keepalive()

    # TCP_NODELAY on a handed-over connection (net.Server sets it on the sockets it
    # accepts; a socket emitted with server.emit('connection') does not get it).
    r["tcp_nodelay_after_handover"] = {}
    app = os.path.join(os.path.dirname(PLAIN_WORKER), "app.js")
    for name, path in (("plain.js", PLAIN_WORKER), ("app.js (package)", app)):
        w = Worker([NODE, path])
        try:
            w.wait_ready()
            server_side, client = tcp_pair()
            keep = server_side.dup()  # the same socket: its options are shared
            w.send_handle(server_side.fileno())
            server_side.close()
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            client.settimeout(5)
            client.recv(4096)
            r["tcp_nodelay_after_handover"][name] = bool(
                keep.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            keep.close()
            client.close()
        finally:
            w.kill()

    # Shared mode: a listening socket sent as a net.Server; the worker accepts on it.
    w = Worker([NODE, "-e", SHARED_WORKER])
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        w.wait_ready()
        line = (json.dumps({"cmd": "NODE_HANDLE", "type": "net.Server",
                            "msg": {"rr": "listen", "listener": 0}}, separators=(",", ":")) + "\n")
        w.send_handle(listener.fileno(), line.encode())
        w.wait(lambda: any(m.get("listening") for m in w.messages if isinstance(m, dict)), 5)
        got = []
        for _ in range(3):
            with socket.create_connection(listener.getsockname(), timeout=5) as c:
                got.append(read_all(c, 5).decode())
        r["listening_socket_as_net_server"] = {"acks": w.acks, "nacks": w.nacks, "replies": got}
    finally:
        listener.close()
        w.kill()

    # A NODE_HANDLE whose type Node does not know; a descriptor that is not a socket.
    for name, line, make in (
        ("unknown_handle_type", b'{"cmd":"NODE_HANDLE","type":"rr.Thing","msg":{}}\n', tcp_pair),
        ("regular_file_descriptor", HANDLE_LINE,
         lambda: (open(__file__, "rb"), None)),
    ):
        w = Worker(echo)
        try:
            w.wait_ready()
            fd_owner, peer = make()
            w.send_handle(fd_owner.fileno(), line)
            fd_owner.close()
            code = w.exit_code(5)
            r[name] = {"acks": w.acks, "nacks": w.nacks, "exit_code": code,
                       "stderr": [x for x in w.stderr.decode(errors="replace").splitlines()
                                  if "Error" in x or "Assertion" in x or "CHECK" in x][:2]}
            if peer:
                peer.close()
        finally:
            w.kill()

    # (e) A blank line.
    w = Worker(echo)
    try:
        w.wait_ready()
        w.sock.sendall(b"\n")
        code = w.exit_code(5)
        r["blank_line"] = {"exit_code": code, "stderr": [
            line for line in w.stderr.decode(errors="replace").splitlines() if "Error" in line][:1]}
    finally:
        w.kill()

    # (e) An unknown NODE_CHANNEL_SERIALIZATION_MODE.
    w = Worker(echo, mode="bogus")
    try:
        code = w.exit_code(5)
        time.sleep(0.1)
        r["serialization_mode_bogus"] = {"exit_code": code, "stderr": [
            line for line in w.stderr.decode(errors="replace").splitlines() if "Error" in line][:2]}
    finally:
        w.kill()

    # (d) A full descriptor table in the worker: MSG_CTRUNC. The worker's limit leaves
    # room for Node itself and a few connections; each connection stays open.
    w = Worker([NODE, PLAIN_WORKER], rlimit_nofile=40)
    clients = []
    try:
        w.wait_ready()
        for _ in range(40):
            server_side, client = tcp_pair()
            clients.append(client)
            w.send_handle(server_side.fileno())
            server_side.close()
            w.wait(lambda n=len(clients): w.acks + w.nacks >= n, 5)
        ok = 0
        for c in clients:
            try:
                c.settimeout(2)
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if c.recv(4096).startswith(b"HTTP/1.1 200"):
                    ok += 1
            except OSError:
                pass
        r["fd_table_full_rlimit_40"] = {"sent": len(clients), "acks": w.acks, "nacks": w.nacks,
                                        "served": ok, "worker_alive": w.proc.poll() is None}
    finally:
        for c in clients:
            c.close()
        w.kill()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["load", "burst", "experiments"])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--window", type=int, default=0, help="max un-ACKed handles; 0 = no limit")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--worker", default=PLAIN_WORKER)
    ap.add_argument("--quick", action="store_true", help="experiments: skip the ~6 s one")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.what == "load":
        result = load(a.connections, a.window, a.concurrency, a.worker)
    elif a.what == "burst":
        result = burst(a.connections, a.worker)
    else:
        result = experiments(a.quick)
    print(json.dumps(result, indent=None if a.json else 2))


if __name__ == "__main__":
    sys.exit(main())
