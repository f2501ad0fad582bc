"""The rr-cluster channel protocol (docs/PROTOCOL.md): messages, their encoding, and the
frame decoder that assigns received descriptors to their frames.

Everything here is pure (no threads, no sockets of its own): the `Worker` class does the
I/O. Both directions are implemented, so that a test (or a fake master) can play the
other side: `decode_to_worker` / `encode_to_master` are what a worker needs,
`encode_to_worker` / `decode_to_master` what a master needs.

Every malformed input raises `ProtocolError` (never another exception).
"""

import collections
import os
import struct
from dataclasses import dataclass
from typing import Deque, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "PROTOCOL_VERSION", "HANDSHAKE_VERSION", "MAX_FRAME_LEN", "MAX_FDS_PER_FRAME",
    "MAX_PENDING_FDS", "SCM_MAX_FD", "ACK_EVERY", "WINDOW", "ack_after", "MAX_USER_DATA", "ProtocolError",
    "VersionMismatch", "ListenerInfo", "Hello", "Connections", "Drain", "Ping", "User",
    "Listener", "Ready", "Heartbeat", "Suicide", "Pong", "Ack", "frame", "peek_len",
    "encode_to_master", "decode_to_master", "encode_to_worker", "decode_to_worker",
    "decode_hello", "negotiate", "FrameDecoder",
]

#: The highest protocol version this package speaks.
PROTOCOL_VERSION = 2
#: `Hello.version`: the version of the handshake's layout, 1 forever.
HANDSHAKE_VERSION = 1
#: The largest payload of one frame (`MAX_FRAME_LEN`).
MAX_FRAME_LEN = 64 * 1024
#: The most descriptors one `Connections` frame may claim.
MAX_FDS_PER_FRAME = 64
#: More descriptors than this waiting for their frames is a protocol error.
MAX_PENDING_FDS = 1012
#: The kernel's limit of descriptors in one `SCM_RIGHTS` message.
SCM_MAX_FD = 253
#: A version-2 worker sends an `Ack` at the latest once this many descriptors arrived
#: since its last (after fewer when its window is small: `ack_after`).
ACK_EVERY = 64
#: The most descriptors the master keeps in flight to a version-2 worker.
WINDOW = 512
#: The most bytes a `User` message can carry (the frame limit less tag and length).
MAX_USER_DATA = MAX_FRAME_LEN - 12



