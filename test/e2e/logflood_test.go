package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestAgentCannotFloodAvpdLog (found by the red team): every connection an agent opens to a bound name and
// then abandons or garbles during the TLS handshake writes one line to avpd's log,
// unthrottled ("tls handshake with agent for ..."). An agent (or a client that merely
// does not trust the local CA) can thereby write thousands of lines a second; under
// systemd, journald's per-unit rate limit (10,000 per 30 s by default) then drops avpd's
// own messages, audit-failure and table-removed warnings included, for the rest of the
// interval. avpd already throttles its per-uid-limit line to one every 10 s for that reason.
func TestAgentCannotFloodAvpdLog(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	script := filepath.Join(e.dir, "flood.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import socket, ssl
ctx = ssl.create_default_context()
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ctx.wrap_bio(inc, out, server_hostname=%q)
try: o.do_handshake()
except ssl.SSLWantReadError: pass
hello = out.read()
for i in range(1000):
    s = socket.create_connection((%q, 443), timeout=5)
    s.sendall(hello + b"\x15\x03\x03\x00\x02\x02\x30")  # then an alert: the client gives up
    try: s.recv(100)
    except Exception: pass
    s.close()
print("done")
`, hostOpenAI, hostOpenAI)), 0o644)
	t0 := time.Now()
	out, err := e.agent(agentUID, "python3", script)
	if err != nil {
		t.Fatalf("%q %v", out, err)
	}
	took := time.Since(t0)
	time.Sleep(500 * time.Millisecond)
	n := strings.Count(e.avpdLog.String(), "tls handshake with agent")
	t.Logf("1000 abandoned handshakes in %v: %d log lines", took, n)
	if n > 50 {
		t.Errorf("one agent wrote %d log lines in %v (%.0f/s): avpd's log is the agent's to flood", n, took, float64(n)/took.Seconds())
	}
	// The lines not logged are counted for status.
	if st := string(e.avpctl("status", "--json")); !strings.Contains(st, fmt.Sprintf(`"log_lines_suppressed": %d`, 1000-n)) {
		t.Errorf("status --json does not count the %d lines not logged:\n%s", 1000-n, st)
	}
}
