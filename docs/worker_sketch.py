#!/usr/bin/env python3
"""A minimal rr-cluster worker in Python, following docs/PROTOCOL.md.

It answers every connection the master passes with a fixed HTTP response, one at a
time, and does a worker's duties: Ready, heartbeats, Pong, Drain, end of file.
`python3 worker_sketch.py --selftest` checks the codec against the dumps in PROTOCOL.md.
"""
import collections
import os
import re
import select
import socket
import struct
import sys
import time

VERSION = 1
MAX_FRAME_LEN = 64 * 1024
MAX_FDS_PER_FRAME = 64
SCM_MAX_FD = 253
INT_SIZE = struct.calcsize("i")


class ProtocolError(Exception):
    pass


# --- encoding: worker -> master (ToMaster) --------------------------------------------

def frame(payload):
    if len(payload) > MAX_FRAME_LEN:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_LEN}")
    return struct.pack("<I", len(payload)) + payload


def ready(pid, version=VERSION):
    return frame(struct.pack("<III", 0, pid, version))


def heartbeat(active, served):
    return frame(struct.pack("<IIQ", 1, active, served))


def suicide(reason):
    data = reason.encode("utf-8")
    return frame(struct.pack("<IQ", 2, len(data)) + data)


def pong():
    return frame(struct.pack("<I", 3))


def user(data):
    return frame(struct.pack("<IQ", 4, len(data)) + bytes(data))


# --- decoding: master -> worker (ToWorker) --------------------------------------------

class Cursor:
    """Reads fixed-width little-endian fields from one payload."""

    def __init__(self, payload):
        self.data, self.pos = payload, 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise ProtocolError("payload ends inside a field")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(chunk)

    def u16(self):
        return struct.unpack("<H", self.take(2))[0]

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def bytes(self):
        return self.take(self.u64())  # take() checks the length against what is left

    def string(self):
        try:
            return self.bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"invalid UTF-8: {e}") from None

    def end(self):
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes")


def decode_to_worker(payload):
    """One ToWorker payload as a tuple: ("Hello", dict), ("Connections", listener, count),
    ("Drain", deadline_ms), ("Ping",) or ("User", bytes)."""
    c = Cursor(payload)
    tag = c.u32()
    if tag == 0:
        hello = {"version": c.u32(), "worker_id": c.u32(), "generation": c.u64(),
                 "heartbeat_ms": c.u32(), "listeners": []}
        for _ in range(c.u64()):
            kind = c.u32()
            if kind not in (0, 1):
                raise ProtocolError(f"unknown listener kind {kind}")
            hello["listeners"].append((("Tcp", "Unix")[kind], c.string()))
        msg = ("Hello", hello)
    elif tag == 1:
        msg = ("Connections", c.u16(), c.u16())
        if msg[2] > MAX_FDS_PER_FRAME:
            raise ProtocolError(f"frame claims {msg[2]} descriptors")
    elif tag == 2:
        msg = ("Drain", c.u64())
    elif tag == 3:
        msg = ("Ping",)
    elif tag == 4:
        msg = ("User", c.bytes())
    else:
        raise ProtocolError(f"unknown message tag {tag}")
    c.end()
    return msg


def decode_hello(payload):
    """The first frame: the version is checked before anything else is decoded."""
    if len(payload) >= 8:
        tag, version = struct.unpack_from("<II", payload)
        if tag == 0 and version != VERSION:
            raise ProtocolError(f"version mismatch: master speaks {version}, we speak {VERSION}")
    msg = decode_to_worker(payload)
    if msg[0] != "Hello":
        raise ProtocolError(f"expected Hello as the first frame, got {msg[0]}")
    return msg[1]


# --- the channel: bytes plus a FIFO of descriptors ------------------------------------

class Channel:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.fds = collections.deque()

    def send(self, data):
        self.sock.sendall(data)

    def read_some(self):
        """One recvmsg: appends bytes and descriptors. False at end of stream."""
        data, ancdata, flags, _ = self.sock.recvmsg(
            256 * 1024, socket.CMSG_SPACE(SCM_MAX_FD * INT_SIZE), socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % INT_SIZE
                self.fds.extend(struct.unpack(f"{usable // INT_SIZE}i", cdata[:usable]))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("descriptors were truncated in transit")
        if not data:
            if self.buf:
                raise ProtocolError(f"channel closed inside a frame ({len(self.buf)} bytes)")
            self.check_unclaimed()
            return False
        self.buf += data
        return True

    def next_payload(self):
        """(payload, fd FIFO) of the next complete frame, or None; call decode next."""
        if len(self.buf) < 4:
            self.check_unclaimed()
            return None
        (length,) = struct.unpack_from("<I", self.buf)
        if length > MAX_FRAME_LEN:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_LEN}")
        if len(self.buf) < 4 + length:
            return None
        payload = bytes(self.buf[4:4 + length])
        del self.buf[:4 + length]
        return payload

    def take_fds(self, count):
        if count > len(self.fds):
            raise ProtocolError(f"frame claims {count} descriptors, {len(self.fds)} arrived")
        fds = [self.fds.popleft() for _ in range(count)]
        self.check_unclaimed()
        return fds

    def check_unclaimed(self):
        if not self.buf and self.fds:
            count = len(self.fds)
            while self.fds:
                os.close(self.fds.popleft())
            raise ProtocolError(f"{count} descriptors arrived that no frame claims")

    def recv_blocking(self):
        """The next whole payload, reading as needed (used for the handshake)."""
        while True:
            payload = self.next_payload()
            if payload is not None:
                return payload
            if not self.read_some():
                raise ProtocolError("channel closed before Hello")


