#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time.
#
#   scripts/fuzz.sh                      # each target for 60 s
#   FUZZ_SECS=300 scripts/fuzz.sh        # each target for 5 minutes
#   scripts/fuzz.sh record_decode        # only the named targets
#
# Environment:
#   FUZZ_SECS       seconds per target (default 60)
#   FUZZ_JOBS       parallel fuzzing processes per target (default 1)
#   FUZZ_SANITIZER  address (default) or none
#   FUZZ_TOOLCHAIN  a rustup toolchain to use, e.g. nightly (default: the active one; on a
#                   stable toolchain RUSTC_BOOTSTRAP=1 unlocks the unstable flags cargo-fuzz needs)
#
# Seeds come from fuzz/seeds/<target> (committed, read only); what the fuzzer finds goes to
# fuzz/corpus/<target> and crashes to fuzz/artifacts/<target> (both ignored by git). Exits
# non-zero if any target fails; the crashing input's path is printed by libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${FUZZ_SECS:-60}"
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-address}"
toolchain=()
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=("+${FUZZ_TOOLCHAIN}")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes -Z flags to rustc; a stable compiler accepts them with RUSTC_BOOTSTRAP=1.
if ! cargo "${toolchain[@]}" --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
    echo "==> fuzzing ${target} for ${secs}s"
    mkdir -p "corpus/${target}"
    seeds=()
    if [ -d "seeds/${target}" ]; then
        seeds=("seeds/${target}")
    fi
    parallel=()
    if [ "${jobs}" -gt 1 ]; then
        parallel=(-jobs="${jobs}" -workers="${jobs}")
    fi
    if cargo "${toolchain[@]}" fuzz run --sanitizer "${sanitizer}" "${target}" \
        "corpus/${target}" "${seeds[@]}" -- \
        -max_total_time="${secs}" -print_final_stats=1 "${parallel[@]}"; then
        echo "==> ${target}: no failure in ${secs}s"
    else
        echo "==> ${target}: FAILED (see the crash input under fuzz/artifacts/${target})"
        failed+=("${target}")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]}"
    exit 1
fi
echo "all fuzz targets ran ${secs}s without failure: ${targets[*]}"
