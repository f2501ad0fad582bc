#!/usr/bin/env bash
# Side-by-side: rr-cluster against Node's cluster module (round-robin), same load,
# interleaved A B A B ..., and a markdown table of per-rep ratios on stdout.
#
#   benches/compare.sh                      # 5 reps, 5 s each, keep-alive and close
#   REPS=7 DURATION=10s WORKERS=2 benches/compare.sh
#
# Load comes from wrk when it is installed (apt-get install wrk), else from rr-load.
# Node's side needs `node` and node-cluster.js (NODE_BENCH, default
# ../shared/bench/node-cluster.js); without them only rr-cluster is measured.
# Only loopback is used. Every server is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-2}
MODES=${MODES:-"keepalive close"}
NODE_BENCH=${NODE_BENCH:-../shared/bench/node-cluster.js}
LOAD=${LOAD:-$(command -v wrk >/dev/null 2>&1 && echo wrk || echo rr-load)}

cargo build --release --locked -q -p rr-cluster-cli -p rr-load
RR=target/release/rr-cluster
RRLOAD=target/release/rr-load
work=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

have_node=0
if command -v node >/dev/null 2>&1 && [ -f "$NODE_BENCH" ]; then have_node=1; fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "server on port $1 did not come up" >&2
    return 1
}

# CPU seconds (user+system) a process has used, from /proc (USER_HZ = 100).
cpu_s() {
    awk '{ split($0, a, ") "); split(a[2], f, " "); printf "%.2f\n", (f[12] + f[13]) / 100 }' "/proc/$1/stat"
}

start_server() { # system port -> sets server_pid
    case $1 in
    rr-cluster)
        "$RR" run --workers "$WORKERS" --listen "127.0.0.1:$2" --control "$work/ctl.sock" \
            >"$work/server.log" 2>&1 &
        ;;
    node-rr)
        PORT=$2 WORKERS=$WORKERS NODE_CLUSTER_SCHED_POLICY=rr node "$NODE_BENCH" \
            >"$work/server.log" 2>&1 &
        ;;
    esac
    server_pid=$!
    wait_port "$2"
    sleep 0.5 # every worker up
}

stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# Prints "req/s requests".
load() { # port mode
    if [ "$LOAD" = wrk ]; then
        local hdr=()
        [ "$2" = close ] && hdr=(-H 'Connection: close')
        wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "${hdr[@]}" "http://127.0.0.1:$1/" >"$work/load.txt" 2>&1
        awk '/Requests\/sec/ { rps = $2 } / requests in / { n = $1 } END { print rps, n }' "$work/load.txt"
    else
        "$RRLOAD" --addr "127.0.0.1:$1" -c "$CONNECTIONS" -d "$DURATION" --mode "$2" \
            --no-progress --json "$work/load.json" >/dev/null
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["throughput_rps"], r["requests"])' "$work/load.json"
    fi
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

systems="rr-cluster"
[ "$have_node" = 1 ] && systems="rr-cluster node-rr"

echo "## rr-cluster vs Node cluster (round-robin)"
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)),"
echo "$WORKERS workers each, load: $LOAD, $CONNECTIONS connections, $DURATION per run, $REPS reps interleaved."
echo "Master CPU: CPU time of the master (Node: the primary) divided by requests."
for mode in $MODES; do
    : >"$work/rows"
    for rep in $(seq 1 "$REPS"); do
        row="$rep"
        for sys in $systems; do
            port=$(free_port)
            start_server "$sys" "$port"
            before=$(cpu_s "$server_pid")
            read -r rps n < <(load "$port" "$mode")
            after=$(cpu_s "$server_pid")
            stop_server
            us=$(awk -v a="$before" -v b="$after" -v n="$n" 'BEGIN { printf "%.1f", (b - a) * 1e6 / (n > 0 ? n : 1) }')
            row="$row $rps $us"
        done
        echo "$row" >>"$work/rows"
    done
    echo
    echo "### $mode"
    echo
    if [ "$have_node" = 1 ]; then
        echo "| rep | rr-cluster req/s | Node rr req/s | ratio | rr-cluster master µs/req | Node primary µs/req |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: |"
        awk '{ printf "| %s | %.0f | %.0f | %.2f | %s | %s |\n", $1, $2, $4, $2 / $4, $3, $5 }' "$work/rows"
        printf "| **median** | **%.0f** | **%.0f** | **%.2f** | %s | %s |\n" \
            "$(cut -d' ' -f2 "$work/rows" | median)" "$(cut -d' ' -f4 "$work/rows" | median)" \
            "$(awk '{ print $2 / $4 }' "$work/rows" | median)" \
            "$(cut -d' ' -f3 "$work/rows" | median)" "$(cut -d' ' -f5 "$work/rows" | median)"
    else
        echo "| rep | rr-cluster req/s | master µs/req |"
        echo "| --- | ---: | ---: |"
        awk '{ printf "| %s | %.0f | %s |\n", $1, $2, $3 }' "$work/rows"
        printf "| **median** | **%.0f** | %s |\n" "$(cut -d' ' -f2 "$work/rows" | median)" "$(cut -d' ' -f3 "$work/rows" | median)"
    fi
done
