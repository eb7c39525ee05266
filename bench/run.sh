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
# sudo resets PATH (secure_path): use the Go make found, else the usual install location.
# avpbench builds avpd with the same go.
if [ -n "${GO:-}" ] && [ -x "$GO" ]; then
  export PATH="$(dirname "$GO"):$PATH"
elif ! command -v go >/dev/null; then
  export PATH="/usr/local/go/bin:$PATH"
fi
bash bench/deps.sh
bin=$(mktemp -d /tmp/avpbench-bin-XXXXXX)
trap 'rm -rf "$bin"' EXIT
CGO_ENABLED=0 go build -o "$bin/avpbench" ./bench/avpbench
"$bin/avpbench" run -repo . -out bench/results "$@"
