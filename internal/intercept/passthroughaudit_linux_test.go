package intercept

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// countingAuditor wraps the real in-process audit writer and counts Record calls in flight.
type countingAuditor struct {
	inner    audit.Auditor
	inFlight atomic.Int64
	peak     atomic.Int64
	done     atomic.Int64
}

func (a *countingAuditor) Record(ctx context.Context, events ...audit.Event) error {
	n := a.inFlight.Add(1)
	for {
		p := a.peak.Load()
		if n <= p || a.peak.CompareAndSwap(p, n) {
			break
		}
	}
	defer a.inFlight.Add(-1)
	defer a.done.Add(1)
	return a.inner.Record(ctx, events...)
}

// TestPassthroughAuditIsBoundedByTheUIDLimit: a spliced connection recorded its passthrough
// in a goroutine it did not wait for, which outlived the connection and its slot of
// proxy.max_connections_per_uid. An agent that opened and closed non-TLS connections in a
// loop piled up goroutines and events without bound (1217 at once with a limit of 4), in
// front of every other user's audit records. A connection now keeps its slot until its
// record is done.
func TestPassthroughAuditIsBoundedByTheUIDLimit(t *testing.T) {
	requireNetnsPrivileges(t)
	const limit = 4
	const conns = 600

	fw, err := audit.OpenFile(filepath.Join(t.TempDir(), "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	aud := &countingAuditor{inner: fw}
	s, err := NewServer(Options{
		Policy: &inject.Policy{}, CA: newTestCA(t), Secrets: nopSecrets{}, Auditor: aud,
		UpstreamTLS:    &tls.Config{},
		MaxConnsPerUID: limit,
		// The original destination refuses at once (as a closed port does).
		UpstreamDial: func(context.Context, string, string) (net.Conn, error) {
			return nil, errors.New("connection refused")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	lookupPeerUID = func(*net.TCPConn, netip.AddrPort) int64 { return 1000 }
	t.Cleanup(func() { lookupPeerUID = peerUID })

	ns, ln := redirectedListener(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go s.Serve(ctx, ln)

	// The agent: open a connection to some host on 443, send a plaintext byte, close.
	// Never more than one open at a time, far below the per-UID limit.
	start := time.Now()
	ns.do(t, func() error {
		for i := 0; i < conns; i++ {
			c, err := net.Dial("tcp4", "127.0.0.2:443")
			if err != nil {
				continue // over its limit: reset, as it should be
			}
			c.Write([]byte("x"))
			// wait for avpd to close it (passthrough dial failed), so the slot is free
			buf := make([]byte, 1)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			c.Read(buf)
			c.Close()
		}
		return nil
	})
	elapsed := time.Since(start)
	time.Sleep(50 * time.Millisecond)
	// Every agent connection is closed and has given its per-UID slot back...
	s.uidLimit.mu.Lock()
	open := s.uidLimit.open[1000]
	s.uidLimit.mu.Unlock()
	// ...but the goroutines recording their passthrough are still there.
	inFlight, goroutines := aud.inFlight.Load(), runtime.NumGoroutine()
	t.Logf("%d passthrough connections (one open at a time) in %v; per-UID open now %d (limit %d); audit Record goroutines still in flight: %d (peak %d, finished %d); process goroutines %d",
		conns, elapsed.Round(time.Millisecond), open, limit, inFlight, aud.peak.Load(), aud.done.Load(), goroutines)
	// Another user's injected request records its decision now: how long does it wait?
	t0 := time.Now()
	if err := s.record(context.Background(), audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionPassthrough, Reason: "other_user_probe"}); err != nil {
		t.Logf("probe record: %v", err)
	}
	t.Logf("one audit record for another user, made right after the agent's loop, waited %v", time.Since(t0).Round(time.Millisecond))
	if aud.peak.Load() > limit {
		t.Errorf("%d audit records were in flight at once for one user whose limit is %d connections", aud.peak.Load(), limit)
	}
	// Let the backlog drain so the test process ends cleanly.
	deadline := time.Now().Add(60 * time.Second)
	for aud.inFlight.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("backlog drained after %v more", time.Since(start)-elapsed)
}
