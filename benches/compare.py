#!/usr/bin/env python3
"""Side-by-side benchmark: rr-cluster (round-robin, least-connections, shared, and a
pool of Node.js workers) against the hand-written references in benches/ (fd-passing,
SO_REUSEPORT) and Node's own cluster module (round-robin and `none`), interleaved in
one run, rep by rep. Prints markdown on stdout. Started by benches/compare.sh; see
there for the knobs.

Every server is started here and stopped by its PID (SIGTERM, then SIGKILL after 5 s
while it is known to be alive). Only loopback is used.
"""

import json
import os
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
NODE_BENCH = os.environ.get("NODE_BENCH", os.path.join(ROOT, "..", "shared", "bench", "node-cluster.js"))

REPS = int(os.environ.get("REPS", "5"))
DURATION = os.environ.get("DURATION", "5s")  # per system and rep, in turns of SLICE
SLICE = os.environ.get("SLICE", "1s")
WARMUP = os.environ.get("WARMUP", "1s")
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
WORKERS = int(os.environ.get("WORKERS", "2"))
MODES = os.environ.get("MODES", "keepalive close").split()
LOAD = os.environ.get("LOAD", "rr-load")  # or wrk (no busiest share, no p50 from rr-load)
HZ = os.sysconf("SC_CLK_TCK")

ALL_SYSTEMS = ["rr", "rr-lc", "rr-shared", "ref-fdpass", "ref-reuseport", "rr-node", "node-rr", "node-none"]
# Run only when SYSTEMS names them. rr-bare: a round-robin pool of benches' bare-worker
# (rr-cluster's Worker and Connection with hyper, without rr_cluster::http): next to
# `rr`, what the library's HTTP layer costs.
OPTIONAL_SYSTEMS = ["rr-bare"]
LABELS = {
    "rr": "rr-cluster round-robin",
    "rr-lc": "rr-cluster least-connections",
    "rr-shared": "rr-cluster shared",
    "ref-fdpass": "fd-passing reference",
    "ref-reuseport": "SO_REUSEPORT reference",
    "rr-node": "rr-cluster + Node workers",
    "node-rr": "Node cluster rr",
    "node-none": "Node cluster none",
    "rr-bare": "rr-cluster round-robin, bare-worker",
}
# The systems that run side by side in a rep, taking the load in turns: each system
# with the peer its ratio is taken against, so that the two figures of a pair come from
# the same seconds of a shared machine.
# rr / node-rr is a ratio too, so the Node pools run in the first group.
GROUPS = [["rr-lc", "rr", "ref-fdpass", "rr-bare", "node-none", "rr-node", "node-rr"], ["ref-reuseport", "rr-shared"]]
# (system, peer) pairs whose per-rep ratio is reported.
RATIOS = [
    ("rr", "ref-fdpass"),
    ("rr", "rr-bare"),
    ("rr-bare", "ref-fdpass"),
    ("rr-lc", "ref-fdpass"),
    ("rr-shared", "ref-reuseport"),
    ("rr", "node-rr"),
    ("rr-node", "node-rr"),
    ("rr-node", "node-none"),
]

# RR_BASE: another rr-cluster binary (a build of other code, say the commit before a
# change) runs as `rr-base`, round-robin, next to `rr` and the fd-passing reference,
# and as `rr-shared-base` next to `rr-shared` and the SO_REUSEPORT reference: a code
# change measured in the same seconds of the machine.
RR_BASE = os.environ.get("RR_BASE")
if RR_BASE:
    ALL_SYSTEMS.insert(1, "rr-base")
    ALL_SYSTEMS.insert(ALL_SYSTEMS.index("rr-shared") + 1, "rr-shared-base")
    LABELS["rr-base"] = "rr-cluster round-robin, RR_BASE build"
    LABELS["rr-shared-base"] = "rr-cluster shared, RR_BASE build"
    GROUPS[0].append("rr-base")
    GROUPS[1].append("rr-shared-base")
    RATIOS.insert(0, ("rr", "rr-base"))
    RATIOS.insert(1, ("rr-base", "ref-fdpass"))
    RATIOS.insert(2, ("rr-shared", "rr-shared-base"))
    RATIOS.insert(3, ("rr-shared-base", "ref-reuseport"))


