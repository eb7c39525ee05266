package intercept

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

type downAuditor struct{}

func (downAuditor) Record(context.Context, ...audit.Event) error {
	return errors.New("audit journal unavailable: no acknowledgement within the deadline")
}

// TestAuditFailureLinesAreThrottled: while the audit log does not answer, every request
// logged "audit: ..." once: an agent's request loop wrote as many lines as requests, and
// journald's rate limit then dropped avpd's other lines. The first few of an interval are
// logged; the rest are counted (status counts every failure).
func TestAuditFailureLinesAreThrottled(t *testing.T) {
	e := newRawEnv(t, "sk-REAL-0123456789abcdefghijklmnop", []string{"http/1.1"}, serveHandler(http.NotFoundHandler()))
	e.srv.auditor = downAuditor{}
	const n = 40
	c, br := e.h1Agent(t)
	for i := 0; i < n; i++ {
		io.WriteString(c, "GET /v1/x HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("request %d: %d, want 503 audit_unavailable", i, resp.StatusCode)
		}
	}
	if got := strings.Count(e.logs.String(), "audit: audit journal unavailable"); got == 0 || got > agentLogRule.burst {
		t.Fatalf("%d requests with the audit log down wrote %d 'audit:' lines, want 1..%d:\n%s", n, got, agentLogRule.burst, e.logs.String())
	}
	if e.srv.Stats().AuditErrors < n {
		t.Fatalf("status counts %d audit errors, want at least %d", e.srv.Stats().AuditErrors, n)
	}
}
