#!/usr/bin/env bash
# A bounded soak of the layer (examples/soak.rs): steady load through a Redis-backed and a
# memory-backed layer, then checks that resident memory stayed flat after warm-up, that the
# memory store stayed bounded, that every Redis key expired once the load stopped, and that no
# key ran twice. Prints the numbers; exits non-zero if a check fails.
#
#   scripts/soak.sh                    # 60 s; spawns a redis-server on a free port
#   SOAK_SECS=600 scripts/soak.sh      # ten minutes
#
# Every SOAK_* variable and REDIS_URL are passed through; see examples/soak.rs for the list.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
    echo "soak: needs redis-server on PATH (apt-get install redis-server) or REDIS_URL" >&2
    exit 2
fi
cargo build --locked --release --example soak
exec target/release/examples/soak
