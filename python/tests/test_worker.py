"""The worker against a fake master (a socketpair and a subprocess), per docs/PROTOCOL.md."""

import json
import os
import select
import signal
import socket
import time

import pytest

from fakemaster import APPS, FakeMaster, Listener, at_eof, read_response, request
from rr_cluster_worker import protocol as p

WSGI = os.path.join(APPS, "wsgi_worker.py")


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


def start_ready(fm):
    ready = fm.expect(p.Ready, timeout=10)
    assert ready.pid == fm.proc.pid
    return ready


def get(fm, listener, path, keep_alive=False):
    client, server = listener.pair()
    fm.send_connections([server])
    request(client, path, keep_alive=keep_alive)
    resp = read_response(client)
    return client, resp


def test_handshake_offer_2_gives_version_2_and_an_ack_after_ready(listener):
    with FakeMaster([WSGI], offer="2", worker_id=3, generation=7) as fm:
        first = fm.next(10)
        assert first == p.Ready(fm.proc.pid, 2)
        ack = fm.next()  # right after Ready
        assert isinstance(ack, p.Ack) and ack.received == 0 and ack.lost == 0
        assert ack.capacity >= 16
        client, resp = get(fm, listener, "/env")
        env = json.loads(resp.body)
        assert env["rr_vars"] == []  # removed from the environment
        assert env["channel_inheritable"] is False  # close-on-exec
        assert (env["version"], env["id"], env["generation"]) == (2, 3, 7)
        assert env["listeners"] == [["tcp", "127.0.0.1:0"]]
        client.close()


def test_offer_above_ours_negotiates_down(listener):
    with FakeMaster([WSGI], offer="7") as fm:
        assert fm.expect(p.Ready, 10).version == 2


def test_no_offer_speaks_version_1_and_never_acks(listener):
    with FakeMaster([WSGI], offer=None) as fm:
        assert fm.next(10) == p.Ready(fm.proc.pid, 1)
        for i in range(20):
            client, resp = get(fm, listener, "/")
            assert resp.status == 200
            client.close()
        fm.send(p.Ping())
        fm.expect(p.Pong, skip=(p.Heartbeat,))
        time.sleep(3 * fm.heartbeat_ms / 1000)
        kinds = {type(m).__name__ for _, m in fm.log}
        assert "Ack" not in kinds and "Heartbeat" in kinds
        # served counts the descriptors, in version 1 too.
        assert fm.heartbeats()[-1][1].served == 20


def test_tag_5_in_a_version_1_session_is_a_protocol_error(listener):
    with FakeMaster([WSGI], offer=None) as fm:
        start_ready(fm)
        server = listener.sock.dup()
        fm.send(p.Listener(0), [server.fileno()])
        server.close()
        suicide = fm.expect(p.Suicide, skip=(p.Heartbeat,))
        assert "protocol error" in suicide.reason
        assert fm.wait_exit(5) != 0


def test_hello_of_another_version_exits_nonzero_without_ready():
    with FakeMaster([WSGI], hello=False) as fm:
        fm.sock.sendall(p.frame(b"\0\0\0\0\x02\0\0\0whatever"))
        assert fm.wait_exit(10) != 0
        fm.wait_eof()
        assert not [m for _, m in fm.log if isinstance(m, p.Ready)]
        assert "version mismatch" in fm.stderr_text()


def test_wrong_inode_is_not_a_worker():
    with FakeMaster([WSGI], inode=1) as fm:
        assert fm.wait_exit(10) == 2
        assert "not this process's channel" in fm.stderr_text()


def test_heartbeats_keep_their_pace_while_a_handler_is_busy(listener):
    with FakeMaster([WSGI], heartbeat_ms=300) as fm:
        start_ready(fm)
        client, server = listener.pair()
        fm.send_connections([server])
        t0 = time.monotonic()
        request(client, "/sleep/3000")
        resp = read_response(client, timeout=10)
        t1 = time.monotonic()
        assert resp.status == 200 and resp.body == b"slept\n" and t1 - t0 >= 2.9
        beats = fm.heartbeats(t0, t1)
        times = [t for t, _ in beats]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Every 300 ms while the handler sleeps 3 s: a heartbeat held up by the handler
        # would leave a gap of 3 s. The bounds leave room for a loaded machine.
        assert len(beats) >= 6, beats
        assert max(gaps) < 1.5, gaps
        assert max(m.active for _, m in beats) == 1  # the busy connection is counted
        client.close()


