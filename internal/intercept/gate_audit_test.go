package intercept

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestRevokedWhileDiallingIsAudited: an injecting request whose policy is replaced while it
// dials its upstream (a reload that unbinds the host, an unenroll) is not sent, and gets
// 502. Its inject line was already durable, so the trail read "inject" for a request that
// never went upstream; a refuse line for the same request now follows it.
func TestRevokedWhileDiallingIsAudited(t *testing.T) {
	for _, agent := range []string{"h1", "h2"} {
		t.Run(agent, func(t *testing.T) {
			p := newH1Pair(t)
			cfg, err := config.Parse("bindings.yaml", []byte(strings.Replace(h1BenchConfig, "host: api.openai.com", "host: other.example.com", 1)))
			if err != nil {
				t.Fatal(err)
			}
			inner := p.srv.upstream.dial
			p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
				// The request waits for this dial without the gate: the reload goes ahead.
				p.srv.SetPolicy(inject.NewPolicy(cfg))
				return inner(ctx, network, addr)
			}
			var code int
			if agent == "h1" {
				code, _ = p.do(t, h1BenchRequest)
			} else {
				resp, _ := h2Get(t, p.h2Client(t), "GET", "/v1/models")
				code = resp.StatusCode
			}
			if code != 502 {
				t.Fatalf("status %d, want 502 (the policy changed before anything was sent)", code)
			}
			var inj, refused bool
			for _, e := range p.audit.snapshot() {
				switch {
				case e.Decision == "inject" && e.Path == "/v1/models":
					inj = true
				case inj && e.Decision == "refuse" && e.Reason == "policy_changed" && e.Path == "/v1/models" && e.Status == 502:
					refused = true
				}
			}
			if !inj || !refused {
				t.Fatalf("audit %+v: want the inject line followed by a refuse (policy_changed, 502) for the same request", p.audit.snapshot())
			}
		})
	}
}