def have_node():
    return subprocess.run(["node", "--version"], capture_output=True).returncode == 0 and os.path.exists(NODE_BENCH)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(system, port, work):
    listen = f"127.0.0.1:{port}"
    ctl = os.path.join(work, "ctl.sock")
    rr = [RR, "run", "--workers", str(WORKERS), "--listen", listen, "--control", ctl]
    env = dict(os.environ)
    if system == "rr":
        return rr + ["--balance", "round-robin"], env
    if system == "rr-base":
        return [RR_BASE] + rr[1:] + ["--balance", "round-robin"], env
    if system == "rr-shared-base":
        return [RR_BASE] + rr[1:] + ["--balance", "shared"], env
    if system == "rr-bare":
        return rr + ["--balance", "round-robin", "--", os.path.join(REL, "bare-worker")], env
    if system == "rr-lc":
        return rr + ["--balance", "least-connections"], env
    if system == "rr-shared":
        return rr + ["--balance", "shared"], env
    if system == "rr-node":
        return rr + ["--worker-protocol", "node", "--", "node", os.path.join(ROOT, "benches", "node", "hello.js")], env
    if system in ("ref-fdpass", "ref-reuseport"):
        return [os.path.join(REL, system), "--port", str(port), "--workers", str(WORKERS)], env
    if system in ("node-rr", "node-none"):
        env.update(PORT=str(port), WORKERS=str(WORKERS), NODE_CLUSTER_SCHED_POLICY=system[5:])
        return ["node", NODE_BENCH], env
    raise ValueError(system)


def children():
    """pid -> ppid for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def tree(root):
    parents = children()
    pids, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in pids:
                pids.add(c)
                frontier.append(c)
    return pids


def cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_serving(port, system, work, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError(f"{system} did not serve on port {port}")
    if system.startswith("rr"):
        # Every worker ready.
        while time.monotonic() < end:
            st = subprocess.run([RR, "status", "--json", "--control", os.path.join(work, "ctl.sock")],
                                capture_output=True, text=True)
            if st.returncode == 0:
                ws = json.loads(st.stdout)["workers"]
                if sum(1 for w in ws if w["state"] == "ready") == WORKERS:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{system}: workers not ready")
    time.sleep(0.5)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def load(port, mode, work, duration):
    if LOAD == "wrk":
        args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}", "--latency", f"http://127.0.0.1:{port}/"]
        if mode == "close":
            args[1:1] = ["-H", "Connection: close"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        rps = n = errors = 0
        lat = {}
        for line in out.splitlines():
            w = line.split()
            if line.startswith("Requests/sec"):
                rps = float(w[1])
            elif " requests in " in line:
                n = int(w[0])
            elif line.strip().startswith(("50%", "99%")) and len(w) == 2:
                lat[w[0]] = to_us(w[1])
            elif "Socket errors" in line or "Non-2xx" in line:
                errors += sum(int(x.strip(",")) for x in w if x.strip(",").isdigit())
        return dict(rps=rps, n=n, p50=lat.get("50%"), p99=lat.get("99%"), errors=errors, share=None)
    out = os.path.join(work, "load.json")
    subprocess.run([RRLOAD, "--addr", f"127.0.0.1:{port}", "-c", str(CONNECTIONS), "-d", duration,
                    "--mode", mode, "--no-progress", "--json", out],
                   check=True, capture_output=True)
    with open(out) as f:
        r = json.load(f)
    busiest = r.get("busiest_worker")
    return dict(rps=r["throughput_rps"], n=r["requests"], p50=r["latency_us"]["p50"],
                p99=r["latency_us"]["p99"], errors=r["errors"]["total"],
                share=busiest["share_pct"] if busiest and len(r["workers"]) > 1 else
                (100.0 if busiest else None))


def to_us(s):
    for suffix, k in (("us", 1), ("ms", 1000), ("s", 1_000_000)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * k
    return None


def node_share(stderr_path):
    """Busiest worker's share of requests, from node-cluster.js's SIGTERM lines."""
    reqs = []
    with open(stderr_path) as f:
        for line in f:
            for w in line.split():
                if w.startswith("reqs="):
                    reqs.append(int(w[5:]))
    return 100.0 * max(reqs) / sum(reqs) if reqs and sum(reqs) else None


class Server:
    """One system, started on a port of its own and kept running through a rep."""

    def __init__(self, system, work):
        self.system = system
        self.work = os.path.join(work, system)
        os.makedirs(self.work, exist_ok=True)
        self.port = free_port()
        cmd, env = command(system, self.port, self.work)
        self.err_path = os.path.join(self.work, "server.err")
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        self.slices = []
        self.cpu_master = self.cpu_tree = 0.0

    def ready(self, mode):
        wait_serving(self.port, self.system, self.work)
        if WARMUP not in ("0", "0s"):
            load(self.port, mode, self.work, WARMUP)
        self.pids = tree(self.proc.pid)

    def slice(self, mode):
        """One turn of the load, with the CPU of the server's process tree around it."""
        before = {p: cpu_s(p) for p in self.pids}
        r = load(self.port, mode, self.work, SLICE)
        after = {p: cpu_s(p) for p in self.pids}
        self.cpu_master += after[self.proc.pid] - before[self.proc.pid]
        self.cpu_tree += sum(after[p] - before[p] for p in self.pids)
        self.slices.append(r)

    def result(self):
        """The rep's figures, over all of its turns."""
        n = sum(r["n"] for r in self.slices)
        secs = sum(r["n"] / r["rps"] if r["rps"] else 0.0 for r in self.slices)
        share = median([r["share"] for r in self.slices])
        if share is None and self.system.startswith("node-"):
            share = node_share(self.err_path)
        return dict(rps=n / secs if secs else 0.0, n=n,
                    p50=median([r["p50"] for r in self.slices]),
                    p99=median([r["p99"] for r in self.slices]),
                    errors=sum(r["errors"] for r in self.slices), share=share,
                    master_us=self.cpu_master * 1e6 / max(n, 1),
                    tree_us=self.cpu_tree * 1e6 / max(n, 1))


