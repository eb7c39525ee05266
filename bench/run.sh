#!/usr/bin/env bash
# make bench: the side-by-side benchmark of issue 7 (direct, avpd, nginx, mitmproxy).
# Root, about 9 minutes; results in bench/results/. Extra flags go to avpbench run, for
# example: make bench BENCHFLAGS='-rounds 1 -d 2s -scenarios ka1,ka32'.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench: needs root for a network namespace and nftables; run: sudo make bench" >&2
  exit 1
fi
bash bench/deps.sh
bin=$(mktemp -d /tmp/avpbench-bin-XXXXXX)
trap 'rm -rf "$bin"' EXIT
CGO_ENABLED=0 go build -o "$bin/avpbench" ./bench/avpbench
"$bin/avpbench" run -repo . -out bench/results "$@"