# --- the worker -----------------------------------------------------------------------

def serve(fd, worker_id, generation):
    """Answers one HTTP request on a passed connection, then closes it."""
    with socket.socket(fileno=fd) as conn:  # family and type are read from the socket
        conn.setblocking(True)  # the flags are the master's: set the mode explicitly
        conn.settimeout(5)
        try:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 16384:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            body = f"hello from python worker {worker_id} (generation {generation})\n"
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n{body}".encode())
        except OSError as e:
            print(f"worker {worker_id}: connection failed: {e}", file=sys.stderr)


def main():
    fd = int(os.environ.pop("RR_CLUSTER_CHANNEL_FD"))
    worker_id = int(os.environ.pop("RR_CLUSTER_WORKER_ID", "0"))
    generation = int(os.environ.pop("RR_CLUSTER_GENERATION", "0"))
    sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)  # a close-on-exec dup
    os.close(fd)  # the inherited number would leak into our own children
    sock.setblocking(True)
    chan = Channel(sock)

    try:
        hello = decode_hello(chan.recv_blocking())
    except ProtocolError as e:
        sys.exit(f"worker {worker_id}: {e}")  # no Ready: the master sees the exit
    if hello["worker_id"] != worker_id:
        print(f"worker {worker_id}: Hello names slot {hello['worker_id']}", file=sys.stderr)
    chan.send(ready(os.getpid()))

    interval = max(hello["heartbeat_ms"], 1) / 1000
    next_beat = time.monotonic() + interval
    served = 0
    try:
        while True:
            # Frames already buffered first: one recvmsg may have brought several.
            while (payload := chan.next_payload()) is not None:
                msg = decode_to_worker(payload)
                fds = chan.take_fds(msg[2] if msg[0] == "Connections" else 0)
                if msg[0] == "Connections":
                    for conn_fd in fds:
                        serve(conn_fd, worker_id, generation)
                        served += 1
                elif msg[0] == "Ping":
                    chan.send(pong())
                elif msg[0] == "Drain":
                    return  # nothing in progress: exit well before deadline_ms
                elif msg[0] == "User":
                    chan.send(user(msg[1]))  # echo, as a demonstration
                else:
                    raise ProtocolError("a second Hello")
            now = time.monotonic()
            if now >= next_beat:
                chan.send(heartbeat(0, served))  # connections are served inline: 0 open
                next_beat = now + interval
            readable, _, _ = select.select([sock], [], [], max(0, next_beat - now))
            if readable and not chan.read_some():
                return  # end of file: the master is gone; nothing is in progress
    except ProtocolError as e:
        try:
            chan.send(suicide(f"protocol error: {e}"))
        except OSError:
            pass
        sys.exit(f"worker {worker_id}: {e}")
    except (ConnectionResetError, BrokenPipeError):
        return  # the master is gone


# --- self test against the dumps in PROTOCOL.md ---------------------------------------

def selftest():
    doc = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "PROTOCOL.md")).read()
    frames = {name: bytes.fromhex(hexstr) for name, hexstr in re.findall(
        r"<!-- begin frame (\S+) -->.*?All \d+ bytes: `([0-9a-f]+)`", doc, re.S)}
    hello = {"version": 1, "worker_id": 3, "generation": 7, "heartbeat_ms": 1000,
             "listeners": [("Tcp", "127.0.0.1:8080"), ("Unix", "/run/app.sock")]}
    decoded = {
        "ToWorker::Hello": ("Hello", hello),
        "ToWorker::Connections": ("Connections", 1, 3),
        "ToWorker::Drain": ("Drain", 30000),
        "ToWorker::Ping": ("Ping",),
        "ToWorker::User": ("User", b"hi"),
    }
    encoded = {
        "ToMaster::Ready": ready(4242),
        "ToMaster::Heartbeat": heartbeat(3, 99),
        "ToMaster::Suicide": suicide("out of memory"),
        "ToMaster::Pong": pong(),
        "ToMaster::User": user(bytes([0, 1, 2, 255])),
    }
    assert sorted(frames) == sorted([*decoded, *encoded]), sorted(frames)
    for name, want in decoded.items():
        data = frames[name]
        assert struct.unpack_from("<I", data)[0] == len(data) - 4, name
        assert decode_to_worker(data[4:]) == want, name
    assert decode_hello(frames["ToWorker::Hello"][4:]) == hello
    for name, want in encoded.items():
        assert want == frames[name], (name, want.hex(), frames[name].hex())
    # Errors, not exceptions of another kind, on bad input.
    bad = [b"", b"\x05\0\0\0", b"\x04\0\0\0" + b"\xff" * 8, b"\x03\0\0\0\0",
           b"\x01\0\0\0\0\0\x41\0", frames["ToWorker::Hello"][4:-1]]
    for payload in bad:
        try:
            decode_to_worker(payload)
        except ProtocolError:
            continue
        raise AssertionError(f"accepted {payload.hex()}")
    try:
        decode_hello(b"\0\0\0\0\x02\0\0\0")
        raise AssertionError("accepted a Hello of version 2")
    except ProtocolError as e:
        assert "version mismatch" in str(e)
    print(f"selftest: {len(frames)} frames match PROTOCOL.md")


if __name__ == "__main__":
    selftest() if sys.argv[1:] == ["--selftest"] else main()