def run_group(group, mode, work, turns):
    """Starts every system of a group, then gives them the load in turns (A B C, C B A,
    A B C, ...), so that a slow second on a shared machine weighs on all of them alike;
    stops them and returns each one's figures."""
    servers = []
    try:
        for s in group:
            servers.append(Server(s, work))
        # After all have started: stopping the ones started (finally) also works when a
        # later start fails.
        for srv in servers:
            srv.ready(mode)
        for turn in range(turns):
            for srv in servers if turn % 2 == 0 else reversed(servers):
                srv.slice(mode)
    finally:
        # Node's workers write their request counts (busiest share) as they stop.
        for srv in servers:
            stop(srv.proc)
    return {srv.system: srv.result() for srv in servers}


def seconds(d):
    """Whole seconds of a duration like `5s` (wrk takes whole seconds)."""
    if not (d.endswith("s") and d[:-1].isdigit() and int(d[:-1]) > 0):
        print(f"compare: durations are whole seconds, like 5s (got {d})", file=sys.stderr)
        sys.exit(2)
    return int(d[:-1])


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def main():
    bad_modes = [m for m in MODES if m not in ("keepalive", "close")]
    if bad_modes or not MODES:
        print(f"compare: MODES must be keepalive, close or both (got {' '.join(MODES) or 'nothing'})", file=sys.stderr)
        sys.exit(2)
    if RR_BASE and not (os.path.isfile(RR_BASE) and os.access(RR_BASE, os.X_OK)):
        print(f"compare: RR_BASE={RR_BASE} is not an executable file", file=sys.stderr)
        sys.exit(2)
    systems = [s for s in os.environ.get("SYSTEMS", " ".join(ALL_SYSTEMS)).split()]
    unknown = [s for s in systems if s not in ALL_SYSTEMS + OPTIONAL_SYSTEMS]
    if unknown:
        known = " ".join(ALL_SYSTEMS + OPTIONAL_SYSTEMS)
        print(f"compare: unknown system {', '.join(unknown)} (known: {known})", file=sys.stderr)
        sys.exit(2)
    if not have_node():
        dropped = [s for s in systems if "node" in s]
        systems = [s for s in systems if "node" not in s]
        if dropped:
            print(f"(no node or no {NODE_BENCH}: {', '.join(dropped)} left out)", file=sys.stderr)
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    total, slice_s = seconds(DURATION), seconds(SLICE)
    if total % slice_s:
        print(f"compare: DURATION ({DURATION}) is not a multiple of SLICE ({SLICE})", file=sys.stderr)
        sys.exit(2)
    turns = total // slice_s
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores ({cpu}), "
          f"{WORKERS} workers each; load: {LOAD} -c{CONNECTIONS}, {DURATION} per system and rep "
          f"({turns} turns of {SLICE}, after {WARMUP} of warm-up); {REPS} reps; each system runs "
          f"side by side with its peers, taking the load in turns.")
    groups = [[s for s in g if s in systems] for g in GROUPS]
    groups = [g for g in groups if g]
    for a, b in RATIOS:
        if a in systems and b in systems and not any(a in g and b in g for g in groups):
            print(f"compare: {a} / {b} is a ratio, but they do not run side by side", file=sys.stderr)
            sys.exit(2)
    with tempfile.TemporaryDirectory() as work:
        for mode in MODES:
            results = {s: [] for s in systems}
            for rep in range(REPS):
                for group in groups if rep % 2 == 0 else list(reversed(groups)):
                    for s, r in run_group(group, mode, work, turns).items():
                        results[s].append(r)
                        print(f"  {mode} rep {rep + 1} {s}: {r['rps']:.0f} req/s", file=sys.stderr)
            report(mode, systems, results)


