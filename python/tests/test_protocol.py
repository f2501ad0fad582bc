"""The codec against the generated dumps in docs/PROTOCOL.md, and hostile inputs."""

import os
import re
import socket
import struct

import pytest

from conftest import PYTHON_DIR
from rr_cluster_worker import protocol as p

DOC = os.path.join(os.path.dirname(PYTHON_DIR), "docs", "PROTOCOL.md")


def dumps():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    regions = re.findall(r"<!-- begin frame (\S+) -->(.*?)<!-- end frame \1 -->", text, re.S)
    frames = {}
    for name, body in regions:
        m = re.search(r"All (\d+) bytes: `([0-9a-f]+)`", body)
        assert m, f"no 'All N bytes' line in the {name} region"
        data = bytes.fromhex(m.group(2))
        assert len(data) == int(m.group(1)), name
        assert struct.unpack_from("<I", data)[0] == len(data) - 4, f"{name}: length prefix"
        frames[name] = data
    return frames


HELLO = p.Hello(1, 3, 7, 1000, (p.ListenerInfo("tcp", "127.0.0.1:8080"),
                                p.ListenerInfo("unix", "/run/app.sock")))
TO_WORKER = {
    "ToWorker::Hello": HELLO,
    "ToWorker::Connections": p.Connections(1, 3),
    "ToWorker::Drain": p.Drain(30000),
    "ToWorker::Ping": p.Ping(),
    "ToWorker::User": p.User(b"hi"),
    "ToWorker::Listener": p.Listener(0),
}
TO_MASTER = {
    "ToMaster::Ready": p.Ready(4242, 2),
    "ToMaster::Heartbeat": p.Heartbeat(3, 99),
    "ToMaster::Suicide": p.Suicide("out of memory"),
    "ToMaster::Pong": p.Pong(),
    "ToMaster::User": p.User(bytes([0, 1, 2, 255])),
    "ToMaster::Ack": p.Ack(64, 0, 960),
}


def test_the_document_has_every_message_and_nothing_else():
    assert sorted(dumps()) == sorted([*TO_WORKER, *TO_MASTER])


@pytest.mark.parametrize("name", sorted(TO_WORKER))
def test_decode_every_to_worker_example(name):
    data = dumps()[name]
    assert p.decode_to_worker(data[4:]) == TO_WORKER[name]
    assert p.encode_to_worker(TO_WORKER[name]) == data  # and back, byte for byte


@pytest.mark.parametrize("name", sorted(TO_MASTER))
def test_encode_every_to_master_example(name):
    data = dumps()[name]
    assert p.encode_to_master(TO_MASTER[name]) == data
    assert p.decode_to_master(data[4:]) == TO_MASTER[name]


def test_an_ack_is_due_after_a_quarter_of_the_window_within_bounds():
    assert (p.ACK_EVERY, p.WINDOW) == (64, 512)
    assert p.ack_after(2**32 - 1) == 64
    assert p.ack_after(960) == 64
    assert p.ack_after(200) == 50
    assert p.ack_after(16) == 4
    assert p.ack_after(7) == 1
    assert p.ack_after(0) == 1


def test_hello_version_is_read_first():
    assert p.decode_hello(dumps()["ToWorker::Hello"][4:]) == HELLO
    # A later handshake may change everything after the version: refused on the version.
    with pytest.raises(p.VersionMismatch, match="version mismatch"):
        p.decode_hello(b"\0\0\0\0\x02\0\0\0" + b"\xff" * 3)
    with pytest.raises(p.VersionMismatch):
        p.decode_hello(p.encode_to_worker(p.Ping())[4:] + b"\0\0\0\0")
    with pytest.raises(p.VersionMismatch):
        p.decode_hello(b"\0\0\0")


def test_version_1_session_knows_no_tag_5():
    with pytest.raises(p.ProtocolError, match="unknown"):
        p.decode_to_worker(dumps()["ToWorker::Listener"][4:], version=1)
    with pytest.raises(p.ProtocolError, match="unknown"):
        p.decode_to_master(dumps()["ToMaster::Ack"][4:], version=1)


def test_negotiation():
    assert p.negotiate(None) == 1
    assert p.negotiate("1") == 1
    assert p.negotiate("2") == 2
    assert p.negotiate("9") == 2
    for bad in ("0", "-1", "x", "", "node"):
        with pytest.raises(p.ProtocolError):
            p.negotiate(bad)


