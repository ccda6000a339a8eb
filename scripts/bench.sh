#!/usr/bin/env bash
# Runs the benchmarks described in BENCHMARKS.md.
#
#   scripts/bench.sh            the throughput benchmark (about two minutes after the build)
#   scripts/bench.sh --valkey   the same against Valkey 8.1 (native SET .. IFEQ fencing; see
#                               scripts/valkey.sh), for hosts whose Redis is older than 8.4
#   scripts/bench.sh --all      the throughput benchmark, then the micro-benchmarks and the
#                               in-process layer benchmark
#
# Settings are read from the environment (BENCH_ROUNDS, BENCH_SECS, BENCH_CONCURRENCY, ...);
# see the top of benches/throughput.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--valkey" ]; then
    REDIS_SERVER="$(scripts/valkey.sh)"
    export REDIS_SERVER
fi

if ! command -v "${REDIS_SERVER:-redis-server}" >/dev/null 2>&1; then
    echo "redis-server not found: install it (apt-get install redis-server) or set REDIS_SERVER" >&2
    exit 1
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
mem=$(grep MemTotal /proc/meminfo 2>/dev/null | awk '{printf "%.1f GiB", $2 / 1048576}' || true)
echo "machine: $(nproc) cores, ${cpu:-unknown CPU}, ${mem:-unknown memory}, $("${REDIS_SERVER:-redis-server}" --version | cut -d' ' -f1-3)"

cargo bench --locked --all-features --bench throughput
if [ "${1:-}" = "--all" ]; then
    cargo bench --locked --bench micro
    cargo bench --locked --bench layer
fi
