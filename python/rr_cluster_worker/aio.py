"""asyncio flavours: the master's connections fed to an asyncio protocol or to a
streams callback, on one event loop in the main thread.

The drain rules, as far as a server that does not speak HTTP can follow them:

1. stop taking: after the drain begins no new connection comes (those the master sent
   before it are still started);
2. `on_drain(worker)` is called in the loop (a coroutine function is awaited, until the
   deadline): the place to tell your protocols to finish (answer what is in progress,
   close idle connections after a grace, send a "going away" if your protocol has one);
3. finish: the loop runs until every connection is closed (streams: until every
   `client_connected_cb` has returned; the connection is closed when it returns);
4. exit by the deadline: just before the master's deadline, whatever is still running is
   cancelled (streams) and the process exits, status 0 (1 after an uncaught exception).

What the worker cannot know for you is when a connection of your protocol is idle: an
HTTP server should use `serve_wsgi` (or apply the keep-alive rules of
docs/PROTOCOL.md itself in `on_drain`).
"""

import asyncio
import inspect
import sys
import threading
import traceback
from typing import Awaitable, Callable, Optional

from .worker import start_worker

__all__ = ["serve_asyncio", "serve_asyncio_streams"]


async def _maybe_await(value, timeout):
    if inspect.isawaitable(value):
        try:
            await asyncio.wait_for(value, timeout)
        except asyncio.TimeoutError:
            print("rr_cluster_worker: on_drain did not finish before the deadline",
                  file=sys.stderr)
        except Exception:
            traceback.print_exc()


async def _run(worker, start, tasks: set, on_drain, poll: float = 0.05) -> int:
    loop = asyncio.get_running_loop()
    drain_started = asyncio.Event()

    def launch(conn):
        task = loop.create_task(start(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def bridge():
        for conn in worker:
            try:
                loop.call_soon_threadsafe(launch, conn)
            except RuntimeError:  # the loop is closed
                conn.close()
        try:
            loop.call_soon_threadsafe(drain_started.set)
        except RuntimeError:
            pass

    threading.Thread(target=bridge, name="rr-cluster-asyncio-bridge", daemon=True).start()
    worker.ready()
    await drain_started.wait()
    if on_drain is not None:
        try:
            result = on_drain(worker)
        except Exception:
            traceback.print_exc()
        else:
            await _maybe_await(result, worker.time_left())
    # Finish: until every connection is closed and every task is done, or the deadline.
    while worker.active > 0 or tasks:
        left = worker.time_left()
        if left is not None and left <= 0:
            break
        await asyncio.sleep(min(poll, left) if left is not None else poll)
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.wait(list(tasks), timeout=0.1)
    return worker.exit_code


def _finish(worker, run, exit: bool) -> int:
    code = asyncio.run(run)
    if exit:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.exit(code)
    return code


def serve_asyncio(protocol_factory: Callable[[], asyncio.BaseProtocol], *, worker=None,
                  on_drain: Optional[Callable] = None, handle_signals: bool = True,
                  exit: bool = True, **worker_options) -> int:
    """Runs an event loop (`asyncio.run`) that gives every connection the master passes
    to a new `protocol_factory()` (as `loop.create_server` would, through
    `loop.connect_accepted_socket`), until the drain is done; then exits the process (or
    returns the status with `exit=False`). See the module's doc for the drain rules.

    Other keyword arguments go to `Worker` (when `worker` is not given).
    """
    if worker is None:
        worker = start_worker(**worker_options)
    if handle_signals and threading.current_thread() is threading.main_thread():
        worker.handle_signals()

    async def start(conn):
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(protocol_factory, conn)
        except Exception:
            traceback.print_exc()
            conn.close()

    return _finish(worker, _run(worker, start, set(), on_drain), exit)


def serve_asyncio_streams(client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                        Optional[Awaitable[None]]], *,
                          worker=None, on_drain: Optional[Callable] = None,
                          limit: int = 2 ** 16, handle_signals: bool = True, exit: bool = True,
                          **worker_options) -> int:
    """Like `asyncio.start_server(client_connected_cb)`, on the master's connections:
    `client_connected_cb(reader, writer)` (a coroutine function, or a plain function) is
    called for each; the connection is closed when it returns. At the deadline the
    callbacks still running are cancelled. See the module's doc for the drain rules.
    """
    if worker is None:
        worker = start_worker(**worker_options)
    if handle_signals and threading.current_thread() is threading.main_thread():
        worker.handle_signals()
    tasks: set = set()

    async def start(conn):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit)
        finished = loop.create_future()
        cb_task = None

        async def connected(reader, writer):
            nonlocal cb_task
            cb_task = asyncio.current_task()
            try:
                result = client_connected_cb(reader, writer)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                traceback.print_exc()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, asyncio.CancelledError, Exception):
                    pass
                if not finished.done():
                    finished.set_result(None)

        protocol = asyncio.StreamReaderProtocol(reader, connected)
        try:
            await loop.connect_accepted_socket(lambda: protocol, conn)
        except Exception:
            traceback.print_exc()
            conn.close()
            return
        # The callback runs as a task of its own (StreamReaderProtocol starts it): this
        # task lasts as long, so that the drain waits for it and can cancel it.
        try:
            await finished
        except asyncio.CancelledError:
            if cb_task is not None:
                cb_task.cancel()
            raise

    return _finish(worker, _run(worker, start, tasks, on_drain), exit)
