#!/usr/bin/env bash
# make bench-deps: install what `make bench` needs from Debian, only what is missing.
# nginx and mitmproxy are the comparison targets, nghttp2-client brings h2load, gnuplot draws
# the chart. A policy-rc.d stops apt from starting nginx on the host while it installs.
set -euo pipefail
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v mitmdump >/dev/null || need+=(mitmproxy)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
command -v nft >/dev/null || need+=(nftables)
command -v curl >/dev/null || need+=(curl)
command -v setpriv >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "bench-deps: need root to install: ${need[*]}" >&2
  exit 1
fi
echo "bench-deps: installing ${need[*]}"
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
