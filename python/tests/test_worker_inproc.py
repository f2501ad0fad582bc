"""`Worker` in this process, against a master end played by the test over a socketpair:
races and failure paths that need a hand inside the worker (a paused delivery, a busy
send lock, a failing reader)."""

import array
import errno
import queue
import socket
import threading
import time
import types

import pytest

from rr_cluster_worker import protocol as p
from rr_cluster_worker.worker import Worker


class MasterEnd:
    """The master's end of an in-process worker's channel."""

    def __init__(self, sock):
        self.sock = sock
        self.messages = queue.Queue()
        self.eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        dec = p.FrameDecoder(2)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                dec.feed(data)
                while (item := dec.next_frame(p.decode_to_master)) is not None:
                    self.messages.put(item[0])
        except (OSError, p.ProtocolError):
            pass
        self.eof.set()
        self.messages.put(None)

    def send(self, msg, fds=()):
        data = p.encode_to_worker(msg)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def send_connections(self, socks):
        self.send(p.Connections(0, len(socks)), [s.fileno() for s in socks])
        for s in socks:
            s.close()

    def expect(self, kind, timeout=5.0, skip=(p.Heartbeat, p.Ack)):
        """The next message of type `kind` within `timeout`, skipping `skip` types."""
        end = time.monotonic() + timeout
        for _ in range(10_000):
            try:
                msg = self.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind.__name__} within {timeout} s") from None
            if msg is None:
                self.messages.put(None)
                raise AssertionError(f"the channel ended before a {kind.__name__}")
            if isinstance(msg, kind):
                return msg
            if not isinstance(msg, skip):
                raise AssertionError(f"expected {kind.__name__}, got {msg!r}")
        raise AssertionError("too many messages")

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def make_worker():
    made = []

    def make(heartbeat_ms=1000, **options):
        master, child = socket.socketpair()
        fd = child.detach()  # the worker's from now on
        env = {"RR_CLUSTER_CHANNEL_FD": str(fd), "RR_CLUSTER_PROTOCOL": "2"}
        master.sendall(p.encode_to_worker(
            p.Hello(1, 0, 0, heartbeat_ms, (p.ListenerInfo("tcp", "127.0.0.1:0"),))))
        worker = Worker(handle_errors=False, exit_at_deadline=False, environ=env, **options)
        end = MasterEnd(master)
        made.append((worker, end))
        worker.ready()
        end.expect(p.Ready)
        end.expect(p.Ack, skip=())
        return worker, end

    yield make
    for worker, end in made:
        end.close()  # end of file: the worker drains (it does not exit the process)
        worker.wait_draining(5)


def test_an_ack_never_counts_connections_received_but_not_held(make_worker):
    """`received` and the connections held go up in one step: an Ack sent while the
    reader is between the two (the heartbeat thread's) does not announce the new
    connections' room as free."""
    worker, end = make_worker(max_connections=4)
    in_deliver, go = threading.Event(), threading.Event()
    deliver = worker._deliver

    def paused(self, *args, **kwargs):
        in_deliver.set()
        go.wait(10)
        return deliver(*args, **kwargs)

    worker._deliver = types.MethodType(paused, worker)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        end.send_connections([b for _, b in pairs])
        assert in_deliver.wait(5), "the reader did not deliver the connections"
        worker._send_ack()  # as the heartbeat thread would, now
        for _ in range(100):  # heartbeats' Acks from before the frame may come first
            ack = end.expect(p.Ack, skip=(p.Heartbeat,))
            if ack.received == 4:
                break
        assert ack.received == 4
        assert ack.capacity == 0, f"{ack}: 4 received and held, none free"
    finally:
        go.set()
    conns = [worker.accept(timeout=5) for _ in range(4)]
    assert worker.active == 4 and worker.capacity == 0
    for conn in conns:
        conn.close()
    assert worker.active == 0
    for a, _ in pairs:
        a.close()


