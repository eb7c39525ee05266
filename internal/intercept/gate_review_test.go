package intercept

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestGateH2OnlyFallbackInjectsAfterReload: an HTTP/2 agent's injecting request to an
// upstream that refuses HTTP/1.1 is first tried over the HTTP/1.1 pool (getH1 dials
// without the gate and takes it again), fails with no_application_protocol, and
// roundTripH1 then releases BOTH holds (the original one through the heldGate, the new one
// through release()) before returning errNeedsH2. RoundTrip then sends the already
// injected request over the HTTP/2 Transport with no hold on the reload gate: a reload
// that returns while the Transport dials does not stop the injection.
func TestGateH2OnlyFallbackInjectsAfterReload(t *testing.T) {
	p := newH1Pair(t, "h2-strict")
	c := p.h2Client(t)

	// A policy that no longer binds api.openai.com.
	cfg, err := config.Parse("bindings.yaml", []byte(strings.Replace(h1BenchConfig, "host: api.openai.com", "host: other.example.com", 1)))
	if err != nil {
		t.Fatal(err)
	}
	var dials atomic.Int32
	var reloadReturnedDuringDial atomic.Bool
	inner := p.srv.upstream.dial
	p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if dials.Add(1) == 2 {
			// The HTTP/2 Transport's dial, after the HTTP/1.1 attempt was refused. The
			// injected request has not been written yet: a reload must wait for it.
			done := make(chan struct{})
			go func() {
				p.srv.SetPolicy(inject.NewPolicy(cfg))
				close(done)
			}()
			select {
			case <-done:
				reloadReturnedDuringDial.Store(true)
			case <-time.After(time.Second):
			}
		}
		return inner(ctx, network, addr)
	}
	resp, _ := h2Get(t, c, "GET", "/v1/models")
	t.Logf("status %d over %q upstream, %d dials", resp.StatusCode, resp.Header.Get("X-Upstream-Proto"), dials.Load())
	if reloadReturnedDuringDial.Load() && resp.StatusCode == 200 {
		t.Fatalf("SetPolicy (which unbinds api.openai.com) returned while the request was dialling, and the upstream then received the real secret (status %d over %s): injected after the reload returned",
			resp.StatusCode, resp.Header.Get("X-Upstream-Proto"))
	}
}

// TestGateRevokeFailsOtherUsersRequests: Revoke (an unenroll of one UID) replaces the
// policy for everybody, so every other user's injecting request that is dialling its
// upstream at that moment fails with 502 upstream_unreachable, although its user is still
// enrolled and the bindings did not change. Same for any reload (SetPolicy).
func TestGateRevokeFailsOtherUsersRequests(t *testing.T) {
	p := newH1Pair(t) // uid 1000, still enrolled (no IsEnrolled: everyone is)
	inner := p.srv.upstream.dial
	var once atomic.Bool
	p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if once.CompareAndSwap(false, true) {
			p.srv.Revoke() // another uid is unenrolled meanwhile
		}
		return inner(ctx, network, addr)
	}
	code, body := p.do(t, h1BenchRequest)
	if code != 200 {
		t.Fatalf("uid 1000 (enrolled, bindings unchanged) got %d %q because another user was unenrolled while its upstream was being dialled", code, strings.TrimSpace(body))
	}
}
