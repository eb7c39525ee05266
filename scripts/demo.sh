#!/usr/bin/env bash
# sudo make demo: the main job of agent-vault-proxy, end to end, with no BWS account.
#
# In a throwaway network namespace it starts a fake api.openai.com, avpd with the file
# backend, enrolls an unprivileged agent UID and runs curl as that UID with only a
# placeholder key. It prints what the agent sent, what the upstream received (masked) and
# the audit line, then removes everything, also on Ctrl-C. The host's own network and
# firewall are never touched.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=$PWD/bin
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root for a network namespace and nftables; run: sudo make demo" >&2
  exit 1
fi
for tool in ip setpriv curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing; apt-get install iproute2 util-linux curl" >&2; exit 1; }
done

NS=avp-demo-$$
AGENT_UID=4242
DIR=$(mktemp -d /tmp/avp-demo-XXXXXX)
chmod 755 "$DIR"
PRIV=$DIR/private
mkdir -m 700 "$PRIV"
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null
  rm -rf "/etc/netns/$NS" "$DIR"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted, cleaning up"; exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A throwaway network namespace ($NS) where api.openai.com is a local fake"
ip netns add "$NS"
ip -n "$NS" link set lo up
mkdir -p "/etc/netns/$NS"
printf '127.0.0.1 localhost\n127.0.0.2 api.openai.com\n' >"/etc/netns/$NS/hosts"
ip netns exec "$NS" "$BIN/avp-demo-upstream" --listen 127.0.0.2:443 --name api.openai.com \
  --ca-out "$DIR/upstream-ca.pem" >"$DIR/upstream.log" 2>&1 &
PIDS+=($!)

REAL="sk-demo-REAL-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
PLACEHOLDER="sk-avp-PLACEHOLDER-openai-0000000000000000"
umask 077
printf 'OPENAI_API_KEY: %s\n' "$REAL" >"$PRIV/secrets.yaml"
cat >"$PRIV/bindings.yaml" <<EOF
version: 1
backend:
  type: file
  file: {path: $PRIV/secrets.yaml}
proxy:
  upstream_ca_file: $DIR/upstream-ca.pem   # the fake upstream's CA; real hosts use the system roots
audit:
  path: $PRIV/audit.jsonl
secrets:
  OPENAI_API_KEY:
    placeholder: $PLACEHOLDER
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: api.openai.com
        methods: [POST]
        paths: ["/v1/**"]
EOF
umask 022
echo "secrets file (root-only, mode 0600): OPENAI_API_KEY = ${REAL:0:13}...${REAL: -4}"
echo "binding: POST https://api.openai.com/v1/** with Authorization: Bearer {secret}"

for _ in $(seq 100); do [ -s "$DIR/upstream-ca.pem" ] && break; sleep 0.05; done

step "2. avpd starts inside the namespace and the agent UID $AGENT_UID is enrolled"
ip netns exec "$NS" "$BIN/avpd" serve --config "$PRIV/bindings.yaml" \
  --state-dir "$PRIV/state" --runtime-dir "$PRIV/run" >"$DIR/avpd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$PRIV/run/admin.sock" ] && break; sleep 0.05; done
[ -S "$PRIV/run/admin.sock" ] || { echo "avpd did not start:"; cat "$DIR/avpd.log"; exit 1; }
"$BIN/avpctl" --runtime-dir "$PRIV/run" enroll-uid "$AGENT_UID"
"$BIN/avpctl" --runtime-dir "$PRIV/run" ca cert >"$DIR/avp-ca.pem"
echo "the agent trusts avpd's local CA ($DIR/avp-ca.pem), as an operator installs it with the system store"

agent() {
  ip netns exec "$NS" setpriv --reuid="$AGENT_UID" --regid="$AGENT_UID" --clear-groups -- \
    env -i PATH=/usr/bin:/bin HOME=/tmp "$@"
}

step "3. The agent (curl as uid $AGENT_UID, no proxy variables) sends only the placeholder"
echo "agent sends:   POST https://api.openai.com/v1/chat/completions  Authorization: Bearer $PLACEHOLDER"
printf 'agent env:     '; agent sh -c 'env | grep -ci proxy || true' | sed 's/^0$/no proxy variables/'
RESP=$(agent curl -sS --cacert "$DIR/avp-ca.pem" -H "Authorization: Bearer $PLACEHOLDER" \
  -H 'Content-Type: application/json' -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}' \
  https://api.openai.com/v1/chat/completions)
echo "agent got:     $RESP"
sleep 0.2
echo "$(grep 'POST /v1/chat' "$DIR/upstream.log" | tail -1)"
echo "               (masked except the last 4 characters; the real key ends in ${REAL: -4})"

step "4. A request outside the binding (GET /v1/models is not POST) is forwarded verbatim"
agent curl -sS -o /dev/null --cacert "$DIR/avp-ca.pem" -H "Authorization: Bearer $PLACEHOLDER" \
  https://api.openai.com/v1/models
sleep 0.2
echo "$(grep 'GET /v1/models' "$DIR/upstream.log" | tail -1)"
echo "               (the placeholder ends in ${PLACEHOLDER: -4}: the upstream's own auth error would surface)"

step "5. The audit log (fsynced before the upstream saw a byte); no secret, no header value"
cat "$PRIV/audit.jsonl"

if grep -q "$REAL" "$PRIV/audit.jsonl" "$DIR/avpd.log"; then
  echo "demo: FAILED: the real key appeared in a log" >&2
  exit 1
fi
step "Done: the agent never held the real key; it only existed inside avpd and on its TLS connection upstream."
