#!/usr/bin/env python3
"""The master's own cost, at saturation: system calls per connection (strace -c on all
of its threads), CPU per connection and connections per master-core-second from 2 to
16 workers, instructions per dispatched connection (callgrind: repeatable on a noisy
machine) with 2 and with 16 workers, and the master's resident memory after a million
connections. Started by benches/master.sh; prints markdown on stdout.

Load: rr-load, Connection: close (each request a new connection: the master's work),
against the bundled demo worker. Every server is stopped by its PID. Loopback only.
"""

import json
import os
import re
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
HZ = os.sysconf("SC_CLK_TCK")
REPS = int(os.environ.get("REPS", "3"))
DURATION = os.environ.get("DURATION", "5s")
SECTIONS = os.environ.get("SECTIONS", "syscalls saturation callgrind memory").split()
MILLION = int(os.environ.get("MILLION", "1000000"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


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
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()


def load(port, duration, connections=64, rate=None, work="/tmp"):
    out = os.path.join(work, "load.json")
    args = [RRLOAD, "--addr", f"127.0.0.1:{port}", "-c", str(connections), "-d", duration,
            "--mode", "close", "--no-progress", "--json", out]
    if rate:
        args += ["--rate", str(rate)]
    subprocess.run(args, check=True, capture_output=True)
    with open(out) as f:
        return json.load(f)


def syscalls(work):
    print("\n### System calls per connection (strace -c on every master thread, 2 workers)\n")
    m = Master(work, 2)
    try:
        load(m.port, "1s", work=work)
        tids = os.listdir(f"/proc/{m.pid}/task")
        out = os.path.join(work, "strace.txt")
        st = subprocess.Popen(["strace", "-c", "-o", out] + [a for t in tids for a in ("-p", t)],
                              stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        a0 = m.accepted()
        r = load(m.port, DURATION, work=work)
        a1 = m.accepted()
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
    finally:
        m.stop()
    conns = a1 - a0
    rows = []
    with open(out) as f:
        for line in f:
            w = line.split()
            if len(w) >= 5 and w[0][0].isdigit() and not line.startswith("100.00"):
                calls = int(w[3])
                name = w[-1]
                rows.append((name, calls))
    total = sum(c for _, c in rows)
    print(f"{conns} connections accepted under strace ({r['throughput_rps']:.0f} req/s, slowed by strace); "
          f"{total / conns:.2f} system calls per connection:\n")
    print("| syscall | per connection |")
    print("| --- | ---: |")
    for name, calls in sorted(rows, key=lambda x: -x[1]):
        if calls / conns >= 0.005:
            print(f"| {name} | {calls / conns:.2f} |")


def saturation(work):
    print(f"\n### CPU per connection, 2 to 16 workers ({REPS} reps interleaved, {DURATION} each, rr-load close -c64)\n")
    counts = [2, 4, 8, 16]
    res = {w: [] for w in counts}
    for rep in range(REPS):
        for w in (counts if rep % 2 == 0 else counts[::-1]):
            m = Master(work, w)
            try:
                load(m.port, "1s", work=work)
                c0, a0 = cpu_s(m.pid), m.accepted()
                r = load(m.port, DURATION, work=work)
                c1, a1 = cpu_s(m.pid), m.accepted()
            finally:
                m.stop()
            conns = a1 - a0
            res[w].append(((c1 - c0) * 1e6 / conns, r["throughput_rps"], r["errors"]["total"]))
            print(f"  {w} workers rep {rep + 1}: {res[w][-1][0]:.1f} µs/conn", file=sys.stderr)
    print("| workers | connections/s | master µs/connection | connections per master-core-second | errors |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for w in counts:
        us = statistics.median(x[0] for x in res[w])
        rps = statistics.median(x[1] for x in res[w])
        print(f"| {w} | {rps:.0f} | {us:.1f} | {1e6 / us:,.0f} | {sum(x[2] for x in res[w])} |")


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
            {"syscalls": syscalls, "saturation": saturation, "callgrind": callgrind, "memory": memory}[s](work)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
