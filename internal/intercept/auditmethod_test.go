package intercept

import (
	"io"
	"strings"
	"testing"
)

// TestAuditNamesTheMethodSent: a binding without methods injects into any method token, but
// the audit kept only methods of letters, '-' and '_' (16 bytes at most) and wrote INVALID
// for the rest: the inject line said INVALID while the upstream acted on "PURGE2" or
// "DELETE.v2". A token is recorded as sent; one too long to record is not injected.
func TestAuditNamesTheMethodSent(t *testing.T) {
	const real = "sk-REAL-0123456789abcdefghijklmnop"
	rec := &upRecorder{}
	e := newRawEnv(t, real, []string{"http/1.1"}, serveRaw(rec.serveRaw))
	send := func(method string) string {
		c, br := e.h1Agent(t)
		io.WriteString(c, method+" /v1/x HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"Connection: close\r\n\r\n")
		line, _ := br.ReadString('\n')
		return strings.TrimSpace(line)
	}
	for _, method := range []string{"PURGE2", "DELETE.v2", "M!#$%&'*+-.^_`|~9"} {
		if st := send(method); !strings.Contains(st, " 200 ") {
			t.Fatalf("%s: agent got %s", method, st)
		}
		if got := rec.lastRaw(t); !strings.HasPrefix(got, method+" /v1/x") || !strings.Contains(got, real) {
			t.Fatalf("%s: upstream got %q", method, got)
		}
		var found bool
		for _, ev := range e.srv.auditor.(*eventLog).snapshot() {
			if ev.Decision == "inject" {
				found = found || ev.Method == method
				if ev.Method == "INVALID" {
					t.Fatalf("the upstream got %q with the real key, the audit's inject line says INVALID", method)
				}
			}
		}
		if !found {
			t.Fatalf("no inject line names %q", method)
		}
	}
	long := strings.Repeat("X", 65)
	rec.mu.Lock()
	before := len(rec.reqs)
	rec.mu.Unlock()
	if st := send(long); strings.Contains(st, " 200 ") {
		t.Fatalf("a %d-byte method was injected: %s", len(long), st)
	}
	rec.mu.Lock()
	n := len(rec.reqs)
	rec.mu.Unlock()
	if n != before {
		t.Fatalf("a request whose method the audit cannot record went upstream")
	}
}
