"""A plain WSGI application served by a pool of Python workers.

    pip install ./python
    rr-cluster run --listen 127.0.0.1:8080 --workers 2 -- python3 python/examples/wsgi_app.py
    curl -s 127.0.0.1:8080/hello?name=you
    curl -s -X POST --data-binary 'some text' 127.0.0.1:8080/echo

Any WSGI framework works the same way: pass its application object to `serve_wsgi`
(Flask: `serve_wsgi(app)`, Django: `serve_wsgi(get_wsgi_application())`, Bottle,
Falcon, Pyramid...).
"""

import json
import os
from urllib.parse import parse_qs

from rr_cluster_worker import current_worker, serve_wsgi


def application(environ, start_response):
    worker = current_worker()
    path = environ["PATH_INFO"]
    if path == "/echo" and environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read()  # chunked or Content-Length: both work
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [body]
    if path == "/hello":
        name = parse_qs(environ["QUERY_STRING"]).get("name", ["world"])[0]
        payload = json.dumps({"hello": name, "worker": worker.id, "pid": os.getpid(),
                              "generation": worker.generation}).encode() + b"\n"
        start_response("200 OK", [("Content-Type", "application/json")])
        return [payload]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"try /hello?name=you or POST /echo\n"]


if __name__ == "__main__":
    serve_wsgi(application, threads=16)
