#!/usr/bin/env bash
# The master's own cost at saturation (benches/master.py does the work): system calls
# per connection (strace), CPU per connection from 2 to 16 workers, instructions per
# dispatched connection with 2 and 16 workers (callgrind), and resident memory after a
# million connections.
#
#   benches/master.sh
#   SECTIONS="syscalls callgrind" REPS=5 DURATION=5s MILLION=1000000 benches/master.sh
#
# Needs strace and valgrind for those sections. Loopback only; every server is
# stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p rr-cluster-cli -p rr-load
exec python3 benches/master.py
