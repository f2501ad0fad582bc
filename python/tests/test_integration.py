"""With the real master: `rr-cluster run -- python3 -m rr_cluster_worker.demo`.

The binary is $RR_CLUSTER_BIN, else target/debug/rr-cluster in this repository; the
tests are skipped (with the reason) when neither exists, and fail instead with
RR_REQUIRE_TOOLS=1 (CI sets it: a missing binary must not pass silently).
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from conftest import PYTHON_DIR

REPO = os.path.dirname(PYTHON_DIR)


WANTED = os.environ.get("RR_CLUSTER_BIN") or os.path.join(REPO, "target", "debug", "rr-cluster")
BIN = WANTED if os.path.isfile(WANTED) and os.access(WANTED, os.X_OK) else None


@pytest.fixture(autouse=True)
def _needs_the_binary():
    if BIN is None:
        reason = f"no rr-cluster binary at {WANTED} (set RR_CLUSTER_BIN, or build target/debug/rr-cluster)"
        if os.environ.get("RR_REQUIRE_TOOLS") == "1":
            pytest.fail(reason + " (RR_REQUIRE_TOOLS=1: these tests may not be skipped)")
        pytest.skip(reason)


# Heartbeats a minute apart: with the default 1 s, a heartbeat late on a loaded machine
# (two intervals and 100 ms) takes its worker out of the rotation for a moment, and the
# round-robin split is no longer exact.
SLOW_HEARTBEATS = ("--heartbeat-interval", "60s", "--heartbeat-timeout", "off")


class Pool:
    def __init__(self, tmp_path, workers=2, extra=()):
        # Port 0: the master binds and reports its port (wait_ready reads it). A port
        # probed free and bound again later could be taken by a parallel test meanwhile.
        self.port = None
        self.control = str(tmp_path / "control.sock")
        self.log_path = tmp_path / "master.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = PYTHON_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [BIN, "run", "--listen", "127.0.0.1:0", "--workers", str(workers),
             "--control", self.control, *SLOW_HEARTBEATS, *extra,
             "--", sys.executable, "-m", "rr_cluster_worker.demo"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers

    def ctl(self, *args, timeout=60):
        return subprocess.run([BIN, *args, "--control", self.control], capture_output=True,
                              text=True, timeout=timeout)

    def status(self):
        r = self.ctl("status", "--json", timeout=10)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def wait_ready(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log_text()
            st = self.status() if os.path.exists(self.control) else None
            if st and sum(w["state"] == "ready" for w in st["workers"]) == self.workers:
                self.port = int(st["listeners"][0].rsplit(":", 1)[1])
                return st
            time.sleep(0.1)
        raise AssertionError(f"the pool was not ready in {timeout} s:\n{self.log_text()}")

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=10)
                self.proc.wait(15)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.proc.poll() is None:  # still alive: kill it (its workers die with it)
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    try:
        p.wait_ready()
        yield p
    finally:
        p.close()


def get(port, path="/", close=True, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"} if close else {})
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def test_500_requests_split_evenly(pool):
    counts = Counter()
    for _ in range(500):
        status, headers, body = get(pool.port)
        assert status == 200
        slot, pid = headers["x-worker-id"], headers["x-worker-pid"]
        assert body == f"Hello from worker {slot} (pid {pid})\n".encode()
        counts[slot] += 1
    assert counts == {"0": 250, "1": 250}, counts


def client_loop(port, keep_alive, stop, results, pids):
    conn = None
    while not stop.is_set():
        try:
            if conn is None or not keep_alive:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={} if keep_alive else {"Connection": "close"})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or not body.startswith(b"Hello from worker"):
                results["bad"] += 1
            else:
                results["ok"] += 1
                pids.add(r.getheader("x-worker-pid"))
            if not keep_alive:
                conn.close()
        except Exception as e:  # noqa: BLE001 - every failure counts
            results["failed"] += 1
            results.setdefault("errors", []).append(repr(e))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


def test_rolling_reload_under_load_loses_no_request(pool):
    before = {str(w["pid"]) for w in pool.status()["workers"]}
    stop = threading.Event()
    runs = []
    for keep_alive in (True, True, False, False):
        results, pids = Counter(), set()
        t = threading.Thread(target=client_loop, args=(pool.port, keep_alive, stop, results, pids),
                             daemon=True)
        runs.append((keep_alive, results, pids, t))
        t.start()
    try:
        time.sleep(0.5)
        r = pool.ctl("reload", "--wait", "--timeout", "60s", timeout=70)
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(0.5)
    finally:
        stop.set()
        for *_, t in runs:
            t.join(15)
    after = {str(w["pid"]) for w in pool.status()["workers"]}
    assert not before & after  # every worker was replaced
    for keep_alive, results, pids, _ in runs:
        kind = "keep-alive" if keep_alive else "close"
        assert results["failed"] == 0 and results["bad"] == 0, (kind, dict(results), pool.log_text())
        assert results["ok"] > 20, (kind, dict(results))
        assert pids & before and pids & after, (kind, pids, before, after)


def test_stop_wait_exits_zero(pool):
    assert get(pool.port)[0] == 200
    r = pool.ctl("stop", "--wait", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert pool.proc.wait(15) == 0
    log = pool.log_text()
    assert log.count("exit=exit code 0") == 2, log


def test_stop_lets_a_slow_request_finish(pool):
    result = {}

    def slow():
        result["r"] = get(pool.port, "/sleep/1500", close=False)

    dispatched = sum(w["dispatched"] for w in pool.status()["workers"])
    t = threading.Thread(target=slow)
    t.start()
    # The stop comes once the slow request is with a worker (the master counts what it
    # hands over at once; a heartbeat would be up to a minute away).
    end = time.monotonic() + 20
    while sum(w["dispatched"] for w in pool.status()["workers"]) == dispatched:
        assert time.monotonic() < end, "the slow request never reached a worker"
        time.sleep(0.05)
    r = pool.ctl("stop", "--wait", timeout=60)
    t.join(10)
    assert r.returncode == 0
    status, headers, body = result["r"]
    assert status == 200 and headers.get("connection") == "close"
    assert pool.proc.wait(15) == 0
