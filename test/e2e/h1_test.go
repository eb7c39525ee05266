package e2e

import (
	"encoding/base64"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// rawTLSClient sends bytes over a verified TLS connection (HTTP/1.1 by ALPN) and prints
// everything that comes back until the server closes or goes quiet. Arguments: host, then
// base64 parts; "WAIT<code>" between parts waits for a response head with that status
// before the next part, and
// "PAD<n>" sends a header line of n bytes.
const rawTLSClient = `
import base64, socket, ssl, sys, time
host = sys.argv[1]
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=10), server_hostname=host)
out = b""
for part in sys.argv[2:]:
    if part.startswith("SLEEP"):
        time.sleep(int(part[5:]) / 1000)
        continue
    if part.startswith("PAD"):
        s.sendall(b"X-Pad: " + b"a" * int(part[3:]) + b"\r\n")
        continue
    if part.startswith("WAIT"):
        while (b"HTTP/1.1 " + part[4:].encode()) not in out or not out.endswith(b"\r\n\r\n"):
            b = s.recv(65536)
            if not b:
                break
            out += b
        continue
    s.sendall(base64.b64decode(part))
s.settimeout(2)
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
except socket.timeout:
    pass
sys.stdout.write(out.decode("latin-1"))
`

// raw runs rawTLSClient as the agent; parts are raw request bytes, "WAIT<code>", "PAD<n>" or
// "SLEEP<ms>".
func (e *env) raw(t *testing.T, host string, parts ...string) string {
	t.Helper()
	script := filepath.Join(e.dir, "rawtls.py")
	writeFile(t, script, []byte(rawTLSClient), 0o644)
	args := []string{script, host}
	for _, p := range parts {
		if !strings.HasPrefix(p, "WAIT") && !strings.HasPrefix(p, "PAD") && !strings.HasPrefix(p, "SLEEP") {
			p = base64.StdEncoding.EncodeToString([]byte(p))
		}
		args = append(args, p)
	}
	out, err := e.agent(agentUID, "python3", args...)
	if err != nil {
		t.Fatalf("raw client: %v\n%s", err, out)
	}
	return out
}

// TestHTTP1Framing attacks the proxy's own HTTP/1.1 loop: pipelining, request smuggling
// through conflicting framing, oversized and malformed heads, and Expect: 100-continue. The
// proxy decides each request on its own and re-frames every body it forwards, so nothing
// hidden in one request reaches the upstream as another.
func TestHTTP1Framing(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	auth := "Authorization: Bearer " + phOpenAI + "\r\n"
	host := "Host: " + hostOpenAI + "\r\n"
	since := func() int { return len(e.upstream.requests()) }
	newReqs := func(n int) []seenRequest { return e.upstream.requests()[n:] }

	t.Run("pipelined requests are decided one by one", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI,
			"GET /v1/models HTTP/1.1\r\n"+host+auth+"\r\n"+
				"DELETE /v1/models HTTP/1.1\r\n"+host+auth+"\r\n"+
				"GET /v1/last HTTP/1.1\r\n"+host+auth+"Connection: close\r\n\r\n")
		if c := strings.Count(out, "HTTP/1.1 200 "); c != 3 {
			t.Fatalf("want 3 responses of 200, got %d:\n%s", c, out)
		}
		got := newReqs(n)
		if len(got) != 3 {
			t.Fatalf("upstream saw %d requests, want 3", len(got))
		}
		want := []string{"Bearer " + realOpenAI, "Bearer " + phOpenAI, "Bearer " + realOpenAI}
		for i, r := range got {
			if a := r.Header.Get("Authorization"); a != want[i] {
				t.Errorf("request %d (%s %s): Authorization %q, want %q", i, r.Method, r.Path, a, want[i])
			}
		}
	})

	t.Run("HTTP/1.0 keep-alive", func(t *testing.T) {
		out := e.raw(t, hostOpenAI,
			"GET /v1/models HTTP/1.0\r\n"+host+auth+"Connection: keep-alive\r\n\r\n"+
				"GET /v1/models HTTP/1.0\r\n"+host+auth+"\r\n")
		first, second, ok := strings.Cut(out, `{"ok":true,"path":"/v1/models"}`)
		if !ok || !strings.Contains(first, "\r\nConnection: keep-alive\r\n") || !strings.Contains(second, "\r\nConnection: close\r\n") {
			t.Fatalf("want a kept and then a closed connection:\n%s", out)
		}
	})

	t.Run("an upstream connection closed after a response is replaced", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI,
			"GET /v1/drop HTTP/1.1\r\n"+host+auth+"\r\n"+
				"HEAD /v1/models HTTP/1.1\r\n"+host+auth+"\r\n"+
				"GET /v1/drop HTTP/1.1\r\n"+host+auth+"\r\n"+
				"GET /v1/models HTTP/1.1\r\n"+host+auth+"Connection: close\r\n\r\n")
		if c := strings.Count(out, "HTTP/1.1 200 "); c != 4 {
			t.Fatalf("want 4 responses of 200, got %d:\n%s", c, out)
		}
		if c := strings.Count(out, `{"dropped":1}`); c != 2 || !strings.HasSuffix(out, `{"ok":true,"path":"/v1/models"}`) {
			t.Fatalf("bodies out of step:\n%s", out)
		}
		if got := newReqs(n); len(got) != 4 {
			t.Fatalf("upstream saw %d requests, want 4", len(got))
		}
	})

	t.Run("a POST after the upstream silently closed its pooled connection goes out once", func(t *testing.T) {
		// The POST cannot be retried, so its pooled connection is probed first: the closed
		// one is replaced before anything is sent, and the POST is neither lost nor doubled.
		n := since()
		out := e.raw(t, hostOpenAI,
			"GET /v1/drop HTTP/1.1\r\n"+host+auth+"\r\n", "SLEEP300",
			"POST /v1/models HTTP/1.1\r\n"+host+auth+"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
		if c := strings.Count(out, "HTTP/1.1 200 "); c != 2 {
			t.Fatalf("want 2 responses of 200, got %d:\n%s", c, out)
		}
		got := newReqs(n)
		if len(got) != 2 || got[1].Method != "POST" || got[1].Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("upstream saw %+v", got)
		}
	})

	t.Run("a protocol switch is injected once, then spliced", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI,
			"GET /v1/upgrade HTTP/1.1\r\n"+host+auth+"Connection: Upgrade\r\nUpgrade: echo\r\n\r\n", "WAIT101", "ping")
		if !strings.HasPrefix(out, "HTTP/1.1 101 ") || !strings.HasSuffix(out, "echo:ping") {
			t.Fatalf("want 101 and the echo, got:\n%s", out)
		}
		got := newReqs(n)
		if len(got) != 1 || got[0].Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("upstream saw %+v", got)
		}
	})

	t.Run("Content-Length and chunked together: the body stays a body", func(t *testing.T) {
		n := since()
		smuggled := "GET /v1/smuggled HTTP/1.1\r\n" + host + auth + "\r\n"
		body := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled)
		out := e.raw(t, hostOpenAI,
			"POST /v1/chat HTTP/1.1\r\n"+host+auth+"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"+body+
				"GET /v1/after HTTP/1.1\r\n"+host+"Connection: close\r\n\r\n")
		sawChat := false
		for _, r := range newReqs(n) {
			sawChat = sawChat || r.Path == "/v1/chat"
			if strings.Contains(r.Path, "smuggled") {
				t.Fatalf("a request hidden in a body reached the upstream: %s %s (Authorization %q)\n%s", r.Method, r.Path, r.Header.Get("Authorization"), out)
			}
			if r.Path == "/v1/chat" && r.Body != smuggled {
				t.Fatalf("upstream got body %q, want the chunked body %q", r.Body, smuggled)
			}
		}
		if !sawChat {
			t.Fatalf("the chunked request did not reach the upstream:\n%s", out)
		}
	})

	for _, tc := range []struct{ name, req, status, reason string }{
		{"unsupported transfer coding", "POST /v1/chat HTTP/1.1\r\n" + host + auth + "Transfer-Encoding: gzip, chunked\r\n\r\n", "400", "bad_request"},
		{"two different Content-Lengths", "POST /v1/chat HTTP/1.1\r\n" + host + auth + "Content-Length: 3\r\nContent-Length: 30\r\n\r\nabc", "400", "bad_request"},
		{"space before the colon", "GET /v1/models HTTP/1.1\r\n" + host + "Authorization : Bearer " + phOpenAI + "\r\n\r\n", "400", "invalid_header_name"},
		{"control byte in a value", "GET /v1/models HTTP/1.1\r\n" + host + auth + "X-A: a\x01b\r\n\r\n", "400", ""},
		{"no Host", "GET /v1/models HTTP/1.1\r\n" + auth + "\r\n", "400", "missing_host_header"},
		{"CONNECT", "CONNECT " + hostOpenAI + ":443 HTTP/1.1\r\n" + host + auth + "\r\n", "405", "connect_not_allowed"},
		{"unknown expectation", "GET /v1/models HTTP/1.1\r\n" + host + auth + "Expect: teapot\r\n\r\n", "417", "expectation_failed"},
	} {
		t.Run("refused: "+tc.name, func(t *testing.T) {
			n := since()
			out := e.raw(t, hostOpenAI, tc.req+"GET /v1/next HTTP/1.1\r\n"+host+auth+"\r\n")
			if !strings.HasPrefix(out, "HTTP/1.1 "+tc.status+" ") || !strings.Contains(out, "agent-vault-proxy: "+tc.reason) {
				t.Fatalf("want %s %s, got:\n%.300s", tc.status, tc.reason, out)
			}
			if strings.Count(out, "HTTP/1.1 ") != 1 {
				t.Fatalf("the connection went on after a malformed request:\n%.300s", out)
			}
			if got := newReqs(n); len(got) != 0 {
				t.Fatalf("upstream saw %d requests, want none: %s %s", len(got), got[0].Method, got[0].Path)
			}
		})
	}

	t.Run("refused: oversized head", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI, "GET /v1/models HTTP/1.1\r\n"+host+auth, "PAD200000", "\r\n")
		if !strings.HasPrefix(out, "HTTP/1.1 431 ") || !strings.Contains(out, "request_header_too_large") {
			t.Fatalf("want 431, got:\n%.300s", out)
		}
		if got := newReqs(n); len(got) != 0 {
			t.Fatalf("upstream saw %d requests, want none", len(got))
		}
	})

	t.Run("refused: a chunked body that breaks off", func(t *testing.T) {
		out := e.raw(t, hostOpenAI, "POST /v1/chat HTTP/1.1\r\n"+host+auth+"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
		if !strings.HasPrefix(out, "HTTP/1.1 400 ") || !strings.Contains(out, "agent-vault-proxy: bad_request_body") {
			t.Fatalf("want 400 bad_request_body, got:\n%.300s", out)
		}
	})

	t.Run("an upstream error quoting the credential is logged without it", func(t *testing.T) {
		out := e.raw(t, hostOpenAI, "GET /v1/garbled HTTP/1.1\r\n"+host+auth+"\r\n")
		if !strings.HasPrefix(out, "HTTP/1.1 502 ") || strings.Contains(out, realOpenAI) {
			t.Fatalf("want 502 without the key, got:\n%.300s", out)
		}
		log := e.avpdLog.String()
		if !strings.Contains(log, "malformed") {
			t.Fatalf("the upstream error was not logged:\n%s", log)
		}
		if strings.Contains(log, realOpenAI) {
			t.Fatalf("the real key reached avpd's log:\n%s", log)
		}
	})

	t.Run("Expect: 100-continue is answered by the proxy", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI,
			"POST /v1/chat HTTP/1.1\r\n"+host+auth+"Content-Length: 11\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
			"WAIT100", "hello world")
		if !strings.HasPrefix(out, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ") {
			t.Fatalf("want 100 then 200, got:\n%s", out)
		}
		got := newReqs(n)
		if len(got) != 1 || got[0].Body != "hello world" || got[0].Header.Get("Authorization") != "Bearer "+realOpenAI || got[0].Header.Get("Expect") != "" {
			t.Fatalf("upstream saw %+v", got)
		}
	})

	t.Run("hop-by-hop and forwarding headers do not reach the upstream", func(t *testing.T) {
		n := since()
		e.raw(t, hostOpenAI, "GET /v1/models HTTP/1.1\r\n"+host+auth+
			"Connection: close, X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nX-Forwarded-For: 1.2.3.4\r\nX-Keep: yes\r\n\r\n")
		got := newReqs(n)
		if len(got) != 1 {
			t.Fatalf("upstream saw %d requests", len(got))
		}
		for _, k := range []string{"X-Drop-Me", "Keep-Alive", "Proxy-Authorization", "X-Forwarded-For"} {
			if v := got[0].Header.Get(k); v != "" {
				t.Errorf("upstream got %s: %q", k, v)
			}
		}
		if got[0].Header.Get("X-Keep") != "yes" || got[0].Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Errorf("upstream headers: %v", got[0].Header)
		}
	})

	t.Run("an inject header listed in Connection is neither forwarded nor audited as injected", func(t *testing.T) {
		n := since()
		out := e.raw(t, hostOpenAI, "GET /v1/connection-listed HTTP/1.1\r\n"+host+auth+"Connection: close, Authorization\r\n\r\n")
		if !strings.HasPrefix(out, "HTTP/1.1 200 ") {
			t.Fatalf("want the upstream's answer, got:\n%s", out)
		}
		got := newReqs(n)
		if len(got) != 1 || got[0].Header.Get("Authorization") != "" {
			t.Fatalf("upstream saw %+v", got)
		}
		evs := e.findAudit("path", "/v1/connection-listed")
		if len(evs) == 0 {
			t.Fatal("no audit event for the request")
		}
		for _, ev := range evs {
			if ev["decision"] == "inject" {
				t.Fatalf("audited as injected: %v", ev)
			}
		}
	})
}
