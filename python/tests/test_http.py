"""The HTTP/1.1 layer of serve_wsgi, in process (no master): framing, bodies, HEAD,
100-continue, pipelining, errors, and the drain's Connection: close / idle grace."""

import select
import socket
import sys
import threading
import time

import pytest

from fakemaster import Listener, at_eof, read_response, request
from rr_cluster_worker.wsgi import WSGIServer


class StubWorker:
    id = 0

    def __init__(self):
        self.closing = threading.Event()
        self.draining = threading.Event()
        self.drain_started = None

    def drain(self):
        self.drain_started = time.monotonic()
        self.closing.set()
        self.draining.set()

    def suicide(self, reason, exit_code=0):
        self.suicide_reason, self.exit_code = reason, exit_code
        self.drain()


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("x-method", environ["REQUEST_METHOD"])])
        return [body]
    if path == "/lines":
        lines = list(environ["wsgi.input"])
        start_response("200 OK", [("x-lines", str(len(lines)))])
        return [b"|".join(lines)]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"part {i}\n".encode() for i in range(3))
    if path == "/write":
        write = start_response("200 OK", [])
        write(b"written ")
        return [b"and returned"]
    if path == "/ignore-body":
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    if path == "/fail":
        raise ValueError("the application failed")
    if path == "/exit":
        sys.exit(3)
    if path == "/short":
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc", b""]
    if path.startswith("/a "):
        keys = ["PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT", "HTTP_X_THING",
                "CONTENT_TYPE", "REMOTE_ADDR", "SERVER_PROTOCOL"]
        body = "\n".join(f"{k}={environ.get(k)}" for k in keys).encode()
        start_response("200 OK", [])
        return [body]
    if path == "/nocontent":
        start_response("204 No Content", [])
        return []
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


@pytest.fixture
def server():
    worker = StubWorker()
    srv = WSGIServer(app, worker, threads=4, idle_grace=1.0, request_timeout=5)
    srv.start()
    lst = Listener()
    conns = []

    def connect():
        client, conn = lst.pair()
        srv.add(conn, 0)
        conns.append(client)
        return client

    srv.connect = connect
    srv.stub = worker
    yield srv
    for c in conns:
        c.close()
    lst.close()
    srv.close()


def test_keep_alive_serves_many_requests_on_one_connection(server):
    c = server.connect()
    for _ in range(20):
        request(c, "/")
        r = read_response(c)
        assert r.status == 200 and r.body == b"hello\n" and "connection" not in r.headers
        assert r.headers["content-length"] == "6" and "date" in r.headers


def test_connection_close_is_honoured(server):
    c = server.connect()
    request(c, "/", keep_alive=False)
    r = read_response(c)
    assert r.headers["connection"] == "close"
    assert at_eof(c)


