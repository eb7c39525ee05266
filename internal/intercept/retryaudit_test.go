package intercept

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// swapOnEOF calls swap once when a Read of the upstream connection fails (the upstream
// closed it without answering).
type swapOnEOF struct {
	net.Conn
	once  *sync.Once
	armed *atomic.Bool
	swap  func()
}

func (c swapOnEOF) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if c.armed.Load() {
		c.once.Do(c.swap)
	}
	return n, err
}

// TestPolicyChangedBeforeRetrySaysItWasSent: an idempotent injected request sent on a reused
// connection that the upstream takes and closes without answering is retried; when a reload
// lands in between, the retry is not made. Its refuse line said "nothing was sent upstream"
// although the first attempt, with the real key, reached the upstream.
func TestPolicyChangedBeforeRetrySaysItWasSent(t *testing.T) {
	p := newH1Pair(t)
	cfg, err := config.Parse("bindings.yaml", []byte(strings.Replace(h1BenchConfig, "host: api.openai.com", "host: other.example.com", 1)))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	var armed atomic.Bool
	inner := p.srv.upstream.dial
	p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		t.Logf("dial %s", addr)
		c, err := inner(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return swapOnEOF{Conn: c, once: &once, armed: &armed, swap: func() { t.Logf("swapping policy"); p.srv.SetPolicy(inject.NewPolicy(cfg)); t.Logf("swapped") }}, nil
	}
	if code, _ := p.do(t, h1BenchRequest); code != 200 {
		t.Fatalf("first request: %d", code)
	}
	armed.Store(true) // the next upstream read is the one after /v1/charge was written
	code, _ := p.do(t, strings.Replace(h1BenchRequest, "/v1/models", "/v1/charge", 1))
	t.Logf("second request: status %d; upstream received %d /v1/charge request(s) with the real key", code, p.charges.Load())
	if p.charges.Load() == 0 {
		t.Fatal("setup: the first attempt did not reach the upstream")
	}
	var said bool
	for _, e := range p.audit.snapshot() {
		if e.Path == "/v1/charge" && e.Decision == "refuse" {
			t.Logf("audit: %s %s %q", e.Decision, e.Reason, e.Detail)
			if strings.Contains(e.Detail, "nothing was sent upstream") {
				t.Fatalf("the audit says %q but the upstream received the request with the real key %d time(s)", e.Detail, p.charges.Load())
			}
			said = said || e.Reason == ReasonPolicyChangedBeforeRetry
		}
	}
	if !said {
		t.Fatalf("no refuse line says the request was sent once and not retried: %+v", p.audit.snapshot())
	}
}