def hostile_payloads():
    hello = dumps()["ToWorker::Hello"][4:]
    yield b""
    yield b"\x00"
    yield b"\x06\0\0\0"  # unknown tag
    yield b"\xff\xff\xff\xff"
    yield b"\x04\0\0\0" + b"\xff" * 8  # a length far beyond the payload
    yield b"\x04\0\0\0" + struct.pack("<Q", 1 << 63)
    yield b"\x04\0\0\0\x03\0\0\0\0\0\0\0ab"  # one byte short
    yield b"\x03\0\0\0\0"  # trailing byte
    yield b"\x01\0\0\0\0\0\x41\0"  # 65 descriptors
    yield b"\x02\0\0\0\0\0\0"  # Drain one byte short
    yield hello[:-1]
    yield hello + b"\0"
    # 2^64-1 listeners
    yield hello[:28] + b"\xff" * 8
    # an unknown listener kind
    yield hello[:28] + struct.pack("<QI", 1, 7) + struct.pack("<Q", 0)
    # invalid UTF-8 in an address
    yield hello[:28] + struct.pack("<QIQ", 1, 0, 2) + b"\xff\xfe"
    # every truncation of every example
    for name, data in dumps().items():
        if name.startswith("ToWorker"):
            for cut in range(4, len(data) - 1):
                yield data[4:cut]


@pytest.mark.parametrize("payload", list(hostile_payloads()))
def test_hostile_payloads_raise_protocol_error_only(payload):
    for version in (1, 2):
        with pytest.raises(p.ProtocolError):
            p.decode_to_worker(payload, version)


def test_truncated_to_master_examples_raise_protocol_error():
    for name, data in dumps().items():
        if name.startswith("ToMaster"):
            for cut in range(4, len(data) - 1):
                with pytest.raises(p.ProtocolError):
                    p.decode_to_master(data[4:cut])


def test_random_garbage_never_raises_anything_else():
    import random
    rng = random.Random(1234)
    for _ in range(5000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.5:
            payload = struct.pack("<I", rng.randrange(0, 7)) + payload
        try:
            p.decode_to_worker(payload)
        except p.ProtocolError:
            pass
        try:
            p.decode_hello(payload)
        except p.ProtocolError:
            pass


def test_encoder_refuses_what_does_not_fit():
    with pytest.raises(p.ProtocolError):
        p.encode_to_master(p.User(b"x" * (p.MAX_USER_DATA + 1)))
    assert len(p.encode_to_master(p.User(b"x" * p.MAX_USER_DATA))) == 4 + p.MAX_FRAME_LEN
    with pytest.raises(p.ProtocolError):
        p.encode_to_master(p.Heartbeat(-1, 0))
    with pytest.raises(p.ProtocolError):
        p.encode_to_master(p.Ack(0, 0, 1 << 32))
    with pytest.raises(p.ProtocolError):
        p.encode_to_master("Ready")


# --- the frame decoder: which frame the descriptors of each read belong to -----------

def fresh_fds(n):
    """n open descriptors (socket ends) to play the received ones."""
    fds = []
    for _ in range((n + 1) // 2):
        a, b = socket.socketpair()
        fds.extend([a.detach(), b.detach()])
    extra = fds[n:]
    for fd in extra:
        os.close(fd)
    return fds[:n]


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_decoder_frames_split_anywhere():
    stream = b"".join(p.encode_to_worker(m) for m in TO_WORKER.values()
                      if not isinstance(m, (p.Connections, p.Listener)))
    for step in (1, 3, 7, len(stream)):
        dec = p.FrameDecoder()
        out = []
        for i in range(0, len(stream), step):
            dec.feed(stream[i:i + step])
            while (item := dec.next_frame()) is not None:
                out.append(item[0])
        dec.at_eof()
        assert [type(m).__name__ for m in out] == ["Hello", "Drain", "Ping", "User"]


def test_decoder_hands_out_descriptors_in_order():
    fds = fresh_fds(5)
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Connections(0, 2))[:3], fds[:2])
    assert dec.next_frame() is None
    dec.feed(p.encode_to_worker(p.Connections(0, 2))[3:])
    assert dec.next_frame() == (p.Connections(0, 2), fds[:2])
    dec.feed(p.encode_to_worker(p.Connections(1, 3)), fds[2:])
    assert dec.next_frame() == (p.Connections(1, 3), fds[2:])
    assert dec.received == 5 and dec.lost == 0
    for fd in fds:
        os.close(fd)


def test_decoder_missing_descriptors_is_an_error_and_closes_them():
    fds = fresh_fds(1)
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Connections(0, 2)), fds)
    with pytest.raises(p.ProtocolError, match="missing"):
        dec.next_frame()
    assert not is_open(fds[0])


