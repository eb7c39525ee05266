package intercept

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// HTTP/2 agents' requests go upstream over the pooled HTTP/1.1 connections the HTTP/1.1
// loop uses, written and read by the stream's own handler goroutine. Through net/http's
// HTTP/2 Transport every request crossed two more goroutines (the stream's writer and the
// connection's reader) and queued behind one connection's single writer. gRPC (and any
// request that asks for trailers) keeps the HTTP/2 Transport: its status travels in
// trailers, and servers of it speak only HTTP/2.

// errNeedsH2 tells RoundTrip to send the request over HTTP/2 after all.
var errNeedsH2 = errors.New("the upstream does not speak HTTP/1.1")

// noHTTP1 reports whether a dial failed because the upstream offers no HTTP/1.1: its TLS
// refused the protocol with the no_application_protocol alert. crypto/tls reports an alert
// from the peer as a net.OpError "remote error" around its own unexported alert type, so
// the alert is known by its text (TestH2AgentUpstreamProtocols notices if that changes).
func noHTTP1(err error) bool {
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return ae == 120
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "remote error" && oe.Err != nil && oe.Err.Error() == "tls: no application protocol"
}

func (p *upstreamPool) markH2Only(k upstreamKey) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.h2Only) >= maxTransports {
		clear(p.h2Only)
	}
	p.h2Only[k] = true
}

func (p *upstreamPool) isH2Only(k upstreamKey) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.h2Only[k]
}

// needsH2Upstream reports whether r must go upstream over HTTP/2.
func needsH2Upstream(r *http.Request) bool {
	return isGRPC(r.Header) || headerValuesContainToken(r.Header["Te"], "trailers")
}

// roundTripH1 sends r (ReverseProxy's outgoing request) over an HTTP/1.1 upstream
// connection. The connection returns to the pool when the response body has been read to
// its end and closed; one closed early, or whose framing ends with the connection, is
// closed. The request's context ending (the agent reset the stream) cuts the connection,
// so a blocked read returns.
// Each stream holds an upstream connection of its own while it runs; its slot of its user's
// connection budget (proxy.max_connections_per_uid) is held by serveHTTP.
func (p *upstreamPool) roundTripH1(r *http.Request, f inject.Facts) (*http.Response, error) {
	ctx := r.Context()
	var wroteHeaders func()
	if trace := httptrace.ContextClientTrace(ctx); trace != nil {
		wroteHeaders = trace.WroteHeaders
	}
	// The proxy sends the body without waiting; an agent that asked for 100-continue got
	// it from net/http's HTTP/2 server when the body was first read.
	delete(r.Header, "Expect")
	inj, _ := ctx.Value(injectedKey{}).(*injected)
	scope, probe := scopeOf(f, inj), !idempotent(r)
	for attempt := 0; ; attempt++ {
		release := func() {}
		if attempt > 0 && inj != nil {
			inj.retried = true // the first attempt was sent (recordNotSent)
		}
		if attempt > 0 && p.regate != nil && inj != nil {
			// A retry injects again: as in the HTTP/1.1 loop, only under the same policy.
			rel, ok := p.regate(inj)
			if !ok {
				return nil, errPolicyChanged
			}
			release = rel
		}
		var g *heldGate
		if inj != nil {
			// The gate is held by the request (released by the WroteHeaders hook) and, on
			// a retry, by release.
			held := release
			g = &heldGate{inj: inj, release: func() {
				if wroteHeaders != nil {
					wroteHeaders()
				}
				held()
			}}
		}
		up, reused, err := p.getH1(ctx, f, scope, probe, g)
		if g != nil {
			release = g.release
		}
		if err != nil {
			release()
			if noHTTP1(err) && attempt == 0 {
				// An upstream that speaks only HTTP/2 gets this and later requests over
				// the HTTP/2 Transport; nothing was sent.
				p.markH2Only(upstreamKey{sni: f.SNI, addr: f.OrigDst})
				return nil, errNeedsH2
			}
			return nil, err
		}
		stop := context.AfterFunc(ctx, func() { p.closeConn(up) })
		wrote := func() {
			if wroteHeaders != nil {
				wroteHeaders()
			}
			release()
		}
		streamed := r.Body != nil && r.Body != http.NoBody
		resp, pending, noAnswer, err := exchange(up, r, streamed, wrote, func() { r.Body.Close() })
		if err == nil {
			if resp.StatusCode == http.StatusSwitchingProtocols {
				// An HTTP/2 agent cannot have asked for a switch; what follows on that
				// connection is not HTTP.
				stop()
				p.closeConn(up)
				if pending != nil {
					pending.finish()
				}
				return nil, errors.New("101 without an upgrade request")
			}
			b := &h1RespBody{rc: resp.Body, p: p, up: up, reuse: reusableAfter(r, resp), stop: stop, pending: pending}
			if resp.Body == http.NoBody {
				b.sawEOF = true
			}
			resp.Body = b
			return resp, nil
		}
		stop()
		p.closeConn(up)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !noAnswer || !reused || attempt > 0 || !idempotent(r) || (r.Body != nil && r.Body != http.NoBody) {
			return nil, err
		}
	}
}

// h1RespBody is a response body read from a pooled HTTP/1.1 upstream connection.
type h1RespBody struct {
	rc     io.ReadCloser
	p      *upstreamPool
	up     *upConn
	reuse  bool // the response's framing lets the connection carry another
	sawEOF bool
	stop   func() bool
	closed bool
	// pending is the request body's write when it went on while the answer came; the
	// connection is in step only if it finished.
	pending *pendingWrite
}

func (b *h1RespBody) Read(q []byte) (int, error) {
	if b.closed {
		return 0, errors.New("read on a closed response body")
	}
	n, err := b.rc.Read(q)
	if err == io.EOF {
		b.sawEOF = true
	}
	return n, err
}

func (b *h1RespBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	wrote := b.pending == nil || b.pending.finish()
	// stop fails when the agent's stream ended meanwhile: the connection is being closed.
	if b.stop() && wrote && b.sawEOF && b.reuse {
		b.rc.Close()
		b.up.lastUsed = time.Now()
		b.p.putH1(b.up)
		return nil
	}
	// Closed first: the body's own Close would read the rest of an unfinished body.
	b.p.closeConn(b.up)
	b.rc.Close()
	return nil
}
