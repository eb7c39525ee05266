package intercept

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestGate2H2TransportRetryInjectsAfterReload: a request that goes upstream over the
// HTTP/2 Transport (Te: trailers or gRPC to an HTTP/2 upstream, or any request to one that
// refuses HTTP/1.1) releases the reload gate from the WroteHeaders hook after its first
// attempt's HEADERS frame. net/http's HTTP/2 Transport retries a request by itself (up to
// 6 times, RoundTripOpt/shouldRetryRequest) when the upstream answers REFUSED_STREAM or a
// graceful GOAWAY below the stream: the same outgoing request, with the real value already
// in its header, is written again, with no regate. A reload (or Revoke) that returned in
// between does not stop it: the HTTP/1.1 retry paths (h1conn.roundTrip, roundTripH1) check
// regate, this one does not.
func TestGate2H2TransportRetryInjectsAfterReload(t *testing.T) {
	review2H2Retry(t, false)
}

// TestGate2H2TransportRetryInjectsAfterRevoke: the same with an unenroll (the user leaves
// IsEnrolled, then Revoke returns) instead of a reload.
func TestGate2H2TransportRetryInjectsAfterRevoke(t *testing.T) {
	review2H2Retry(t, true)
}

func review2H2Retry(t *testing.T, revoke bool) {
	e := newRTEnv(t)
	var unenrolled atomic.Bool
	e.srv.isEnrolled = func(uint32) bool { return !unenrolled.Load() }
	ln := e.h2UpstreamListener(t)

	const real = "real-secret-value-0123456789"
	gotFirst := make(chan struct{})
	reloaded := make(chan struct{})
	var withSecretAfterReload atomic.Int32
	go func() {
		c, err := acceptRawH2(ln)
		if err != nil {
			return
		}
		defer c.Close()
		wf := func(typ, flags byte, id uint32, payload []byte) { writeH2Frame(c, typ, flags, id, payload) }
		wf(frSettings, 0, 0, nil)
		dec := hpack.NewDecoder(65536, nil)
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		first := true
		for {
			var h [9]byte
			if _, err := io.ReadFull(c, h[:]); err != nil {
				return
			}
			n := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
			payload := make([]byte, n)
			if _, err := io.ReadFull(c, payload); err != nil {
				return
			}
			typ, flags, id := h[3], h[4], binary.BigEndian.Uint32(h[5:])&0x7fffffff
			switch typ {
			case frSettings:
				if flags&1 == 0 {
					wf(frSettings, 1, 0, nil)
				}
			case frHeaders:
				block := payload
				if flags&0x8 != 0 { // padded
					block = block[1 : len(block)-int(block[0])]
				}
				if flags&0x20 != 0 { // priority
					block = block[5:]
				}
				fields, _ := dec.DecodeFull(block)
				secret := false
				for _, hf := range fields {
					if hf.Name == "authorization" && strings.Contains(hf.Value, real) {
						secret = true
					}
				}
				if first {
					first = false
					if !secret {
						t.Errorf("first attempt did not carry the real value")
					}
					close(gotFirst)
					select {
					case <-reloaded:
					case <-time.After(5 * time.Second):
					}
					var code [4]byte
					binary.BigEndian.PutUint32(code[:], 0x7) // REFUSED_STREAM
					wf(frRST, 0, id, code[:])
					continue
				}
				if secret {
					withSecretAfterReload.Add(1)
				}
				hb.Reset()
				enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
				wf(frHeaders, flEndHeaders|flEndStream, id, hb.Bytes())
			}
		}
	}()

	origDst := netip.MustParseAddrPort("192.0.2.78:443")
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: origDst})
	dials := e.dialProbeThen(ln.Addr().String())
	c := e.h2Client(t, addr)
	done := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest("GET", "https://"+rawHost+"/v1/x", nil)
		req.Header.Set("Te", "trailers")
		req.Header.Set("Authorization", "Bearer "+rawPlaceholder)
		resp, err := c.Do(req)
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	select {
	case <-gotFirst:
	case <-time.After(5 * time.Second):
		t.Fatalf("the upstream never got the request (%d dials)", dials.Load())
	}
	// The bindings no longer bind rawHost: once this returns, nothing may be injected for it.
	var took time.Duration
	if revoke {
		unenrolled.Store(true)
		start := time.Now()
		e.srv.Revoke()
		took = time.Since(start)
	} else {
		unbound := strings.Replace(rtConfig, "host: "+rawHost, "host: other.example.com", 1)
		var ok bool
		took, ok = review2ReloadWithin(t, e.srv, unbound, 3*time.Second)
		if !ok {
			t.Fatalf("reload did not return")
		}
	}
	close(reloaded)
	status := <-done
	what := "SetPolicy (which unbinds " + rawHost + ")"
	if revoke {
		what = "Revoke (uid 1001 unenrolled)"
	}
	t.Logf("%s took %v; agent got %d; upstream got the real value %d more time(s) after it returned", what, took, status, withSecretAfterReload.Load())
	if withSecretAfterReload.Load() > 0 {
		t.Fatalf("the HTTP/2 Transport retried the injecting request after %s returned, and the upstream received the real secret again", what)
	}
}
