package intercept

import (
	"context"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// TestGate2PanicInDialLeaksGate (ARTIFICIAL trigger: the dial is made to panic). getH1
// takes the gate again in a deferred func, which also runs while a panic unwinds out of
// dialH1; the new hold is stored only in g.release, which nobody calls, and serve's
// recover (h1.go) and p.finish release only the old hold. The gate's read side then stays
// held for good: every later reload and unenroll blocks forever, and every request behind
// them.
func TestGate2PanicInDialLeaksGate(t *testing.T) {
	p := newH1Pair(t)
	var once atomic.Bool
	inner := p.srv.upstream.dial
	p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if once.CompareAndSwap(false, true) {
			panic("review2: a bug in the dial path")
		}
		return inner(ctx, network, addr)
	}
	io.WriteString(p.agent, h1BenchRequest)
	p.agent.SetReadDeadline(time.Now().Add(2 * time.Second))
	io.Copy(io.Discard, p.br) // the connection is closed by serve's recover
	if took, ok := review2ReloadWithin(t, p.srv, h1BenchConfig, 3*time.Second); !ok {
		t.Fatalf("after a panic recovered in serveH1 during an injecting request's dial, a reload waited %v and never returned: the gate's re-take in getH1's defer leaked", took)
	}
}
