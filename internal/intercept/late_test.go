package intercept

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// TestAuditUnavailableIsRecordedLate: a request whose decision the audit log did not
// acknowledge gets 503 with nothing sent upstream, and once the log answers again it holds
// the refusal, for an injecting and a verbatim request alike; so a decision line that did
// reach the log (a lost ack) is followed by what really happened.
func TestAuditUnavailableIsRecordedLate(t *testing.T) {
	p := newH1Pair(t)
	for _, path := range []string{"/v1/models", "/v2/models"} { // injected, verbatim
		before := p.upConns.Load()
		p.audit.mu.Lock()
		p.audit.fail = 3 // the request's record and the first two late attempts
		p.audit.mu.Unlock()
		code, body := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", path, 1))
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "audit_unavailable") {
			t.Fatalf("%s with the audit log down: %d %q, want 503 audit_unavailable", path, code, body)
		}
		if n := p.upConns.Load(); n != before {
			t.Fatalf("%s: the upstream was reached with the audit log down", path)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			var late []audit.Event
			for _, e := range p.audit.snapshot() {
				if e.Decision == audit.DecisionRefuse && e.Reason == "audit_unavailable" && e.Path == path {
					late = append(late, e)
				}
			}
			if len(late) == 1 {
				if e := late[0]; e.Status != 503 || e.SNI != "api.openai.com" || e.Method != "GET" || !strings.Contains(e.Detail, "nothing was sent upstream") || e.Validate() != nil {
					t.Fatalf("%s: late refusal %+v", path, e)
				}
				break
			}
			if len(late) > 1 || time.Now().After(deadline) {
				t.Fatalf("%s: %d late refusals in the log, want 1: %+v", path, len(late), p.audit.snapshot())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// TestInvalidLateRefusalIsDropped: an event the schema refuses would be refused on every
// try; it is dropped, and the refusals queued with it are recorded.
func TestInvalidLateRefusalIsDropped(t *testing.T) {
	p := newH1Pair(t)
	bad := audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionRefuse, Reason: "audit_unavailable", Path: "/" + strings.Repeat("a", 5000)}
	good := audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionRefuse, Reason: "audit_unavailable", Path: "/v1/after", Status: 503}
	p.srv.late <- bad
	p.srv.late <- good
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, e := range p.audit.snapshot() {
			if e.Path == "/v1/after" {
				if !strings.Contains(p.logs.String(), "dropped a late refusal") {
					t.Fatalf("no log line for the dropped event:\n%s", p.logs.String())
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the refusal queued after an invalid one was never recorded")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