def test_http_1_0(server):
    c = server.connect()
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    r = read_response(c)
    assert r.status == 200 and r.headers["connection"] == "close"
    assert at_eof(c)
    c = server.connect()
    c.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = read_response(c)
    assert r.headers["connection"] == "keep-alive"
    c.sendall(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    # No chunked encoding in 1.0: the body ends with the connection.
    c.settimeout(5)
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.endswith(b"part 0\npart 1\npart 2\n") and b"connection: close" in data.lower()


def test_content_length_and_chunked_request_bodies(server):
    c = server.connect()
    request(c, "/echo", method="POST", body=b"x" * 100_000)
    r = read_response(c)
    assert r.body == b"x" * 100_000
    c.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n")
    r = read_response(c)
    assert r.body == b"hello world!"
    c.sendall(b"POST /lines HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"4\r\na\nb\n\r\n3\r\nc\nd\r\n0\r\n\r\n")
    r = read_response(c)
    assert r.headers["x-lines"] == "4" and r.body == b"a\n|b\n|c\n|d"


def test_unread_body_is_skipped_for_the_next_request(server):
    c = server.connect()
    request(c, "/ignore-body", method="POST", body=b"y" * 5000)
    assert read_response(c).body == b"ok"
    request(c, "/")
    assert read_response(c).body == b"hello\n"


def test_pipelined_requests(server):
    c = server.connect()
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 3 + b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    buf = bytearray()
    for _ in range(3):
        assert read_response(c, buf=buf).body == b"hello\n"
    r = read_response(c, buf=buf)
    assert r.headers["transfer-encoding"] == "chunked" and r.body == b"part 0\npart 1\npart 2\n"


def test_head_has_the_headers_and_no_body(server):
    c = server.connect()
    c.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    r = read_response(c, head_only=True)
    assert r.status == 200 and r.headers["content-length"] == "6"
    request(c, "/")  # nothing was left behind on the connection
    assert read_response(c).body == b"hello\n"
    c.sendall(b"GET /nocontent HTTP/1.1\r\nHost: t\r\n\r\n")
    r = read_response(c)
    assert r.status == 204 and "content-length" not in r.headers and "transfer-encoding" not in r.headers
    request(c, "/")
    assert read_response(c).body == b"hello\n"


def test_100_continue(server):
    c = server.connect()
    c.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    r = read_response(c)
    assert r.status == 100
    c.sendall(b"data")
    assert read_response(c).body == b"data"
    # Not read by the application: no 100, and the connection closes after the answer.
    c.sendall(b"POST /ignore-body HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    r = read_response(c)
    assert r.status == 200 and r.headers["connection"] == "close"


def test_write_callable_and_streaming(server):
    c = server.connect()
    request(c, "/write")
    assert read_response(c).body == b"written and returned"
    request(c, "/stream")
    assert read_response(c).body == b"part 0\npart 1\npart 2\n"


def test_environ(server):
    c = server.connect()
    c.sendall(b"GET /a%20b/%C3%A9?x=1&y=%20 HTTP/1.1\r\nHost: example.org:8080\r\n"
              b"X-Thing: 1\r\nX-Thing: 2\r\nX_Thing: spoof\r\n\r\n")
    r = read_response(c)
    env = dict(line.split("=", 1) for line in r.body.decode().split("\n"))
    assert env["PATH_INFO"] == "/a b/" + "é".encode().decode("latin-1")
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.org", "8080")
    assert env["HTTP_X_THING"] == "1, 2"  # the underscore one is dropped
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["SERVER_PROTOCOL"] == "HTTP/1.1"


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n", 417),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_bad_requests_get_an_error_and_close(server, raw, status):
    c = server.connect()
    c.sendall(raw)
    r = read_response(c)
    assert r.status == status and r.headers["connection"] == "close"
    assert at_eof(c)


def test_application_errors(server):
    c = server.connect()
    request(c, "/fail")
    r = read_response(c)
    assert r.status == 500 and r.headers["connection"] == "close"
    assert at_eof(c)
    c = server.connect()
    request(c, "/short")  # 3 bytes of a promised 10: the connection must end
    c.settimeout(5)
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.endswith(b"\r\n\r\nabc")


def test_sys_exit_in_the_application_leaves_gracefully_and_keeps_the_pool(server):
    # More exits than the pool has threads (4): each used to kill its thread for good,
    # leaving its connection open, until no thread served at all.
    for _ in range(6):
        c = server.connect()
        request(c, "/exit")
        r = read_response(c)
        assert r.status == 500 and r.headers["connection"] == "close"
        assert at_eof(c)
    assert server.stub.suicide_reason == "the WSGI application called sys.exit(3)"
    assert server.stub.exit_code == 3
    c = server.connect()
    request(c, "/")
    r = read_response(c)
    assert r.status == 200 and r.headers["connection"] == "close"  # draining now


def test_bad_chunked_body_closes_the_connection(server):
    c = server.connect()
    c.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    r = read_response(c)
    assert r.status == 500
    assert at_eof(c)


def test_drain_rules(server):
    idle = server.connect()
    used = server.connect()
    request(idle, "/")
    read_response(idle)
    request(used, "/")
    read_response(used)
    server.stub.drain()
    t = time.monotonic()
    time.sleep(0.3)
    request(used, "/")
    r = read_response(used)
    assert r.headers["connection"] == "close"
    assert at_eof(used)
    assert not at_eof(idle, 0.5)  # not at once: a request may be on its way
    assert at_eof(idle, 3)
    assert 0.9 <= time.monotonic() - t <= 3.0  # the 1 s grace, on a loaded machine too
    assert server.wait_closed(2)


def test_a_request_arriving_at_the_end_of_the_grace_is_served(server):
    c = server.connect()
    server.stub.drain()
    # Late in the 1 s grace, with room for a loaded machine to get it there in time.
    time.sleep(0.7)
    request(c, "/")
    r = read_response(c)
    assert r.status == 200 and r.headers["connection"] == "close"


def test_slow_handlers_do_not_block_other_connections(server):
    def slow_app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            time.sleep(4)
        start_response("200 OK", [])
        return [b"x"]

    server.app = slow_app
    slow = [server.connect() for _ in range(3)]
    for c in slow:
        request(c, "/slow")
    t = time.monotonic()
    fast = server.connect()
    request(fast, "/")
    assert read_response(fast).body == b"x"
    # 4 threads: one was free (waiting for a slow one would take 4 s).
    assert time.monotonic() - t < 2.5
    for c in slow:
        assert read_response(c).body == b"x"


@pytest.fixture
def make_server():
    made = []

    def make(app=app, **options):
        worker = StubWorker()
        srv = WSGIServer(app, worker, **options)
        srv.start()
        lst = Listener()
        srv.stub = worker
        srv.clients = []

        def connect(rcvbuf=None, sndbuf=None):
            client = socket.socket()
            if rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client.settimeout(5)
            client.connect(lst.addr)
            conn, _ = lst.sock.accept()
            if sndbuf:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            srv.add(conn, 0)
            srv.clients.append(client)
            return client

        srv.connect = connect
        made.append((srv, lst))
        return srv

    yield make
    for srv, lst in made:
        for c in srv.clients:
            c.close()
        lst.close()
        srv.close()


def test_a_stray_crlf_after_a_request_holds_no_thread(make_server):
    """Empty lines after a request (RFC 9112, 2.2) leave the connection idle: it goes
    back to the selector, not to a thread waiting for the next request, and the drain
    closes it after the grace, not at the request timeout."""
    server = make_server(threads=1, idle_grace=1.0, request_timeout=60)
    crlf = server.connect()
    crlf.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n\r\n")
    assert read_response(crlf).status == 200
    other = server.connect()
    request(other, "/")
    assert read_response(other, timeout=10).status == 200  # the only thread is free
    request(crlf, "/")  # and the connection still serves its next request
    assert read_response(crlf, timeout=10).status == 200
    crlf.sendall(b"\r\n\r\n")
    server.stub.drain()
    assert at_eof(crlf, 10), "the idle connection was not closed after the grace"
    assert at_eof(other, 10)
    assert server.wait_closed(10)


def test_a_partial_request_head_holds_no_thread(make_server):
    server = make_server(threads=1, idle_grace=1.0, request_timeout=60)
    slow = server.connect()
    slow.sendall(b"GET /partial HTTP/1.1\r\nHo")
    time.sleep(0.2)  # let the only thread take it, as it did
    other = server.connect()
    request(other, "/")
    assert read_response(other, timeout=10).status == 200
    slow.sendall(b"st: t\r\n\r\n")  # the rest of the head: served as usual
    assert read_response(slow, timeout=10).status == 200


def test_a_request_head_trickling_in_is_cut_at_the_request_timeout(make_server):
    """The head is due whole within request_timeout of its first byte: a byte now and
    then (slowloris) does not hold the connection (nor a thread) for longer."""
    server = make_server(threads=2, request_timeout=1.0)
    c = server.connect()
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    got = bytearray()
    ended = False
    for _ in range(100):  # a byte every 0.2 s (each wait well under the timeout), 20 s
        try:
            c.sendall(b"a")
        except OSError:
            ended = True
            break
        if select.select([c], [], [], 0.2)[0]:
            try:
                data = c.recv(65536)
            except OSError:
                ended = True
                break
            if not data:
                ended = True
                break
            got += data
    assert ended, "the connection is still open after 20 s of a head that never ends"
    assert not got or got.startswith(b"HTTP/1.1 408 "), bytes(got)


def test_a_large_response_to_a_client_that_reads_steadily_is_not_cut(make_server):
    """request_timeout bounds each wait for the client to take more of the response,
    not the whole response (socket.sendall's timeout would)."""
    body = b"x" * (8 << 20)

    def big(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    server = make_server(app=big, threads=1, request_timeout=2.0)
    c = server.connect(rcvbuf=65536, sndbuf=65536)
    request(c, "/", keep_alive=False)
    got = 0
    c.settimeout(20)
    for _ in range(100_000):  # at most ~1.6 MB/s: 5 s or more, each wait 20 ms
        data = c.recv(32768)
        if not data:
            break
        got += len(data)
        time.sleep(0.02)
    assert got > len(body), f"{got} bytes received, the body alone has {len(body)}"


def test_a_head_in_two_segments_is_not_late_for_a_busy_pool(make_server):
    """The rest of a head that arrived in time is read before the deadline is checked:
    time spent waiting for a busy pool does not count against the client (it got 408)."""

    def slow_app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            time.sleep(2.0)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = make_server(app=slow_app, threads=1, request_timeout=1.0)
    b = server.connect()
    a = server.connect()
    b.sendall(b"GET /b HTTP/1.1\r\nHost: t\r\n")  # the only thread reads this part
    time.sleep(0.2)
    request(a, "/slow")  # the pool is busy for 2 s, twice the request timeout
    time.sleep(0.1)
    b.sendall(b"X-Rest: 1\r\n\r\n")  # B's head is whole 0.3 s after its first byte
    assert read_response(a, timeout=10).status == 200
    assert read_response(b, timeout=10).status == 200


def test_a_head_read_after_the_selector_saw_it_costs_no_extra_poll(make_server, monkeypatch):
    """A connection the selector found readable is read at once, not asked again
    whether it is readable (a poll(2) per request, on top of recv's own)."""
    from rr_cluster_worker import wsgi

    calls = []
    readable = wsgi._readable

    def counted(sock):
        calls.append(1)
        return readable(sock)

    monkeypatch.setattr(wsgi, "_readable", counted)
    server = make_server(threads=2, request_timeout=30)
    c = server.connect()
    for _ in range(50):
        request(c, "/")
        assert read_response(c).status == 200
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 20)  # pipelined
    buf = bytearray()
    for _ in range(20):
        assert read_response(c, buf=buf).status == 200
    assert len(calls) == 0, f"{len(calls)} readability polls for 70 requests"


def test_a_head_that_stops_coming_gets_a_408(make_server):
    """Part of a head, then nothing: at the deadline the client gets 408 with
    Connection: close, as when a thread sees the deadline (the selector closed the
    connection without a word)."""
    server = make_server(threads=2, request_timeout=1.0)
    c = server.connect()
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    r = read_response(c, timeout=10)
    assert r.status == 408
    assert r.headers["connection"] == "close"
    assert at_eof(c, 10)


def test_a_client_taking_a_response_too_slowly_is_cut_and_frees_its_thread(make_server):
    """Each wait for the client is under request_timeout, but the whole response must
    go out at min_send_rate at least: the connection is closed after max(request_timeout,
    length / min_send_rate), and the thread serves others again."""
    body = b"x" * (8 << 20)

    def big(environ, start_response):
        if environ["PATH_INFO"] == "/big":
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    # 8 MiB at 2 MiB/s at least: 4 s in all. The client takes 16 KiB every 0.2 s
    # (80 KiB/s: 100 s for the body), each wait well under the 1 s request timeout.
    server = make_server(app=big, threads=1, request_timeout=1.0, min_send_rate=2 << 20)
    slow = server.connect(rcvbuf=32768, sndbuf=32768)
    request(slow, "/big")
    got = 0
    ended = False
    slow.settimeout(10)
    for _ in range(100):  # 20 s at most
        try:
            data = slow.recv(16384)
        except OSError:
            ended = True
            break
        if not data:
            ended = True
            break
        got += len(data)
        time.sleep(0.2)
    assert ended, f"still sending after {got} bytes: the thread is held for ever"
    assert got < len(body)
    other = server.connect()
    request(other, "/")
    assert read_response(other, timeout=10).status == 200


def test_min_send_rate_none_or_zero_turns_the_overall_limit_off():
    """`_send_all` with min_rate 0 (or None) bounds each wait only; with a rate, the
    whole call too. A reader taking 1 MiB in about 1.6 s, each wait well under the 1 s
    timeout: cut with a rate that allows only 1 s in all, whole without one."""
    import socket as socketlib
    import threading
    from rr_cluster_worker.wsgi import _send_all

    def run(min_rate):
        a, b = socketlib.socketpair()
        for s in (a, b):
            s.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_SNDBUF, 32768)
            s.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 32768)
        got = []

        def reader():
            b.settimeout(5)
            for _ in range(200):  # bounded: 1 MiB in 64 KiB reads, 0.1 s apart
                try:
                    data = b.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                got.append(len(data))
                time.sleep(0.1)

        t = threading.Thread(target=reader)
        t.start()
        a.settimeout(1.0)
        try:
            _send_all(a, b"x" * (1 << 20), min_rate)
            cut = False
        except socketlib.timeout:
            cut = True
        a.close()
        t.join(10)
        b.close()
        return cut, sum(got)

    assert run(1 << 30)[0], "a rate that allows 1 s in all cuts a 1.6 s send"
    for off in (0, None):
        cut, got = run(off)
        assert not cut and got == 1 << 20, f"min_rate={off!r}: cut={cut}, {got} bytes"
