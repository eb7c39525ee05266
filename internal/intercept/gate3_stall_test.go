package intercept

import (
	"context"
	"encoding/binary"
	"io"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestGate3H2SharedConnWriteHoldsGate: h2Gate takes the reload gate in GotConn, which the
// HTTP/2 Transport calls before the attempt's writer goroutine waits for the connection's
// new-request lock (reqHeaderMu) and write lock (wmu, encodeAndWriteHeaders). Both are held by
// whichever stream is writing to the shared upstream connection. An upstream connection
// that stops reading (its TCP window closed: a stalled peer or a black-holed path) while
// another stream (here: the same agent's own non-injecting trailers POST) writes its body
// leaves that write blocked under wmu with no deadline; the injecting request then holds the
// gate indefinitely, SetPolicy/Revoke wait, and behind the waiting writer every other request
// stalls in prepare.
func TestGate3H2SharedConnWriteHoldsGate(t *testing.T) {
	old := h2UpstreamWriteTimeout
	h2UpstreamWriteTimeout = time.Second // the bound on the hold, shortened for the test
	t.Cleanup(func() { h2UpstreamWriteTimeout = old })
	e := newRTEnv(t)
	ln := e.h2UpstreamListener(t)
	stop := make(chan struct{})
	var stopOnce sync.Once
	release := func() { stopOnce.Do(func() { close(stop) }) }
	t.Cleanup(release)
	var headers atomic.Int32
	go func() {
		c, err := acceptRawH2(ln)
		if err != nil {
			return
		}
		defer c.Close()
		wf := func(typ, flags byte, id uint32, payload []byte) { writeH2Frame(c, typ, flags, id, payload) }
		// Large windows: flow control does not stop the client, TCP does.
		var st [6]byte
		binary.BigEndian.PutUint16(st[:], 0x4)
		binary.BigEndian.PutUint32(st[2:], 0x7fffffff)
		wf(frSettings, 0, 0, st[:])
		var wu [4]byte
		binary.BigEndian.PutUint32(wu[:], 0x7fffffff-65535)
		wf(frWindowUpdate, 0, 0, wu[:])
		for {
			var h [9]byte
			if _, err := io.ReadFull(c, h[:]); err != nil {
				return
			}
			n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
			if _, err := io.ReadFull(c, make([]byte, n)); err != nil {
				return
			}
			switch h[3] {
			case frSettings:
				if h[4]&1 == 0 {
					wf(frSettings, 1, 0, nil)
				}
			case frHeaders:
				headers.Add(1)
				// The first stream's HEADERS: from now on nothing is read (the peer stalls).
				<-stop
				return
			}
		}
	}()

	origDst := netip.MustParseAddrPort("192.0.2.79:443")
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: origDst})
	dials := e.dialProbeThen(ln.Addr().String())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var regates, held atomic.Int32
	innerRegate := e.srv.upstream.regate
	e.srv.upstream.regate = func(inj *injected) (func(), bool) {
		regates.Add(1)
		rel, ok := innerRegate(inj)
		if !ok {
			return rel, ok
		}
		held.Add(1)
		return func() { held.Add(-1); rel() }, true
	}

	// Stream A: no placeholder, Te: trailers, a body that keeps coming.
	cA := e.h2Client(t, addr)
	var sent atomic.Int64
	go func() {
		pr, pw := io.Pipe()
		go func() {
			buf := make([]byte, 64<<10)
			for ctx.Err() == nil {
				if _, err := pw.Write(buf); err != nil {
					return
				}
				sent.Add(int64(len(buf)))
			}
			pw.Close()
		}()
		req, _ := http.NewRequestWithContext(ctx, "POST", "https://"+rawHost+"/v1/upload", pr)
		req.Header.Set("Te", "trailers")
		req.Header.Set("Content-Type", "application/octet-stream")
		if resp, err := cA.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	// Wait until the agent's writes stop advancing (the upstream socket is full).
	last := int64(-1)
	for deadline := time.Now().Add(10 * time.Second); ; {
		time.Sleep(300 * time.Millisecond)
		if s := sent.Load(); s == last && s > 0 {
			break
		} else {
			last = s
		}
		if time.Now().After(deadline) {
			t.Fatalf("the body never stalled (%d bytes sent, %d dials)", sent.Load(), dials.Load())
		}
	}
	t.Logf("stream A stalled after %d body bytes", last)

	// Stream B: injecting, Te: trailers, from a new agent connection; goes to the same
	// upstream connection.
	cB := e.h2Client(t, addr)
	go injectingTrailersStream(ctx, cB)
	time.Sleep(500 * time.Millisecond)

	took, ok := review2ReloadWithin(t, e.srv, rtConfig, 3*time.Second)
	if !ok {
		buf := make([]byte, 1<<22)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "encodeAndWriteHeaders") || strings.Contains(g, "http2bufferedWriter") || strings.Contains(g, "SetPolicy") {
				t.Logf("%s", g)
			}
		}
		t.Logf("regate calls %d, holds not released %d", regates.Load(), held.Load())
		other := make(chan string, 1)
		go func() {
			c2 := e.h2Client(t, addr)
			req, _ := http.NewRequest("GET", "https://"+rawHost+"/v1/x", nil) // verbatim, HTTP/1.1 upstream
			c2.Timeout = 2 * time.Second
			if resp, err := c2.Do(req); err == nil {
				resp.Body.Close()
				other <- resp.Status
			} else {
				other <- err.Error()
			}
		}()
		t.Logf("a request with no placeholder meanwhile: %s", <-other)
	}
	cancel()
	release()
	if !ok {
		t.Fatalf("SetPolicy waited %v (and was still waiting) for an injecting request whose attempt holds the gate from GotConn while another stream's write to the shared, stalled upstream connection holds its write lock (upstream saw %d HEADERS)", took, headers.Load())
	}
}

var _ = strings.Repeat
