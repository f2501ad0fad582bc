#!/usr/bin/env python3
"""The master's own cost. At saturation: a backlog drain (the master is stopped while
BURST connections, each with its request already sent, queue in its listen backlog,
then continued and timed until every one is answered), so the master always has a
connection waiting: CPU per connection and connections per master-core-second from 2
to 16 workers, against the fd-passing reference (benches/src/bin/ref-fdpass.rs) in the
same run, and system calls per connection (strace -c on all of its threads). Below
saturation: the same under a closed loop (rr-load, Connection: close, 64 connections),
where each connection finds the master asleep. Instructions per dispatched connection
(callgrind: repeatable on a noisy machine) with 2 and with 16 workers, and the master's
resident memory after a million connections. Started by benches/master.sh; prints
markdown on stdout.

CPU time is the sum of the schedstat run times (nanoseconds) of the master's threads.
Workers are the bundled demo. Every server is stopped by its PID. Loopback only.
"""

import json
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
RR = os.path.join(REL, "rr-cluster")
RRLOAD = os.path.join(REL, "rr-load")
REF = os.path.join(REL, "ref-fdpass")
HZ = os.sysconf("SC_CLK_TCK")
REPS = int(os.environ.get("REPS", "3"))
DURATION = os.environ.get("DURATION", "5s")
SECTIONS = os.environ.get("SECTIONS", "syscalls saturation closed callgrind memory").split()
BURST = int(os.environ.get("BURST", "3000"))
BURSTS = int(os.environ.get("BURSTS", "5"))
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
MILLION = int(os.environ.get("MILLION", "1000000"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid):
    """CPU time of every live thread of `pid`, from schedstat (nanoseconds)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


class Master:
    def __init__(self, work, workers, wrap=()):
        self.port = free_port()
        self.ctl = os.path.join(work, f"ctl-{self.port}.sock")
        self.proc = subprocess.Popen(
            [*wrap, RR, "run", "--workers", str(workers), "--listen", f"127.0.0.1:{self.port}",
             "--control", self.ctl, "--ready-timeout", "120s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.workers = workers
        self.wait_ready()

    def status(self):
        st = subprocess.run([RR, "status", "--json", "--control", self.ctl], capture_output=True, text=True)
        return json.loads(st.stdout) if st.returncode == 0 else None

    def wait_ready(self, deadline=120.0):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("master exited")
            st = self.status()
            if st and sum(1 for w in st["workers"] if w["state"] == "ready") == self.workers:
                self.pid = st["master_pid"]
                return
            time.sleep(0.1)
        raise RuntimeError("workers not ready")

    def accepted(self):
        return self.status()["accepted"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a burst was cut short
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()


class RefMaster:
    """benches/src/bin/ref-fdpass: blocking accept, one descriptor per sendmsg."""

    def __init__(self, workers):
        self.port = free_port()
        self.proc = subprocess.Popen([REF, "--port", str(self.port), "--workers", str(workers)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.pid = self.proc.pid
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("ref-fdpass exited")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(REQUEST)
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("ref-fdpass not serving")

    def stop(self):
        Master.stop(self)


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def burst(m, n, deadline=60.0):
    """One backlog drain: `n` connections (request sent) queue while the master is
    stopped; then it runs until every one is answered. The master's CPU seconds and
    the wall-clock seconds of the drain, and how many got a 200."""
    socks = []
    os.kill(m.pid, signal.SIGSTOP)
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
            s.sendall(REQUEST)
            s.setblocking(False)
            socks.append(s)
        c0 = cpu_s(m.pid)
        t0 = time.monotonic()
    finally:
        os.kill(m.pid, signal.SIGCONT)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    left, ok = n, 0
    end = time.monotonic() + deadline
    while left and time.monotonic() < end:
        for key, _ in sel.select(1.0):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 200"):
                ok += 1
            if not data or b"\r\n\r\n" in data:
                sel.unregister(s)
                s.close()
                left -= 1
    t1 = time.monotonic()
    c1 = cpu_s(m.pid)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return c1 - c0, t1 - t0, ok


def load(port, duration, connections=64, rate=None, work="/tmp"):
    out = os.path.join(work, "load.json")
    args = [RRLOAD, "--addr", f"127.0.0.1:{port}", "-c", str(connections), "-d", duration,
            "--mode", "close", "--no-progress", "--json", out]
    if rate:
        args += ["--rate", str(rate)]
    subprocess.run(args, check=True, capture_output=True)
    with open(out) as f:
        return json.load(f)


def strace_counts(pid, run):
    """System calls of every thread of `pid` (strace -c) while `run()` runs."""
    tids = os.listdir(f"/proc/{pid}/task")
    out = os.path.join(tempfile.gettempdir(), f"master-strace-{pid}.txt")
    st = subprocess.Popen(["strace", "-c", "-o", out] + [a for t in tids for a in ("-p", t)],
                          stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached
        result = run()
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
    rows = {}
    with open(out) as f:
        for line in f:
            w = line.split()
            if len(w) >= 5 and w[0][0].isdigit() and not line.startswith("100.00"):
                rows[w[-1]] = int(w[3])
    os.unlink(out)
    return rows, result


def syscalls(work):
    print("\n### System calls per connection (strace -c on every master thread, 2 workers)\n")
    n = min(BURST, raise_nofile(BURST + 256) - 256)
    m = Master(work, 2)
    try:
        burst(m, 500)
        a0 = m.accepted()
        drained, _ = strace_counts(m.pid, lambda: [burst(m, n) for _ in range(3)])
        a1 = m.accepted()
        load(m.port, "1s", work=work)
        b0 = m.accepted()
        closed, r = strace_counts(m.pid, lambda: load(m.port, DURATION, work=work))
        b1 = m.accepted()
    finally:
        m.stop()
    sat, cl = a1 - a0, b1 - b0
    print(f"At saturation: {sat} connections in 3 backlog drains of {n}. Below saturation: {cl} "
          f"connections under rr-load close -c64 ({r['throughput_rps']:.0f} req/s, slowed by strace).\n")
    print("| syscall | at saturation | below saturation |")
    print("| --- | ---: | ---: |")
    names = sorted(set(drained) | set(closed), key=lambda k: -(drained.get(k, 0) / sat + closed.get(k, 0) / cl))
    for name in names:
        a, b = drained.get(name, 0) / sat, closed.get(name, 0) / cl
        if max(a, b) >= 0.005:
            print(f"| {name} | {a:.2f} | {b:.2f} |")
    print(f"| **total** | **{sum(drained.values()) / sat:.2f}** | **{sum(closed.values()) / cl:.2f}** |")


def saturation(work):
    n = min(BURST, raise_nofile(BURST + 256) - 256)
    print(f"\n### At saturation: CPU per connection, 2 to 16 workers ({REPS} reps interleaved, "
          f"{BURSTS} backlog drains of {n} connections each)\n")
    print("The master is stopped (SIGSTOP) while the connections, each with its request sent, "
          "queue in the listen backlog, then continued (SIGCONT) and timed until every one is "
          "answered: it always has a connection waiting. CPU is the master's; the drain rate is "
          "wall-clock on two cores shared with the workers and the client.\n")
    systems = [("rr", 2), ("rr", 4), ("rr", 8), ("rr", 16), ("ref", 2), ("ref", 16)]
    res = {k: [] for k in systems}
    for rep in range(REPS):
        for key in (systems if rep % 2 == 0 else systems[::-1]):
            kind, w = key
            m = Master(work, w) if kind == "rr" else RefMaster(w)
            try:
                burst(m, 500)  # warm
                runs = [burst(m, n) for _ in range(BURSTS)]
            finally:
                m.stop()
            bad = sum(n - r[2] for r in runs)
            us = statistics.median(r[0] * 1e6 / n for r in runs)
            rate = statistics.median(n / r[1] for r in runs)
            res[key].append((us, rate, bad))
            print(f"  {kind} {w} workers rep {rep + 1}: {us:.2f} µs/conn, {rate:.0f} conn/s", file=sys.stderr)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), sum(x[2] for x in v))
           for k, v in res.items()}
    print("| master | workers | master µs/connection | connections per master-core-second | drain rate (conn/s) | not answered |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key in systems:
        us, rate, bad = med[key]
        name = "rr-cluster" if key[0] == "rr" else "fd-passing reference"
        print(f"| {name} | {key[1]} | {us:.2f} | {1e6 / us:,.0f} | {rate:,.0f} | {bad} |")
    print(f"\n16 workers / 2 workers (rr-cluster, µs per connection): {med[('rr', 16)][0] / med[('rr', 2)][0]:.3f}; "
          f"rr-cluster / reference: {med[('rr', 2)][0] / med[('ref', 2)][0]:.2f} with 2 workers, "
          f"{med[('rr', 16)][0] / med[('ref', 16)][0]:.2f} with 16")


def closed(work):
    print(f"\n### Below saturation: CPU per connection ({REPS} reps interleaved, {DURATION} each, rr-load close -c64)\n")
    print("Each connection finds the master asleep: the wake-up is part of its cost.\n")
    systems = [("rr", 2), ("rr", 16), ("ref", 2)]
    res = {k: [] for k in systems}
    for rep in range(REPS):
        for key in (systems if rep % 2 == 0 else systems[::-1]):
            kind, w = key
            m = Master(work, w) if kind == "rr" else RefMaster(w)
            try:
                load(m.port, "1s", work=work)
                c0 = cpu_s(m.pid)
                r = load(m.port, DURATION, work=work)
                c1 = cpu_s(m.pid)
            finally:
                m.stop()
            conns = r["requests"]
            res[key].append(((c1 - c0) * 1e6 / conns, r["throughput_rps"], r["errors"]["total"]))
            print(f"  {kind} {w} workers rep {rep + 1}: {res[key][-1][0]:.1f} µs/conn", file=sys.stderr)
    print("| master | workers | connections/s | master µs/connection | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key in systems:
        us = statistics.median(x[0] for x in res[key])
        rps = statistics.median(x[1] for x in res[key])
        name = "rr-cluster" if key[0] == "rr" else "fd-passing reference"
        print(f"| {name} | {key[1]} | {rps:.0f} | {us:.1f} | {sum(x[2] for x in res[key])} |")


def callgrind_ir(work, workers, rate, seconds=10):
    """Instructions the master executed over `seconds` of open-loop load at `rate`."""
    out = os.path.join(work, f"cg-{workers}-{rate}.out")
    m = Master(work, workers, wrap=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    try:
        c0 = m.accepted()
        load(m.port, f"{seconds}s", connections=16, rate=rate, work=work)
        conns = m.accepted() - c0
    finally:
        m.stop()
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]), conns
    raise RuntimeError("no callgrind summary")


def callgrind(work):
    print("\n### Instructions per dispatched connection (callgrind, master only)\n")
    print("Slope between two open-loop rates over the same 10 s, so start-up and timers cancel out.\n")
    print("| workers | Ir at 150/s | Ir at 300/s | connections | Ir per connection |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    per = {}
    for w in (2, 16):
        ir1, n1 = callgrind_ir(work, w, 150)
        ir2, n2 = callgrind_ir(work, w, 300)
        per[w] = (ir2 - ir1) / (n2 - n1)
        print(f"| {w} | {ir1:,} | {ir2:,} | {n1} / {n2} | {per[w]:,.0f} |")
    print(f"\n16 workers / 2 workers: {per[16] / per[2]:.3f}")


def memory(work):
    print(f"\n### Master memory after {MILLION:,} connections (2 workers)\n")
    m = Master(work, 2)
    try:
        rss0 = vm(m.pid, "VmRSS")
        started = time.monotonic()
        while m.accepted() < MILLION and time.monotonic() - started < 900:
            load(m.port, "10s", work=work)
        n = m.accepted()
        print(f"| accepted | VmRSS at start | VmRSS after | VmHWM (peak) |")
        print(f"| ---: | ---: | ---: | ---: |")
        print(f"| {n:,} | {rss0} KiB | {vm(m.pid, 'VmRSS')} KiB | {vm(m.pid, 'VmHWM')} KiB |")
    finally:
        m.stop()


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def main():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores ({cpu}), release build, demo workers.")
    with tempfile.TemporaryDirectory() as work:
        for s in SECTIONS:
            {"syscalls": syscalls, "saturation": saturation, "closed": closed, "callgrind": callgrind,
             "memory": memory}[s](work)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
