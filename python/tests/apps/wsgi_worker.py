"""The WSGI worker the fake-master tests run: serve_wsgi with a small app.

/sleep/<ms>    answers after ms milliseconds
/env           JSON: the RR_CLUSTER_* variables left in os.environ, the channel's CLOEXEC
/crash-thread  starts a thread that raises (an uncaught exception)
/echo          echoes the request body (POST)
/fork-term     forks a child (multiprocessing, "fork"), SIGTERMs it (terminate()) once it
               runs, and answers with JSON: its exit code, and whether the worker is
               draining
/stray-wake    writes a byte on the wake-up socket of every shared-mode accept thread
anything else  "hello"
Messages from the master are echoed back (worker.on_message), unless TEST_NO_ECHO is set.
argv: [idle_grace]
"""

import json
import multiprocessing
import os
import sys
import threading
import time

from rr_cluster_worker import current_worker, serve_wsgi, start_worker


def _child(conn):
    conn.send("up")
    time.sleep(60)


def fork_term(worker):
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_end,))
    proc.start()
    up = parent_end.poll(20) and parent_end.recv() == "up"
    proc.terminate()
    proc.join(30)
    if proc.exitcode is None:  # still alive after 30 s: end it (by its pid, alive)
        proc.kill()
        proc.join(5)
        code = "alive"
    else:
        code = proc.exitcode
    return {"up": up, "exitcode": code, "draining": worker.draining.is_set(),
            "closing": worker.closing.is_set()}


def app(environ, start_response):
    worker = current_worker()
    path = environ["PATH_INFO"]
    headers = [("Content-Type", "text/plain"), ("x-worker-pid", str(os.getpid()))]
    if path.startswith("/sleep/"):
        time.sleep(int(path[7:]) / 1000.0)
        body = b"slept\n"
    elif path == "/env":
        fd = worker._sock.fileno()
        body = json.dumps({
            "rr_vars": sorted(k for k in os.environ if k.startswith("RR_CLUSTER_")),
            "channel_inheritable": os.get_inheritable(fd),
            "version": worker.version,
            "id": worker.id,
            "generation": worker.generation,
            "listeners": [list(x) for x in worker.listeners],
            "dropped_messages": worker.dropped_messages,
            "queued_messages": worker.messages.qsize(),
        }).encode()
    elif path == "/crash-thread":
        def boom():
            raise RuntimeError("boom from a thread")
        threading.Thread(target=boom, name="crasher").start()
        body = b"crashing\n"
    elif path == "/fork-term":
        body = json.dumps(fork_term(worker)).encode()
    elif path == "/stray-wake":
        for w in list(worker._wakeups):
            w.send(b"x")
        body = str(len(worker._wakeups)).encode()
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    else:
        body = b"hello\n"
    start_response("200 OK", headers)
    return [body]


def main():
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    max_connections = os.environ.get("TEST_MAX_CONNECTIONS")
    worker = start_worker(message_queue=int(os.environ.get("TEST_MESSAGE_QUEUE", "1024")),
                          max_connections=int(max_connections) if max_connections else None)
    if not os.environ.get("TEST_NO_ECHO"):
        worker.on_message(worker.send)  # echo the master's messages
    serve_wsgi(app, worker=worker, threads=8, idle_grace=grace)


if __name__ == "__main__":
    main()
