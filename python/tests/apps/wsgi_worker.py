"""The WSGI worker the fake-master tests run: serve_wsgi with a small app.

/sleep/<ms>    answers after ms milliseconds
/env           JSON: the RR_CLUSTER_* variables left in os.environ, the channel's CLOEXEC
/crash-thread  starts a thread that raises (an uncaught exception)
/echo          echoes the request body (POST)
anything else  "hello"
Messages from the master are echoed back (worker.on_message), unless TEST_NO_ECHO is set.
argv: [idle_grace]
"""

import json
import os
import sys
import threading
import time

from rr_cluster_worker import current_worker, serve_wsgi, start_worker


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
