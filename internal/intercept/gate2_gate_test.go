package intercept

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestGate2StreamedBodyHoldsReloadH1: an injecting request whose body streams (a type the
// override scan does not read, so no read ahead) is written upstream by exchange's writer
// goroutine through up.bw, a 16 KiB bufio.Writer. Request.Write puts the head in that
// buffer and then blocks reading the agent's body; the head is not flushed, so upWriter's
// onWrite (the gate's release) does not run until the buffer fills or the body ends. An
// agent that sends the head and a few body bytes and then waits keeps the reload gate
// (read side) for as long as it likes: SetPolicy and Revoke wait, and behind the waiting
// writer every other user's request stalls in prepare.
func TestGate2StreamedBodyHoldsReloadH1(t *testing.T) {
	p := newH1Pair(t)
	io.WriteString(p.agent, "POST /v1/sink HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n0123456789")
	time.Sleep(200 * time.Millisecond) // decided, dialled, head written into up.bw
	reloadMustNotWait(t, p)
	io.WriteString(p.agent, strings.Repeat("x", 90))
}

// TestGate2StreamedBodyHoldsReloadH2: the same through the HTTP/2 handler (roundTripH1).
func TestGate2StreamedBodyHoldsReloadH2(t *testing.T) {
	p := newH1Pair(t)
	pr, pw := io.Pipe()
	r, _ := http.NewRequest("POST", "https://api.openai.com/v1/sink", pr)
	r.ContentLength = 100
	r.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	r.Header.Set("Content-Type", "application/octet-stream")
	go func() {
		resp, err := p.h2Client(t).Do(r)
		if err == nil {
			resp.Body.Close()
		}
	}()
	io.WriteString(pw, "0123456789")
	time.Sleep(200 * time.Millisecond)
	reloadMustNotWait(t, p)
	io.WriteString(pw, strings.Repeat("x", 90))
	pw.Close()
}

// tarpitListener accepts TCP and never answers; it returns its address.
func review2Tarpit(t *testing.T) (addr string, accepted *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			n.Add(1)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String(), &n
}

// reloadWithin reloads srv to cfgText and reports how long it took, giving up after d.
func review2ReloadWithin(t *testing.T, srv *Server, cfgText string, d time.Duration) (time.Duration, bool) {
	cfg, err := config.Parse("bindings.yaml", []byte(cfgText))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan time.Duration, 1)
	start := time.Now()
	go func() {
		srv.SetPolicy(inject.NewPolicy(cfg))
		done <- time.Since(start)
	}()
	select {
	case took := <-done:
		return took, true
	case <-time.After(d):
		return d, false
	}
}

// TestGate2H2OnlyFallbackDialHoldsReload: 50506b9 makes the HTTP/2 fallback of an
// injecting HTTP/2 request (the upstream refused HTTP/1.1 with no_application_protocol)
// take the reload gate again (regate) BEFORE p.transport(k).RoundTrip, which dials the
// original destination again (dialH2) while holding it. The original destination is the
// agent's choice: one that refuses HTTP/1.1 on the first connection and then accepts the
// second and never answers its TLS handshake keeps the gate held (dialH2's handshake has
// no timeout of its own; it lasts as long as the stream). A reload then waits, and behind
// it every other user's request (TestDoSReloadNotStalledByAgentDestination is the same
// property for the HTTP/1.1 dial, which getH1 makes without the gate).
func TestGate2H2OnlyFallbackDialHoldsReload(t *testing.T) {
	p := newH1Pair(t, "h2-strict")
	tp, accepted := review2Tarpit(t)
	inner := p.srv.upstream.dial
	var dials atomic.Int32
	p.srv.upstream.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if dials.Add(1) == 1 {
			return inner(ctx, network, addr) // the HTTP/1.1 attempt: refused with alert 120
		}
		var d net.Dialer
		return d.DialContext(ctx, network, tp) // the HTTP/2 Transport's dial: a tarpit
	}
	c := p.h2Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://api.openai.com/v1/models", nil)
		req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		if resp, err := c.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	for deadline := time.Now().Add(5 * time.Second); accepted.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the fallback never reached the tarpit (%d dials)", dials.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	wait := 3 * time.Second
	if v, err := time.ParseDuration(os.Getenv("REVIEW2_WAIT")); err == nil {
		wait = v // 25s shows the hold outlasts dialTimeout+handshakeTimeout
	}
	took, ok := review2ReloadWithin(t, p.srv, h1BenchConfig, wait)
	if !ok {
		// While the reload waits, another request (a new agent connection, same upstream
		// pair, nothing to do with the tarpit) stalls in prepare's RLock.
		other := make(chan int, 1)
		go func() {
			c2 := p.h2Client(t)
			req, _ := http.NewRequest("GET", "https://api.openai.com/v1/models", nil)
			if resp, err := c2.Do(req); err == nil {
				resp.Body.Close()
				other <- resp.StatusCode
			} else {
				other <- -1
			}
		}()
		select {
		case code := <-other:
			t.Logf("another request (no placeholder) answered %d while the reload waited", code)
		case <-time.After(2 * time.Second):
			t.Logf("another request (no placeholder, verbatim) got no answer within 2 s while the reload waited")
		}
	}
	cancel() // the agent gives up: the hold goes, the reload finishes
	if !ok {
		t.Fatalf("a reload waited %v (and is still waiting) for an HTTP/2 agent's injecting request whose HTTP/2 fallback dial went to a destination that never answers", took)
	}
}

// TestGate2H2TransportDialHoldsReload: the same for a request that wants HTTP/2 upstream
// (Te: trailers, gRPC) once speaksH2 knows the upstream speaks it. speaksH2's probe runs
// before the decision (TestDoSReloadNotStalledByH2Probe), but it closes its connection, so
// the HTTP/2 Transport dials again (dialH2) from RoundTrip, under the gate prepare took and
// holds until WroteHeaders. A destination that answers the probe with h2 and tarpits the
// next connection holds every reload.
func TestGate2H2TransportDialHoldsReload(t *testing.T) {
	e := newRTEnv(t)
	origDst := netip.MustParseAddrPort("192.0.2.77:443")
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: origDst})
	inner := e.srv.upstream.dial
	var dials atomic.Int32
	e.srv.upstream.dial = func(ctx context.Context, network, a string) (net.Conn, error) {
		if dials.Add(1) == 1 {
			return inner(ctx, network, "127.0.0.1:443") // the probe: the real upstream (h2)
		}
		return inner(ctx, network, tarpitAddr.String())
	}
	c := e.h2Client(t, addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go injectingTrailersStream(ctx, c)
	for deadline := time.Now().Add(5 * time.Second); e.tarpits.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the stream never reached the tarpit (%d dials)", dials.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	took, ok := review2ReloadWithin(t, e.srv, rtConfig, 3*time.Second)
	cancel()
	if !ok {
		t.Fatalf("a reload waited %v (and is still waiting) for an injecting HTTP/2 request whose HTTP/2 Transport dial went to a destination that answered the probe and then never answers", took)
	}
}
