"""The demo worker, like the bundled Rust one (`rr-cluster hello-worker`): an HTTP
hello world that names its worker.

    rr-cluster run --workers 2 -- python3 -m rr_cluster_worker.demo

Every request gets `x-worker-id: <slot>`, `x-worker-pid: <pid>` and the body
`Hello from worker <slot> (pid <pid>)`; `GET /sleep/<ms>` answers after that many
milliseconds (at most 60 000): a slow request for trying graceful stops and reloads.
Built on `serve_wsgi`, so it follows the drain rules.
"""

import os
import time

from .worker import start_worker
from .wsgi import serve_wsgi

MAX_SLEEP_MS = 60_000


def make_app(slot: int, pid: int):
    """The demo's WSGI application for worker `slot`, process `pid`."""
    body = f"Hello from worker {slot} (pid {pid})\n".encode()
    ident = [("x-worker-id", str(slot)), ("x-worker-pid", str(pid))]
    usage = b"usage: /sleep/<milliseconds up to 60000>\n"

    def app(environ, start_response):
        status, payload = "200 OK", body
        path = environ.get("PATH_INFO", "")
        if path.startswith("/sleep/"):
            ms = path[len("/sleep/"):]
            if ms.isdigit() and int(ms) <= MAX_SLEEP_MS:
                time.sleep(int(ms) / 1000.0)
            else:
                status, payload = "400 Bad Request", usage
        start_response(status, [("Content-Type", "text/plain"), *ident,
                                ("Content-Length", str(len(payload)))])
        return [payload]

    return app


def main():
    worker = start_worker()
    serve_wsgi(make_app(worker.id, os.getpid()), worker=worker, threads=64)


if __name__ == "__main__":
    main()
