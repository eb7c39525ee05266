package intercept

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// switchable is the real JournalClient, which a test can make "unavailable" for a while
// (as a journal restart would).
type switchable struct {
	down atomic.Bool
	c    *audit.JournalClient
}

func (s *switchable) Record(ctx context.Context, ev ...audit.Event) error {
	if s.down.Load() {
		return errors.New("journal restarting")
	}
	return s.c.Record(ctx, ev...)
}

// TestLongPathIsAuditedAndLateRefusalsGoOn: a path may be 8192 bytes, an audit field 4096.
// An agent's request with a longer path built an event the journal client refused: 503
// audit_unavailable, and its late refusal, refused again, was retried forever at the head of
// the late queue, so no later refusal (any user's, in a real journal outage) was recorded.
// The path is now cut in the event, and an event that can never be recorded is dropped.
func TestLongPathIsAuditedAndLateRefusalsGoOn(t *testing.T) {
	if len(os.TempDir()) > 40 {
		t.Skip("temp dir too long for a unix socket")
	}
	dir, err := os.MkdirTemp("", "avpj")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	logPath := filepath.Join(dir, "audit.jsonl")
	j, err := audit.OpenJournal(audit.JournalOptions{Log: logPath})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "j.sock")
	ln, err := audit.ListenJournal(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go j.Serve(ctx, ln)

	p := newH1Pair(t)
	sw := &switchable{c: audit.NewJournalClient(sock, 2*time.Second)}
	p.srv.auditor = sw

	// 1. The agent: a request with no placeholder at all, path of 5000 bytes (NormalizePath ok).
	long := "/v1/" + strings.Repeat("a", 5000)
	if _, ok := inject.NormalizePath(long); !ok {
		t.Fatal("NormalizePath refused the long path")
	}
	req := "GET " + long + " HTTP/1.1\r\nHost: api.openai.com\r\nUser-Agent: x\r\n\r\n"
	if code, body := p.do(t, req); code == http.StatusServiceUnavailable {
		t.Fatalf("agent's long-path request: %d %q, want it forwarded and audited", code, strings.TrimSpace(body))
	}

	// 2. Later, a journal outage: a legitimate injected request gets 503 and its refusal is
	// queued, to be recorded when the journal answers again.
	sw.down.Store(true)
	code, body := p.do(t, h1BenchRequest)
	sw.down.Store(false)

	// 3. The journal is back: the late refusal is in the log soon.
	if code != http.StatusServiceUnavailable {
		t.Fatalf("legit request during the outage: %d %q, want 503", code, body)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		data, _ := os.ReadFile(logPath)
		var lateLegit, long int
		for _, l := range strings.Split(string(data), "\n") {
			if strings.Contains(l, `"reason":"audit_unavailable"`) && strings.Contains(l, `"path":"/v1/models"`) {
				lateLegit++
			}
			if strings.Contains(l, `"path":"/v1/aaaa`) {
				long++
			}
		}
		if lateLegit > 0 && long > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s: %d late refusal(s) of the legitimate request and %d line(s) of the long path; avpd log:\n%s", lateLegit, long, p.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
