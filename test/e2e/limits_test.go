package e2e

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestConnectionLimitPerUID: an agent that opens connections without end is held to
// proxy.max_connections_per_uid (here 3): the next ones are reset, another enrolled user is
// not affected meanwhile, closing one makes room, and status counts the resets.
func TestConnectionLimitPerUID(t *testing.T) {
	e := newEnv(t)
	e.limitConnsPerUID(3)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.avpctl("enroll-uid", strconv.Itoa(otherAgentUID))

	script := filepath.Join(e.dir, "flood.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import socket, ssl, sys, time
host = %q
ctx = ssl.create_default_context()
def tls():
    s = socket.create_connection((host, 443), timeout=5)
    try:
        return ctx.wrap_socket(s, server_hostname=host)
    except Exception:
        s.close()
        raise
held = [tls() for _ in range(3)]
print("held", len(held))
refused = 0
for _ in range(5):
    try:
        held.append(tls())
        print("over the limit: accepted")
    except OSError:
        refused += 1
print("refused", refused, flush=True)
sys.stdin.readline()  # the other user's request runs now
held.pop(0).close()
for i in range(50):
    try:
        held.append(tls())
        print("after a close: accepted")
        break
    except OSError:
        time.sleep(0.1)
else:
    print("after a close: still refused")
`, hostOpenAI)), 0o644)

	cmd := e.agentCmd(agentUID, "python3", script)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	r := bufio.NewReader(stdout)
	for _, want := range []string{"held 3\n", "refused 5\n"} {
		line, err := readLine(r, 20*time.Second)
		if err != nil || line != want {
			t.Fatalf("flood: %q %v, want %q\n%s", line, err, want, stderr.String())
		}
	}

	out, err := e.agent(otherAgentUID, "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer "+phOpenAI, "https://"+hostOpenAI+"/v1/models")
	if err != nil || out != "200" {
		t.Fatalf("another user while the first is at its limit: %q %v", out, err)
	}

	io.WriteString(stdin, "go\n")
	line, err := readLine(r, 20*time.Second)
	if err != nil || line != "after a close: accepted\n" {
		t.Fatalf("after closing one: %q %v\n%s", line, err, stderr.String())
	}
	stdin.Close()
	cmd.Wait()

	// Five were reset while the three were held; the first try after a close may be reset
	// too, before avpd has seen that close.
	status := string(e.avpctl("status"))
	m := regexp.MustCompile(`(\d+) of them over proxy\.max_connections_per_uid`).FindStringSubmatch(status)
	if m == nil {
		t.Fatalf("status does not count the resets:\n%s", status)
	}
	if n, _ := strconv.Atoi(m[1]); n < 5 {
		t.Fatalf("status counts %d resets, want at least 5:\n%s", n, status)
	}
	if log := e.avpdLog.String(); !strings.Contains(log, fmt.Sprintf("uid %d is at its limit of 3 open connections", agentUID)) {
		t.Fatalf("avpd did not log the limit:\n%s", log)
	}
	if c := doctorCheck(t, e, "connection-limit"); c.Status != "warn" || !strings.Contains(c.Detail+c.Fix, "max_connections_per_uid") {
		t.Fatalf("doctor's connection-limit check: %+v", c)
	}
}

// TestHTTP2StreamsCountTowardTheLimit: with proxy.max_connections_per_uid at 3, an httpx
// HTTP/2 client running three streamed requests at once on its connection gets a 503
// connection_limit for what is over the budget (its connection holds a slot, each running
// stream one), and a request after they finished goes through.
func TestHTTP2StreamsCountTowardTheLimit(t *testing.T) {
	e := newEnv(t)
	e.limitConnsPerUID(3)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))

	script := filepath.Join(e.dir, "streams.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import asyncio, httpx
base = "https://%s"
H = {"Authorization": "Bearer %s"}
async def main():
    async with httpx.AsyncClient(http2=True, timeout=20) as c:
        async def one():
            r = await c.get(base + "/v1/stream", headers=H)
            return "%%d %%s %%s" %% (r.status_code, r.http_version, r.headers.get("x-agent-vault-proxy", "-"))
        for line in sorted(await asyncio.gather(*[one() for _ in range(3)])):
            print(line)
        r = await c.get(base + "/v1/models", headers=H)
        print("after", r.status_code)
asyncio.run(main())
`, hostOpenAI, phOpenAI)), 0o644)
	out, err := e.agent(agentUID, "python3", script)
	if err != nil {
		t.Fatalf("httpx streams: %v\n%s", err, out)
	}
	want := "200 HTTP/2 -\n200 HTTP/2 -\n503 HTTP/2 connection_limit\nafter 200\n"
	if out != want {
		t.Fatalf("httpx streams printed:\n%s\nwant:\n%s", out, want)
	}
	if status := string(e.avpctl("status")); !strings.Contains(status, "connection_limit 1") {
		t.Fatalf("status does not count the refused stream:\n%s", status)
	}
}

// limitConnsPerUID sets proxy.max_connections_per_uid in the env's config, before avpd starts.
func (e *env) limitConnsPerUID(n int) {
	e.t.Helper()
	cfg, err := os.ReadFile(e.config)
	if err != nil {
		e.t.Fatal(err)
	}
	limited := strings.Replace(string(cfg), "proxy:\n", fmt.Sprintf("proxy:\n  max_connections_per_uid: %d\n", n), 1)
	if limited == string(cfg) {
		e.t.Fatal("no proxy: section to add the limit to")
	}
	writeFile(e.t, e.config, []byte(limited), 0o600)
}