def ack_after(capacity: int) -> int:
    """Descriptors received since the last `Ack` after which the next is due, given the
    capacity that `Ack` announced: a quarter of the window (`min(WINDOW, capacity)`),
    at least 1 and at most `ACK_EVERY`."""
    return max(1, min(ACK_EVERY, min(WINDOW, capacity) // 4))


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class ProtocolError(Exception):
    """The peer broke docs/PROTOCOL.md (or a message cannot be encoded). After one, the
    channel cannot be trusted: close it."""


class VersionMismatch(ProtocolError):
    """`Hello.version` is not 1 (or the first frame is not a `Hello`): a master this
    package cannot talk to."""


# --- messages -------------------------------------------------------------------------
# Frozen dataclasses (not tuples): a Ready never compares equal to a Heartbeat.

class ListenerInfo(NamedTuple):
    kind: str  # "tcp" or "unix"
    address: str  # for display only


@dataclass(frozen=True)
class Hello:
    version: int
    worker_id: int
    generation: int
    heartbeat_ms: int
    listeners: Tuple[ListenerInfo, ...]


@dataclass(frozen=True)
class Connections:
    listener: int
    count: int


@dataclass(frozen=True)
class Drain:
    deadline_ms: int


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class User:
    data: bytes


@dataclass(frozen=True)
class Listener:
    listener: int


@dataclass(frozen=True)
class Ready:
    pid: int
    version: int


@dataclass(frozen=True)
class Heartbeat:
    active: int
    served: int


@dataclass(frozen=True)
class Suicide:
    reason: str


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Ack:
    received: int
    lost: int
    capacity: int


ToWorker = Union[Hello, Connections, Drain, Ping, User, Listener]
ToMaster = Union[Ready, Heartbeat, Suicide, Pong, User, Ack]

_KINDS = ("tcp", "unix")
# Tags, in declaration order, and the version that introduced each.
_TO_WORKER_TAGS = {Hello: 0, Connections: 1, Drain: 2, Ping: 3, User: 4, Listener: 5}
_TO_MASTER_TAGS = {Ready: 0, Heartbeat: 1, Suicide: 2, Pong: 3, User: 4, Ack: 5}
_TAG_VERSION = {5: 2}  # tags 0..4 exist in every version


def fd_count(msg) -> int:
    """How many descriptors a ToWorker message claims."""
    if isinstance(msg, Connections):
        return msg.count
    if isinstance(msg, Listener):
        return 1
    return 0


# --- encoding -------------------------------------------------------------------------

def frame(payload: bytes) -> bytes:
    """A payload with its length prefix."""
    if len(payload) > MAX_FRAME_LEN:
        raise ProtocolError(f"message too large: {len(payload)} bytes, at most {MAX_FRAME_LEN}")
    return _U32.pack(len(payload)) + payload


def _check_int(name, value, bits):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ProtocolError(f"{name} = {value!r} does not fit in a u{bits}")
    return value


def _blob(data) -> bytes:
    data = bytes(data)
    return _U64.pack(len(data)) + data


def encode_to_master(msg: ToMaster) -> bytes:
    """A whole frame (prefix included) for a ToMaster message."""
    tag = _TO_MASTER_TAGS.get(type(msg))
    if tag is None:
        raise ProtocolError(f"not a ToMaster message: {msg!r}")
    head = _U32.pack(tag)
    if isinstance(msg, Ready):
        body = struct.pack("<II", _check_int("pid", msg.pid, 32),
                           _check_int("version", msg.version, 32))
    elif isinstance(msg, Heartbeat):
        body = struct.pack("<IQ", _check_int("active", msg.active, 32),
                           _check_int("served", msg.served, 64))
    elif isinstance(msg, Suicide):
        if not isinstance(msg.reason, str):
            raise ProtocolError("Suicide.reason must be a str")
        body = _blob(msg.reason.encode("utf-8", "replace"))
    elif isinstance(msg, Pong):
        body = b""
    elif isinstance(msg, User):
        body = _blob(msg.data)
    else:  # Ack
        body = struct.pack("<QQI", _check_int("received", msg.received, 64),
                           _check_int("lost", msg.lost, 64),
                           _check_int("capacity", msg.capacity, 32))
    return frame(head + body)


def encode_to_worker(msg: ToWorker) -> bytes:
    """A whole frame for a ToWorker message (what a master, or a test, sends)."""
    tag = _TO_WORKER_TAGS.get(type(msg))
    if tag is None:
        raise ProtocolError(f"not a ToWorker message: {msg!r}")
    head = _U32.pack(tag)
    if isinstance(msg, Hello):
        parts = [struct.pack("<IIQI", _check_int("version", msg.version, 32),
                             _check_int("worker_id", msg.worker_id, 32),
                             _check_int("generation", msg.generation, 64),
                             _check_int("heartbeat_ms", msg.heartbeat_ms, 32)),
                 _U64.pack(len(msg.listeners))]
        for info in msg.listeners:
            kind = info.kind.lower()
            if kind not in _KINDS:
                raise ProtocolError(f"unknown listener kind {info.kind!r}")
            parts.append(_U32.pack(_KINDS.index(kind)))
            parts.append(_blob(info.address.encode("utf-8")))
        body = b"".join(parts)
    elif isinstance(msg, Connections):
        if msg.count > MAX_FDS_PER_FRAME:
            raise ProtocolError(f"too many descriptors: {msg.count}, at most {MAX_FDS_PER_FRAME}")
        body = struct.pack("<HH", _check_int("listener", msg.listener, 16),
                           _check_int("count", msg.count, 16))
    elif isinstance(msg, Drain):
        body = _U64.pack(_check_int("deadline_ms", msg.deadline_ms, 64))
    elif isinstance(msg, Ping):
        body = b""
    elif isinstance(msg, User):
        body = _blob(msg.data)
    else:  # Listener
        body = _U16.pack(_check_int("listener", msg.listener, 16))
    return frame(head + body)


# --- decoding -------------------------------------------------------------------------

class _Cursor:
    """Fixed-width little-endian fields of one payload; every read is bounds-checked."""

    __slots__ = ("data", "pos")

    def __init__(self, payload):
        self.data = bytes(payload)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise ProtocolError(
                f"malformed: payload ends inside a field (needs {n} bytes at offset "
                f"{self.pos}, {len(self.data) - self.pos} left)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def blob(self) -> bytes:
        return self.take(self.u64())  # take() checks the length before slicing

    def string(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"malformed: invalid UTF-8: {e}") from None

    def end(self):
        extra = len(self.data) - self.pos
        if extra:
            raise ProtocolError(f"trailing bytes: {extra} after a {self.pos}-byte message")


def _tag(c: _Cursor, version: int, direction: str, known: int) -> int:
    tag = c.u32()
    if tag > known or _TAG_VERSION.get(tag, 1) > version:
        raise ProtocolError(f"malformed: unknown {direction} tag {tag} (protocol version {version})")
    return tag


def decode_to_worker(payload, version: int = PROTOCOL_VERSION) -> ToWorker:
    """One ToWorker payload (without its length prefix), in a session of `version`."""
    c = _Cursor(payload)
    tag = _tag(c, version, "ToWorker", 5)
    if tag == 0:
        ver, worker_id, generation, heartbeat_ms = c.u32(), c.u32(), c.u64(), c.u32()
        count = c.u64()
        # Each listener takes at least 12 bytes: refuse a count the payload cannot hold.
        if count > (len(c.data) - c.pos) // 12:
            raise ProtocolError(f"malformed: {count} listeners cannot fit in the payload")
        listeners = []
        for _ in range(count):
            kind = c.u32()
            if kind >= len(_KINDS):
                raise ProtocolError(f"malformed: unknown listener kind {kind}")
            listeners.append(ListenerInfo(_KINDS[kind], c.string()))
        msg = Hello(ver, worker_id, generation, heartbeat_ms, tuple(listeners))
    elif tag == 1:
        msg = Connections(c.u16(), c.u16())
        if msg.count > MAX_FDS_PER_FRAME:
            raise ProtocolError(
                f"too many descriptors: Connections claims {msg.count}, at most {MAX_FDS_PER_FRAME}")
    elif tag == 2:
        msg = Drain(c.u64())
    elif tag == 3:
        msg = Ping()
    elif tag == 4:
        msg = User(c.blob())
    else:
        msg = Listener(c.u16())
    c.end()
    return msg


def decode_to_master(payload, version: int = PROTOCOL_VERSION) -> ToMaster:
    """One ToMaster payload (what a master, or a test, reads)."""
    c = _Cursor(payload)
    tag = _tag(c, version, "ToMaster", 5)
    if tag == 0:
        msg = Ready(c.u32(), c.u32())
    elif tag == 1:
        msg = Heartbeat(c.u32(), c.u64())
    elif tag == 2:
        msg = Suicide(c.string())
    elif tag == 3:
        msg = Pong()
    elif tag == 4:
        msg = User(c.blob())
    else:
        msg = Ack(c.u64(), c.u64(), c.u32())
    c.end()
    return msg


def decode_hello(payload) -> Hello:
    """The first frame: tag and `version` are checked before anything else is decoded
    (a later master may change the rest of the handshake)."""
    payload = bytes(payload)
    if len(payload) < 8:
        raise VersionMismatch(f"the first frame is not a Hello ({len(payload)}-byte payload)")
    tag, version = struct.unpack_from("<II", payload)
    if tag != 0:
        raise VersionMismatch(f"the first frame is not a Hello (tag {tag})")
    if version != HANDSHAKE_VERSION:
        raise VersionMismatch(
            f"version mismatch: the master's Hello has version {version}, "
            f"this worker reads version {HANDSHAKE_VERSION}")
    msg = decode_to_worker(payload, 1)
    assert isinstance(msg, Hello)
    return msg


def negotiate(offer: Optional[str]) -> int:
    """The session's version from `RR_CLUSTER_PROTOCOL` (None when absent)."""
    if offer is None:
        return 1
    text = offer.strip()
    if text == "node":
        raise ProtocolError("RR_CLUSTER_PROTOCOL=node: the master expects a Node.js worker "
                            "(--worker-protocol node); this is a binary-protocol worker")
    try:
        value = int(text, 10)
    except ValueError:
        raise ProtocolError(f"RR_CLUSTER_PROTOCOL={offer!r} is not a version number") from None
    if value < 1:
        raise ProtocolError(f"RR_CLUSTER_PROTOCOL={offer!r}: no such protocol version")
    return min(value, PROTOCOL_VERSION)


def peek_len(buf) -> Optional[int]:
    """The payload length announced by a buffer's first 4 bytes (None: fewer than 4)."""
    if len(buf) < 4:
        return None
    (length,) = _U32.unpack_from(buf)
    if length > MAX_FRAME_LEN:
        raise ProtocolError(f"message too large: a frame announces {length} bytes, "
                            f"at most {MAX_FRAME_LEN}")
    return length


# --- the receiving side: bytes plus the descriptors of each read --------------------

def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _FdBatch(NamedTuple):
    """The descriptors one `recvmsg` returned."""
    at: int  # offset in the stream of the read's last byte: its frame's
    count: int  # how many arrived
    truncated: bool  # the kernel dropped others (MSG_CTRUNC)


class FrameDecoder:
    """Bytes and descriptors received but not yet handed out as frames: the worker's
    half of docs/PROTOCOL.md#descriptors, without any I/O. Feed it what each `recvmsg`
    returned, then take frames until `next_frame()` returns None.

    Which frame descriptors belong to: a frame's descriptors travel with its first
    segment (one `sendmsg` per frame; a tail sent later carries none), and on Linux a
    `recvmsg` on a stream socket stops right after a segment that carried descriptors
    (or within it, when the buffer is full). So the descriptors one read returns, and
    its MSG_CTRUNC flag, belong to the frame that holds the read's *last* byte. The
    decoder keeps each read's descriptors with that byte's offset in the stream; a
    frame takes the descriptors read with one of its own bytes, and they must be as
    many as its message claims, or fewer after a MSG_CTRUNC of that same read (the
    shortfall is counted in `lost`). Any other count, or descriptors read with no
    frame's byte, is a protocol error. (Never "the next frame short of descriptors
    takes what is waiting": a frame split across reads, whose first part came with
    MSG_CTRUNC, would take the next frame's.)

    Descriptors are plain integers owned by the decoder until handed out with a frame;
    on any protocol error the descriptors concerned are closed.
    """

    def __init__(self, version: int = PROTOCOL_VERSION):
        self.version = version
        self.buf = bytearray()
        #: Descriptors received and not yet handed out, in order.
        self.fds: Deque[int] = collections.deque()
        # Which frame `fds` belong to, read by read, in order: every read that returned
        # descriptors or reported MSG_CTRUNC.
        self._batches: Deque[_FdBatch] = collections.deque()
        # The offset in the stream of buf[0].
        self._base = 0
        #: Descriptors the kernel dropped (MSG_CTRUNC), since the start.
        self.lost = 0
        #: Descriptors taken off the channel (handed out with frames, plus `lost`).
        self.received = 0

    def feed(self, data: bytes, fds: List[int] = (), truncated: bool = False):
        """One `recvmsg`'s bytes, descriptors (in order) and its MSG_CTRUNC flag."""
        fds = list(fds)
        self.buf += data
        if fds or truncated:
            # The read's last byte (none at the end of the stream: no frame's).
            at = self._base + len(self.buf) - (1 if data else 0)
            self._batches.append(_FdBatch(at, len(fds), bool(truncated)))
            self.fds.extend(fds)
        if len(self.fds) > MAX_PENDING_FDS:
            count = len(self.fds)
            self.close_pending()
            raise ProtocolError(
                f"too many pending descriptors: {count} waiting, at most {MAX_PENDING_FDS}")

    def next_frame(self, decode=None) -> Optional[Tuple[object, List[int]]]:
        """The next complete frame as (message, descriptors), or None for more bytes.
        `decode(payload, version)` decodes the payload (default: `decode_to_worker`)."""
        if decode is None:
            decode = decode_to_worker
        try:
            length = peek_len(self.buf)
        except ProtocolError:
            self.close_pending()
            raise
        if length is None:
            self._check_unclaimed()
            return None
        if len(self.buf) < 4 + length:
            return None
        payload = bytes(self.buf[4:4 + length])
        first = self._base
        after = first + 4 + length
        del self.buf[:4 + length]
        self._base = after
        try:
            msg = decode(payload, self.version)
        except ProtocolError:
            self.close_pending()
            raise
        # This frame's descriptors: those read with one of its bytes (one read's worth:
        # its first segment's).
        batch = None
        if self._batches and self._batches[0].at < first:
            self._unclaimed()  # read with the bytes of no frame
        if self._batches and self._batches[0].at < after:
            batch = self._batches.popleft()
            if self._batches and self._batches[0].at < after:
                self._unclaimed()
        available = batch.count if batch is not None else 0
        truncated = batch.truncated if batch is not None else False
        claimed = fd_count(msg)
        if claimed < available:
            self._unclaimed()
        if claimed > available:
            if not truncated:
                self.close_pending()
                raise ProtocolError(
                    f"missing descriptors: a frame claims {claimed}, {available} arrived")
            # The kernel dropped the rest of this frame's descriptors (MSG_CTRUNC).
            self.lost += claimed - available
        fds = [self.fds.popleft() for _ in range(available)]
        if isinstance(msg, Connections):
            self.received += msg.count
        try:
            self._check_unclaimed()
        except ProtocolError:
            _close_all(fds)
            raise
        return msg, fds

    def at_eof(self):
        """End of stream: clean between frames, a protocol error inside one."""
        if self.buf:
            buffered = len(self.buf)
            self.close_pending()
            raise ProtocolError(f"truncated frame: end of stream with {buffered} bytes buffered")
        self._check_unclaimed()

    def _unclaimed(self):
        count = len(self.fds)
        self.close_pending()
        raise ProtocolError(f"unclaimed descriptors: {count} arrived that no frame claims")

    def _check_unclaimed(self):
        # With no partial frame buffered, no descriptor may wait: a frame's descriptors
        # arrive with its first byte.
        if not self.buf and self.fds:
            self._unclaimed()

    def close_pending(self):
        """Closes every descriptor still waiting (after an error, or at the end)."""
        fds = list(self.fds)
        self.fds.clear()
        self._batches.clear()
        _close_all(fds)