def test_decoder_ctrunc_counts_lost_and_goes_on():
    fds = fresh_fds(4)
    dec = p.FrameDecoder()
    # 3 claimed, 1 arrived with MSG_CTRUNC: the one is the frame's, 2 are lost.
    dec.feed(p.encode_to_worker(p.Connections(0, 3)), fds[:1], truncated=True)
    assert dec.next_frame() == (p.Connections(0, 3), fds[:1])
    assert (dec.lost, dec.received) == (2, 3)
    # None arrived at all (the control message was dropped whole).
    dec.feed(p.encode_to_worker(p.Connections(0, 2)), [], truncated=True)
    assert dec.next_frame() == (p.Connections(0, 2), [])
    assert (dec.lost, dec.received) == (4, 5)
    # The flag is spent: the next short frame is an error again.
    dec.feed(p.encode_to_worker(p.Connections(0, 2)), fds[1:2])
    with pytest.raises(p.ProtocolError, match="missing"):
        dec.next_frame()
    for fd in fds[2:]:
        os.close(fd)
    os.close(fds[0])


def test_decoder_unclaimed_descriptors_are_an_error_and_closed():
    fds = fresh_fds(2)
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Ping()), fds)
    with pytest.raises(p.ProtocolError, match="unclaimed"):
        dec.next_frame()
    assert not any(is_open(fd) for fd in fds)


def test_decoder_truncated_frame_at_eof():
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Drain(5))[:7])
    assert dec.next_frame() is None
    with pytest.raises(p.ProtocolError, match="truncated"):
        dec.at_eof()


def test_decoder_refuses_a_huge_length_from_the_prefix_alone():
    dec = p.FrameDecoder()
    dec.feed(struct.pack("<I", p.MAX_FRAME_LEN + 1))
    with pytest.raises(p.ProtocolError, match="too large"):
        dec.next_frame()


def test_decoder_too_many_pending_descriptors():
    dec = p.FrameDecoder()
    fds = fresh_fds(p.MAX_PENDING_FDS + 1)
    with pytest.raises(p.ProtocolError, match="pending"):
        dec.feed(b"\x08", fds)
    assert not any(is_open(fd) for fd in fds)


def test_decoder_a_frame_whose_descriptors_were_dropped_never_takes_the_next_frames():
    # Frame A is split across two reads (the buffer was full): its first part came with
    # MSG_CTRUNC and none of its descriptor. The second read holds the rest of A, then
    # all of B with B's descriptor (a read stops after a segment with descriptors, not
    # before): the descriptors of a read belong to the frame of its last byte.
    a = p.encode_to_worker(p.Connections(0, 1))
    b = p.encode_to_worker(p.Connections(1, 1))
    (b_fd,) = fresh_fds(1)
    b_inode = os.fstat(b_fd).st_ino
    dec = p.FrameDecoder()
    dec.feed(a[:3], [], truncated=True)
    assert dec.next_frame() is None
    dec.feed(a[3:] + b, [b_fd])
    assert dec.next_frame() == (p.Connections(0, 1), []), "A's descriptor was dropped; not B's"
    assert (dec.lost, dec.received) == (1, 1)
    msg, fds = dec.next_frame()
    assert msg == p.Connections(1, 1) and len(fds) == 1
    assert os.fstat(fds[0]).st_ino == b_inode, "B gets its own descriptor"
    assert (dec.lost, dec.received) == (1, 2)
    dec.at_eof()
    os.close(fds[0])


def test_decoder_descriptors_with_a_frame_that_claims_none_are_an_error_at_once():
    # Even while the next frame is still partial: they were read with the Ping's bytes.
    fds = fresh_fds(1)
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Ping()), fds)
    dec.feed(p.encode_to_worker(p.User(b"x" * 64))[:10])
    with pytest.raises(p.ProtocolError, match="unclaimed"):
        dec.next_frame()
    assert not is_open(fds[0])


def test_decoder_descriptors_of_two_reads_for_one_frame_are_an_error():
    # One frame's descriptors come with one read (its first segment's): a second batch
    # read with bytes of the same frame belongs to no frame.
    fds = fresh_fds(2)
    frame = p.encode_to_worker(p.Connections(0, 2))
    dec = p.FrameDecoder()
    dec.feed(frame[:4], fds[:1])
    dec.feed(frame[4:], fds[1:])
    with pytest.raises(p.ProtocolError, match="unclaimed"):
        dec.next_frame()
    assert not any(is_open(fd) for fd in fds)


def test_decoder_ctrunc_of_one_read_is_not_carried_to_a_later_frame():
    # The MSG_CTRUNC belongs to the read's frame (which got all it claimed, 0): a later
    # frame short of descriptors is a protocol error, not a loss.
    fds = fresh_fds(1)
    dec = p.FrameDecoder()
    dec.feed(p.encode_to_worker(p.Ping()), [], truncated=True)
    assert dec.next_frame() == (p.Ping(), [])
    dec.feed(p.encode_to_worker(p.Connections(0, 2)), fds)
    with pytest.raises(p.ProtocolError, match="missing"):
        dec.next_frame()
    assert not is_open(fds[0]) and dec.lost == 0
