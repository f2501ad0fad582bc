#!/usr/bin/env bash
# Side-by-side benchmark, interleaved in one run (benches/compare.py does the work):
#   rr-cluster round-robin, least-connections and shared (the demo worker), the
#   fd-passing and SO_REUSEPORT references (benches/src/bin: the same hyper answer on a
#   bare stream, so a ratio isolates rr-cluster's own cost), rr-cluster running Node
#   workers (benches/node/hello.js), and Node's cluster module with its round-robin
#   and `none` scheduling (../shared/bench/node-cluster.js).
#
#   benches/compare.sh                          # 5 reps, 5 s per system, keep-alive and close
#   REPS=7 DURATION=10s SLICE=2s WORKERS=2 SYSTEMS="rr ref-fdpass" MODES=close benches/compare.sh
#   LOAD=wrk benches/compare.sh                 # wrk instead of rr-load (no busiest share)
#   RR_BASE=/tmp/rr-cluster.before SYSTEMS="rr rr-base ref-fdpass" MODES=close benches/compare.sh
#                                               # a code change: another build as rr-base, in turns
#   RR_BASE=/tmp/rr-cluster.before SYSTEMS="rr-shared rr-shared-base ref-reuseport" benches/compare.sh
#                                               # the same for shared balancing
#   SYSTEMS="rr rr-bare ref-fdpass" MODES=keepalive LOAD=wrk benches/compare.sh
#                                               # rr-bare (only when named): the demo's
#                                               # answer on rr-cluster's Worker with bare
#                                               # hyper (benches/src/bin/bare-worker.rs):
#                                               # what rr_cluster::http costs
#
# In a rep, each system runs side by side with the peers its ratios are taken against
# (rr-lc, rr, ref-fdpass; ref-reuseport, rr-shared; node-none, rr-node, node-rr), all
# started at once, and they take the load in turns of SLICE (1 s; A B C, C B A, ...)
# until each had DURATION: a slow second on this shared machine weighs on both sides
# of a ratio, where back-to-back runs of 5 s gave per-rep ratios from 0.77 to 1.63.
#
# For each mode: req/s per rep and system, then per system the medians of req/s, p50
# and p99 latency (a rep's are the medians of its turns), the master's and the whole
# process tree's CPU µs per request, the busiest worker's share of requests
# (x-worker-id; Node cluster: its workers' counts), errors; then per-rep ratios of
# each system to its peer. Node systems are left out when node or node-cluster.js
# (NODE_BENCH) is missing. Loopback only; every server is stopped by its PID. Master
# system calls and saturation: benches/master.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p rr-cluster-cli -p rr-load -p rr-cluster-benches --bins
exec python3 benches/compare.py
