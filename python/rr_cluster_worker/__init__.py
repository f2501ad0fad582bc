"""rr_cluster_worker: Python workers for an rr-cluster pool (standard library only).

The rr-cluster master accepts the connections and passes each one's descriptor to a
worker over a Unix socketpair (docs/PROTOCOL.md). This package is the worker's side:

- `serve_wsgi(app)`: a threaded HTTP/1.1 WSGI server with the drain rules done right;
- `serve_asyncio(protocol_factory)`, `serve_asyncio_streams(client_connected_cb)`:
  asyncio flavours;
- `Worker`: the channel itself (handshake, heartbeats, flow control, drain, messages),
  for any other server.
"""

from .protocol import PROTOCOL_VERSION, ListenerInfo, ProtocolError, VersionMismatch
from .worker import Connection, NotAWorker, Worker, current_worker, start_worker
from .wsgi import WSGIServer, serve_wsgi
from .aio import serve_asyncio, serve_asyncio_streams

__version__ = "0.1.0"

__all__ = [
    "Worker", "Connection", "NotAWorker", "ProtocolError", "VersionMismatch",
    "ListenerInfo", "PROTOCOL_VERSION", "current_worker", "start_worker", "serve_wsgi", "WSGIServer",
    "serve_asyncio", "serve_asyncio_streams", "__version__",
]
