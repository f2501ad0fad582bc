#!/usr/bin/env bash
# The master's own cost (benches/master.py does the work): system calls per connection
# (strace) at and below saturation, CPU per connection at saturation (a backlog drain)
# from 2 to 16 workers and below it (closed loop), both against the fd-passing
# reference, instructions per dispatched connection with 2 and 16 workers (callgrind),
# and resident memory after a million connections.
#
#   benches/master.sh
#   SECTIONS="saturation closed" REPS=5 BURST=3000 BURSTS=5 benches/master.sh
#   SECTIONS="syscalls callgrind memory" DURATION=5s MILLION=1000000 benches/master.sh
#
# Needs strace and valgrind for those sections. Loopback only; every server is
# stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p rr-cluster-cli -p rr-load -p rr-cluster-benches --bins
exec python3 benches/master.py