def test_a_batch_of_64_descriptors_in_one_frame_is_all_served(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        pairs = [listener.pair() for _ in range(64)]
        fm.send_connections([s for _, s in pairs])
        for i, (client, _) in enumerate(pairs):
            request(client, f"/?n={i}", keep_alive=False)
        for client, _ in pairs:
            resp = read_response(client)
            assert resp.status == 200 and resp.body == b"hello\n"
            assert resp.headers["connection"] == "close"
            assert at_eof(client)
            client.close()
        # 64 >= ACK_EVERY: an Ack for all of them without waiting for a heartbeat.
        ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        while ack.received < 64:
            ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        assert ack.received == 64 and ack.lost == 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_descriptor_leaks(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        client, resp = get(fm, listener, "/")  # warm up (threads, selector)
        client.close()
        time.sleep(0.3)
        baseline = fd_count(fm.proc.pid)
        for _ in range(3):
            pairs = [listener.pair() for _ in range(32)]
            fm.send_connections([s for _, s in pairs])
            for i, (c, _) in enumerate(pairs):
                request(c, "/", keep_alive=bool(i % 2))
                read_response(c)
                c.close()  # also the keep-alive ones: the worker sees the end of stream
        end = time.monotonic() + 5
        while fd_count(fm.proc.pid) > baseline and time.monotonic() < end:
            time.sleep(0.05)
        assert fd_count(fm.proc.pid) == baseline
        t = time.monotonic()
        end = t + 2
        while not fm.heartbeats(t) and time.monotonic() < end:
            time.sleep(0.05)
        hb = fm.heartbeats(t)[-1][1]
        assert hb.active == 0 and hb.served == 97  # with the warm-up one


def test_ping_is_answered_by_ack_then_pong(listener):
    with FakeMaster([WSGI], heartbeat_ms=5000) as fm:
        start_ready(fm)
        fm.expect(p.Ack)
        pairs = [listener.pair() for _ in range(5)]
        fm.send_connections([s for _, s in pairs])
        fm.send(p.Ping())
        got = []
        while not got or not isinstance(got[-1], p.Pong):
            msg = fm.next()
            if not isinstance(msg, p.Heartbeat):
                got.append(msg)
        assert isinstance(got[-2], p.Ack) and got[-2].received == 5
        for client, _ in pairs:
            client.close()


def test_drain_semantics(listener):
    """In-flight request finishes; keep-alive requests after the drain get
    Connection: close; a connection passed before the drain is served; idle keep-alive
    connections are closed only after the grace; exit 0 well before the deadline."""
    with FakeMaster([WSGI, "2.0"]) as fm:
        start_ready(fm)
        busy, s1 = listener.pair()
        idle, s2 = listener.pair()
        later, s3 = listener.pair()
        silent, s4 = listener.pair()
        fm.send_connections([s1, s2, s3, s4])
        for c in (later, silent):  # keep-alive, one request served before the drain
            request(c, "/")
            r = read_response(c)
            assert r.status == 200 and "connection" not in r.headers
        request(busy, "/sleep/1500")
        time.sleep(0.3)  # the request is in progress
        fresh, s5 = listener.pair()
        fm.send_connections([s5])  # passed before the Drain, first request not read yet
        fm.send(p.Drain(10_000))
        t_drain = time.monotonic()
        # A keep-alive connection used again after the drain: answered, with close.
        time.sleep(0.5)
        request(later, "/")
        r = read_response(later)
        assert r.status == 200 and r.headers["connection"] == "close"
        assert at_eof(later, 2)
        # The connection received before the drain still gets its first request served.
        request(fresh, "/")
        r = read_response(fresh)
        assert r.status == 200 and r.headers["connection"] == "close"
        # The in-flight request completes, with Connection: close.
        r = read_response(busy)
        assert r.status == 200 and r.body == b"slept\n" and r.headers["connection"] == "close"
        assert at_eof(busy, 2)
        # Idle ones: closed after the grace (2 s), not before.
        assert not at_eof(silent, max(0.01, t_drain + 1.6 - time.monotonic()))
        assert at_eof(silent, 3)
        closed_after = time.monotonic() - t_drain
        assert 1.9 <= closed_after <= 3.5, closed_after
        assert at_eof(idle, 1)  # never used: the same grace
        code = fm.wait_exit(8)
        assert code == 0, fm.stderr_text()
        assert time.monotonic() - t_drain < 5
        # Heartbeats went on during the drain.
        assert len(fm.heartbeats(t_drain + 0.2)) >= 5
        for c in (busy, idle, later, silent, fresh):
            c.close()


def test_end_of_file_means_the_master_is_gone(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        client, server = listener.pair()
        fm.send_connections([server])
        request(client, "/sleep/800")
        time.sleep(0.2)
        fm.close_channel()
        r = read_response(client)  # the request in progress is finished
        assert r.status == 200 and r.headers["connection"] == "close"
        assert fm.wait_exit(10) == 0
        client.close()


def test_user_messages_both_ways(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        fm.send(p.User(b"hi"))
        fm.send(p.User(b""))
        assert fm.expect(p.User) == p.User(b"hi")
        assert fm.expect(p.User) == p.User(b"")


def test_unread_messages_are_dropped_and_never_block_the_reader(listener):
    env = {"TEST_NO_ECHO": "1", "TEST_MESSAGE_QUEUE": "100"}
    with FakeMaster([WSGI], extra_env=env) as fm:
        start_ready(fm)
        for i in range(300):
            fm.send(p.User(b"m%d" % i))
        fm.send(p.Ping())
        fm.expect(p.Pong)  # the reader went on
        client, resp = get(fm, listener, "/env")
        env = json.loads(resp.body)
        assert (env["queued_messages"], env["dropped_messages"]) == (100, 200)
        assert "dropped" in fm.stderr_text()
        client.close()


def test_uncaught_exception_in_a_thread_announces_a_suicide(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        client, resp = get(fm, listener, "/crash-thread")
        assert resp.status == 200
        suicide = fm.expect(p.Suicide)
        assert "RuntimeError: boom from a thread" in suicide.reason
        fm.send(p.Drain(5000))
        assert fm.wait_exit(8) == 1
        assert "boom from a thread" in fm.stderr_text()  # the traceback is printed
        client.close()


def test_uncaught_exception_in_the_main_thread_announces_a_suicide():
    with FakeMaster([os.path.join(APPS, "main_crash.py")]) as fm:
        start_ready(fm)
        suicide = fm.expect(p.Suicide)
        assert "RuntimeError: boom in main" in suicide.reason
        fm.send(p.Drain(5000))
        assert fm.wait_exit(8) == 1


def test_descriptor_table_full_is_not_an_error(listener):
    """MSG_CTRUNC: with a tiny RLIMIT_NOFILE the kernel drops some of a 64-descriptor
    batch; the worker counts them as lost, says so, and goes on serving."""
    with FakeMaster([WSGI], nofile=48) as fm:
        start_ready(fm)
        pairs = [listener.pair() for _ in range(64)]
        fm.send_connections([s for _, s in pairs])
        ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        while ack.received < 64:
            ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        assert ack.received == 64 and 0 < ack.lost < 64, ack
        served = lost = 0
        for client, _ in pairs:
            try:
                request(client, "/", keep_alive=False)
                r = read_response(client, timeout=5)
                assert r.status == 200
                served += 1
            except (ConnectionError, OSError):
                lost += 1
            client.close()
        assert served == 64 - ack.lost and lost == ack.lost
        assert "MSG_CTRUNC" in fm.stderr_text() or "dropped" in fm.stderr_text()
        # The worker goes on.
        client, resp = get(fm, listener, "/")
        assert resp.status == 200
        client.close()
        fm.send(p.Ping())
        fm.expect(p.Pong)


def test_a_full_worker_acks_as_soon_as_a_connection_closes(listener):
    """Capacity 1 and heartbeats a minute apart: once the one connection it may hold
    closes, the worker reopens its window with an Ack at once, not at its heartbeat."""
    with FakeMaster([WSGI], heartbeat_ms=60_000,
                    extra_env={"TEST_MAX_CONNECTIONS": "1"}) as fm:
        start_ready(fm)
        client, resp = get(fm, listener, "/", keep_alive=True)
        assert resp.status == 200
        ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        for _ in range(100):  # (a heartbeat's Ack may count it before it is held)
            if ack.received >= 1 and ack.capacity == 0:
                break
            ack = fm.expect(p.Ack, skip=(p.Heartbeat,))
        assert ack.capacity == 0, ack  # full: the master must send nothing more
        client.close()
        # (An Ack sent before the close may still be on its way: it says 0 again.)
        deadline = time.monotonic() + 10
        for _ in range(100):
            if ack.capacity > 0:
                break
            ack = fm.expect(p.Ack, timeout=max(0.01, deadline - time.monotonic()),
                            skip=(p.Heartbeat,))
        assert ack.capacity == 1 and ack.received == 1, ack


def worker_sockets(pid):
    """The `socket:[inode]` names of the descriptors process `pid` holds."""
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def wait_until(predicate, timeout, what):
    """Polls `predicate` every 10 ms, at most `timeout` seconds (and 10 000 times)."""
    end = time.monotonic() + timeout
    for _ in range(10_000):
        if predicate():
            return
        if time.monotonic() >= end:
            break
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s: {what}")


def shared_listener():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)  # as the master has it
    return lsock


def test_shared_mode_listener_accepts_until_the_drain(listener):
    with FakeMaster([WSGI, "0.5"]) as fm:
        start_ready(fm)
        lsock = shared_listener()
        fm.send(p.Listener(0), [lsock.fileno()])
        for _ in range(3):
            c = socket.create_connection(lsock.getsockname(), timeout=5)
            request(c, "/", keep_alive=False)
            assert read_response(c).status == 200
            c.close()
        # The open file description is shared: the worker must not make it blocking.
        assert lsock.getblocking() is False
        assert os.get_blocking(lsock.fileno()) is False
        keep = socket.create_connection(lsock.getsockname(), timeout=5)
        request(keep, "/")
        assert read_response(keep).status == 200
        held = f"socket:[{os.fstat(lsock.fileno()).st_ino}]"
        assert held in worker_sockets(fm.proc.pid)
        fm.send(p.Drain(5000))
        # Closed first: the worker no longer holds the listener, and takes nothing new.
        wait_until(lambda: held not in worker_sockets(fm.proc.pid), 5,
                   "the worker closes the listening socket at the drain")
        late = socket.create_connection(lsock.getsockname(), timeout=5)
        request(late, "/")
        late.settimeout(0.3)
        with pytest.raises(socket.timeout):  # in the backlog, never accepted by the worker
            late.recv(1)
        assert fm.wait_exit(5) == 0
        for c in (keep, late):
            c.close()
        lsock.close()


def test_shared_mode_stops_accepting_at_its_own_suicide(listener):
    """From its own Suicide on (a crash here), the worker takes nothing more from the
    shared listening socket, where the other workers (the test here) would serve what
    comes next: it closes its copy at once, without waiting for the master's Drain, and
    still serves the connections it had accepted."""
    with FakeMaster([WSGI, "0.5"]) as fm:
        start_ready(fm)
        lsock = shared_listener()
        fm.send(p.Listener(0), [lsock.fileno()])
        keep = socket.create_connection(lsock.getsockname(), timeout=5)
        request(keep, "/")
        assert read_response(keep).status == 200  # accepted by the worker
        held = f"socket:[{os.fstat(lsock.fileno()).st_ino}]"
        assert held in worker_sockets(fm.proc.pid)
        crash = socket.create_connection(lsock.getsockname(), timeout=5)
        request(crash, "/crash-thread", keep_alive=False)
        assert read_response(crash).status == 200
        assert "boom from a thread" in fm.expect(p.Suicide).reason
        # No Drain yet: the Suicide alone stops the accepting.
        wait_until(lambda: held not in worker_sockets(fm.proc.pid), 5,
                   "the worker closes the listening socket at its Suicide")
        late = socket.create_connection(lsock.getsockname(), timeout=5)
        # In the backlog, for another worker: the test takes it.
        assert select.select([lsock], [], [], 5)[0], "the late connection is not in the backlog"
        taken, _ = lsock.accept()
        taken.close()
        # The connection accepted before the Suicide is still served (and told to close).
        request(keep, "/")
        resp = read_response(keep)
        assert resp.status == 200 and resp.headers.get("connection") == "close", resp
        fm.send(p.Drain(5000))
        assert fm.wait_exit(8) == 1
        for c in (keep, crash, late):
            c.close()
        lsock.close()


def cpu_seconds(pid):
    """User and system CPU time process `pid` used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_not_spinning(pid, seconds=1.5):
    before = cpu_seconds(pid)
    time.sleep(seconds)
    used = cpu_seconds(pid) - before
    # An idle worker uses next to nothing (heartbeats); a loop that spins, a whole core.
    assert used < seconds / 3, f"the idle worker used {used:.2f} s of CPU in {seconds} s"


def test_a_forked_child_is_not_the_worker(listener):
    """A child the application forks (multiprocessing) gets the default SIGTERM back:
    terminate() ends it at once. It announces no suicide, does not drain or wait for a
    deadline, and does not wake the parent's accept threads (shared mode), whose loop
    would then spin; the parent goes on serving as before."""
    with FakeMaster([WSGI, "0.5"]) as fm:
        start_ready(fm)
        lsock = shared_listener()
        fm.send(p.Listener(0), [lsock.fileno()])
        c = socket.create_connection(lsock.getsockname(), timeout=5)
        request(c, "/fork-term")
        result = json.loads(read_response(c, timeout=60).body)
        assert result["up"] is True, result
        assert result["exitcode"] == -signal.SIGTERM, result
        assert not result["closing"] and not result["draining"], result
        assert_not_spinning(fm.proc.pid)
        request(c, "/")
        resp = read_response(c)
        assert resp.status == 200 and resp.headers.get("connection") != "close", resp
        assert not any(isinstance(m, p.Suicide) for _, m in list(fm.log))
        c.close()
        lsock.close()


def test_a_stray_wake_up_does_not_make_the_accept_loop_spin(listener):
    """A byte on an accept thread's wake-up socket without the stop (what a forked
    child's copy used to write) is read and dropped, not left to make every poll
    return at once."""
    with FakeMaster([WSGI, "0.5"]) as fm:
        start_ready(fm)
        lsock = shared_listener()
        fm.send(p.Listener(0), [lsock.fileno()])
        c = socket.create_connection(lsock.getsockname(), timeout=5)
        request(c, "/stray-wake")
        assert read_response(c).body == b"1"
        assert_not_spinning(fm.proc.pid)
        request(c, "/")
        assert read_response(c).status == 200
        late = socket.create_connection(lsock.getsockname(), timeout=5)
        request(late, "/", keep_alive=False)
        assert read_response(late).status == 200  # still accepting
        for s in (c, late, lsock):
            s.close()


def test_protocol_error_from_the_master_ends_the_worker(listener):
    with FakeMaster([WSGI]) as fm:
        start_ready(fm)
        fm.sock.sendall(p.frame(b"\x09\0\0\0"))
        suicide = fm.expect(p.Suicide)
        assert "protocol error" in suicide.reason
        assert fm.wait_exit(3) != 0


@pytest.mark.parametrize("flavour", ["protocol", "streams"])
def test_asyncio_flavours(listener, flavour):
    args = [os.path.join(APPS, "asyncio_echo.py")] + (["streams"] if flavour == "streams" else [])
    with FakeMaster(args) as fm:
        start_ready(fm)
        a, sa = listener.pair()
        b, sb = listener.pair()
        fm.send_connections([sa, sb])
        a.sendall(b"one\n")
        a.settimeout(5)
        assert a.recv(100) == b"one\n"
        b.sendall(b"two\n")
        b.settimeout(5)
        assert b.recv(100) == b"two\n"
        fm.send(p.Drain(5000))
        t = time.monotonic()
        time.sleep(0.3)
        a.sendall(b"still here\n")  # an open connection is still served during the drain
        assert a.recv(100) == b"still here\n"
        a.sendall(b"bye\n")
        assert a.recv(100) == b"bye\n"
        assert at_eof(a, 2)
        b.sendall(b"bye\n")
        assert b.recv(100) == b"bye\n"
        assert fm.wait_exit(5) == 0
        assert time.monotonic() - t < 4.5
        a.close()
        b.close()


@pytest.mark.slow
def test_100_idle_connections_for_30_s_miss_no_heartbeat(listener):
    """The old sketch's flaw: idle connections served inline starved the heartbeats."""
    with FakeMaster([WSGI], heartbeat_ms=1000) as fm:
        start_ready(fm)
        pairs = [listener.pair() for _ in range(100)]
        for i in range(0, 100, 50):
            fm.send_connections([s for _, s in pairs[i:i + 50]])
        t0 = time.monotonic()
        time.sleep(30)
        beats = fm.heartbeats(t0 - 1)
        times = [t for t, _ in beats]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(beats) >= 29 and max(gaps) < 2.1, gaps
        assert beats[-1][1].active == 100 and beats[-1][1].served == 100
        # Still served after 30 s idle.
        for client, _ in pairs[:10]:
            request(client, "/", keep_alive=False)
            assert read_response(client).status == 200
        for client, _ in pairs:
            client.close()