def report(mode, systems, results):
    title = "keep-alive" if mode == "keepalive" else "Connection: close"
    print(f"\n### {title}\n")
    print("| rep | " + " | ".join(systems) + " |")
    print("| --- | " + " | ".join("---:" for _ in systems) + " |")
    for i in range(REPS):
        print(f"| {i + 1} | " + " | ".join(f"{results[s][i]['rps']:.0f}" for s in systems) + " |")
    print()
    print("| system | req/s (median) | p50 ms | p99 ms | master µs/req | all processes µs/req | busiest worker | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in systems:
        rs = results[s]
        p50 = median([r["p50"] for r in rs])
        p99 = median([r["p99"] for r in rs])
        share = median([r["share"] for r in rs])
        print(f"| {LABELS[s]} | {median([r['rps'] for r in rs]):.0f} | "
              f"{fmt(p50 and p50 / 1000, '.2f')} | {fmt(p99 and p99 / 1000, '.2f')} | "
              f"{median([r['master_us'] for r in rs]):.1f} | {median([r['tree_us'] for r in rs]):.1f} | "
              f"{fmt(share, '.1f')}{'' if share is None else '%'} | {sum(r['errors'] for r in rs)} |")
    pairs = [(a, b) for a, b in RATIOS if a in results and b in results]
    if pairs:
        print()
        print("| ratio (per rep) | " + " | ".join(str(i + 1) for i in range(REPS)) + " | **median** | p99 ratio |")
        print("| --- | " + " | ".join("---:" for _ in range(REPS)) + " | ---: | ---: |")
        for a, b in pairs:
            per = [results[a][i]["rps"] / results[b][i]["rps"] for i in range(REPS)]
            p99s = [results[a][i]["p99"] / results[b][i]["p99"] for i in range(REPS)
                    if results[a][i]["p99"] and results[b][i]["p99"]]
            print(f"| {a} / {b} | " + " | ".join(f"{x:.2f}" for x in per) +
                  f" | **{statistics.median(per):.2f}** | {fmt(median(p99s), '.2f')} |")


if __name__ == "__main__":
    main()
