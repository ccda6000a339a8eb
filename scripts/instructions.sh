#!/usr/bin/env bash
# Instructions per request for each path through the layer, counted by callgrind.
#
#   scripts/instructions.sh                    every variant, 2,000 requests
#   scripts/instructions.sh memory null        the named variants
#   N=5000 scripts/instructions.sh memory      with N requests
#
# Each variant runs twice under `valgrind --tool=callgrind`, with N and with 2N requests; the
# difference divided by N is what one request costs, start-up and connecting excluded. The
# count does not depend on the machine's load. The Redis variants talk to a redis-server this
# script starts on a free port and stops at the end (or to REDIS_URL if set).
#
# The driver is built with one codegen unit (CODEGEN_UNITS=16 for cargo's default): with
# several, how functions are split between units, and so what gets inlined, follows hashes of
# their names, which change with the checkout's path, and the same source then counts up to
# 4 % apart in two directories. With one unit two checkouts agree within 0.2 %.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_PROFILE_BENCH_CODEGEN_UNITS=${CODEGEN_UNITS:-1}

n=${N:-2000}
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
    variants=(plain null memory memory-replay baseline-memory cached-replay redis-first
              redis-replay baseline-first baseline-replay baseline-fenced)
fi
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }

binary=$(cargo bench --locked --all-features --bench instructions --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])')
[ -x "$binary" ] || { echo "could not build benches/instructions.rs" >&2; exit 1; }

if [ -z "${REDIS_URL:-}" ]; then
    command -v "${REDIS_SERVER:-redis-server}" >/dev/null ||
        { echo "redis-server not found: apt-get install redis-server, or set REDIS_URL" >&2; exit 1; }
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${REDIS_SERVER:-redis-server}" --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --loglevel warning --daemonize yes --pidfile "/tmp/instructions-redis-$port.pid"
    trap 'kill "$(cat /tmp/instructions-redis-'"$port"'.pid)" 2>/dev/null || true' EXIT
    export REDIS_URL="redis://127.0.0.1:$port/"
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$binary" "$1" "$2" 2>&1 >/dev/null |
        sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}

printf '%-16s %12s\n' variant instr/request
for v in "${variants[@]}"; do
    one=$(count "$v" "$n")
    two=$(count "$v" $((2 * n)))
    printf '%-16s %12d\n' "$v" $(((two - one) / n))
done