def test_a_suicide_that_cannot_go_out_at_once_is_retried_not_taken_for_a_closed_channel(make_worker):
    """The send lock busy for longer than the Suicide's first try (0.5 s) is no closed
    channel: the worker keeps trying, and does not drain (closing the connections the
    master still sends) before the master's Drain."""
    worker, end = make_worker()
    worker._send_lock.acquire()
    try:
        t = threading.Thread(target=worker.suicide, args=("leaving",))
        t.start()
        t.join(10)
        assert not t.is_alive()
        assert worker.closing.is_set()
        assert not worker.draining.is_set(), worker.drain_reason
    finally:
        worker._send_lock.release()
    assert end.expect(p.Suicide).reason == "leaving"
    assert not worker.draining.is_set(), worker.drain_reason
    # Sent before the master read the Suicide: still served.
    a, b = socket.socketpair()
    end.send_connections([b])
    conn = worker.accept(timeout=5)
    assert conn is not None
    conn.close()
    a.close()
    end.send(p.Drain(5000))
    assert worker.wait_draining(5)
    assert worker.drain_reason == "drain requested by the master"
    assert worker.accept(timeout=5) is None


def test_a_suicide_on_a_broken_channel_ends_the_channel_and_drains(make_worker):
    worker, end = make_worker()
    worker._write_broken = True  # as after EPIPE, or a frame cut short
    worker.suicide("leaving")
    assert worker.draining.is_set()
    assert end.eof.wait(5), "the channel was not ended: the master would keep sending"


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "I/O error"), RuntimeError("a bug")],
                         ids=["oserror", "exception"])
def test_a_reader_that_fails_ends_the_channel(make_worker, failure):
    """Nothing reads the channel once the reader failed: the worker says why (Suicide)
    and ends the channel, so that the master sends no more connections there (its
    heartbeats would otherwise keep it in rotation)."""
    worker, end = make_worker(heartbeat_ms=50)

    def fail():
        raise failure

    worker._recv_once = fail  # the reader's next read, after the one under way
    end.send(p.Ping())
    suicide = end.expect(p.Suicide, skip=(p.Heartbeat, p.Ack, p.Pong))
    assert "channel reader failed" in suicide.reason
    assert end.eof.wait(5), "the channel was not ended: the master would keep sending"
    assert worker.draining.wait(5)
    assert worker.exit_code == 1


def test_a_reader_that_fails_after_its_suicide_went_out_drains_to_the_usual_deadline(make_worker):
    """The master reads the Suicide before the end of the channel and gives the worker
    its drain deadline: the in-flight requests get the orphan deadline, not 0.9 s (that
    is for a worker the master takes for lost), and only the write side is shut (a send
    of the master's failing could make it take the end for a lost worker)."""
    worker, end = make_worker(heartbeat_ms=50, orphan_deadline=10.0)

    def fail():
        raise OSError(errno.EIO, "I/O error")

    worker._recv_once = fail
    end.send(p.Ping())
    end.expect(p.Suicide, skip=(p.Heartbeat, p.Ack, p.Pong))
    assert end.eof.wait(5)
    assert worker.draining.wait(5)
    assert worker.deadline - worker.drain_started > 5.0, \
        f"drains for {worker.deadline - worker.drain_started:.1f} s"
    end.send(p.Ping())  # the master's sends still go through (no EPIPE)


def test_a_reader_that_fails_without_its_suicide_drains_quickly(make_worker):
    """No Suicide went out: the master takes the end for a lost worker and kills it 1 s
    later; the worker drains within 0.9 s."""
    worker, end = make_worker(heartbeat_ms=50, orphan_deadline=10.0)

    def fail():
        raise OSError(errno.EIO, "I/O error")

    worker._send_lock.acquire()  # the Suicide cannot go out
    try:
        worker._recv_once = fail
        end.send(p.User(b"x"))  # wakes the reader (a message it answers nothing)
        assert worker.draining.wait(5)
        assert worker.deadline - worker.drain_started < 1.0
    finally:
        worker._send_lock.release()
    assert end.eof.wait(5)
