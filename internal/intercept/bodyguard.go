package intercept

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// bodyCheck is what an injecting request needs to check the method overrides its body
// names: the decision, and what it was made from. It is set only when an override could
// change the decision (inject.Decision.BodyOverrideMatters).
type bodyCheck struct {
	policy *inject.Policy
	facts  inject.Facts
	req    inject.Request
	d      inject.Decision
	// refused is set once the body named an override the bindings do not allow; the
	// request's error paths answer 403 for it. uncheckable says the body could not be
	// read at all (inject.UncheckableBody), which the refusal names instead.
	refused     atomic.Bool
	uncheckable atomic.Bool
}

// reason is the refusal's reason and the audit's detail.
func (c *bodyCheck) reason() (string, string) {
	if c.uncheckable.Load() {
		return inject.ReasonBodyNotCheckable, "the body cannot be checked for a method override (it has a Content-Encoding, two Content-Types, a charset other than UTF-8, or is a form some servers read as JSON) and the bindings allow only some methods; the request was cut off before its end"
	}
	return inject.ReasonMethodOverride, "the body names a method override the bindings do not allow; the request was cut off before its end"
}

// checksBody reports whether inj's request, with header h, has its body checked for
// overrides.
func (inj *injected) checksBody(h http.Header) bool {
	return inj != nil && inj.check != nil && inject.BodyMayOverride(h)
}

// refusedBody reports whether inj's request was cut off for an override in its body.
func (inj *injected) refusedBody() bool {
	return inj != nil && inj.check != nil && inj.check.refused.Load()
}

// bodyRefusal is the reason the agent gets for a request refusedBody reports.
func (inj *injected) bodyRefusal() string {
	r, _ := inj.check.reason()
	return r
}

// newBodyGuard returns a guard over src when inj's request injects and a body of type h
// could name an override that matters; nil otherwise.
func (s *Server) newBodyGuard(ctx context.Context, inj *injected, h http.Header, src io.ReadCloser) *bodyGuard {
	if inj == nil || inj.check == nil {
		return nil
	}
	c := inj.check
	g := &bodyGuard{src: src}
	g.scan = inject.NewBodyScanner(h, func(m string) bool {
		if m == inject.UncheckableBody {
			c.uncheckable.Store(true)
		}
		c.req.BodyMethods = append(c.req.BodyMethods, m)
		return c.policy.AllowsBodyOverride(c.facts, c.req, &c.d)
	})
	if g.scan == nil {
		return nil
	}
	g.onRefuse = func() {
		if c.refused.Swap(true) {
			return // recorded once
		}
		reason, detail := c.reason()
		s.countRefused(reason)
		inj.refuseAfterInject(ctx, reason, http.StatusForbidden, detail)
	}
	return g
}

// guardBody returns body read through a bodyGuard when one is needed (newBodyGuard), and
// body itself otherwise.
func (s *Server) guardBody(ctx context.Context, inj *injected, h http.Header, body io.ReadCloser) io.ReadCloser {
	if body == nil || body == http.NoBody {
		return body
	}
	if g := s.newBodyGuard(ctx, inj, h, body); g != nil {
		return g
	}
	return body
}

// maxWholeBody is the longest body that is read whole and checked before anything of its
// request is sent; a longer one is checked as it streams.
const maxWholeBody = 16 << 10

// prereadBody reads body to its end when it is at most maxWholeBody long (whole), or else
// the first maxWholeBody+1 bytes, which are to go first. A body declared longer is not
// read. An error reading it is the agent's (a body cut short, say): it is returned, and
// never taken for the body's end.
//
// A body whose first bytes settle it (inject.BodySettledBy: a gRPC stream with a JSON
// codec, say) is not waited for: what was read goes first, as of a long one.
func prereadBody(body io.Reader, declared int64, h http.Header) (buf []byte, whole bool, err error) {
	if declared > maxWholeBody {
		return nil, false, nil
	}
	mayFlow := inject.BodyMaySettle(h)
	n := maxWholeBody + 1
	if declared >= 0 {
		n = int(declared) + 1
	}
	buf = make([]byte, 0, n)
	for len(buf) < cap(buf) {
		k, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+k]
		if err == io.EOF {
			return buf, true, nil
		}
		if err != nil {
			return nil, false, err
		}
		if mayFlow && k > 0 && inject.BodySettledBy(buf) {
			return buf, false, nil
		}
	}
	return buf, false, nil
}

// readAheadTimeout bounds the read of a short body ahead: the request's head waits in
// memory meanwhile, and an agent that announces a body and never sends it would otherwise
// keep it there for as long as it keeps the connection. A variable for tests.
var readAheadTimeout = h1HeaderTimeout

// readAhead reads a short body ahead and checks it (prereadBody, wholeBodyAllowed) for p's
// request, for the HTTP/1.1 loop and the HTTP/2 handler alike. The agent may take its time
// to send the body, so the reload gate is let go meanwhile and taken again only while the
// policy that decided is in force; setDeadline bounds the read (readAheadTimeout) and is
// cleared after it. A non-zero status is the refusal the agent gets.
func (s *Server) readAhead(ctx context.Context, p *prepared, h http.Header, body io.Reader, declared int64, setDeadline func(time.Time) error) (pre []byte, whole bool, status int, reason string) {
	p.release()
	if err := setDeadline(time.Now().Add(readAheadTimeout)); err != nil {
		return nil, false, http.StatusInternalServerError, "internal_error"
	}
	pre, whole, err := prereadBody(body, declared, h)
	setDeadline(time.Time{})
	switch {
	case isTimeout(err):
		s.countRefused("request_body_timeout")
		return nil, false, http.StatusRequestTimeout, "request_body_timeout"
	case err != nil:
		return nil, false, http.StatusBadRequest, "bad_request_body"
	case whole && !s.wholeBodyAllowed(ctx, p.inj, h, pre):
		return nil, false, http.StatusForbidden, p.inj.bodyRefusal()
	}
	rel, ok := s.regate(p.inj)
	if !ok {
		p.inj.recordNotSent(ctx)
		return nil, false, http.StatusBadGateway, "upstream_unreachable"
	}
	p.release = rel
	return pre, whole, 0, ""
}

// prefixed reads pre, then the rest of a body; Close closes the body.
type prefixed struct {
	io.Reader
	io.Closer
}

func newPrefixed(pre []byte, rest io.ReadCloser) io.ReadCloser {
	return prefixed{io.MultiReader(bytes.NewReader(pre), rest), rest}
}

// wholeBodyAllowed checks a body that is already all in memory before any of it is sent:
// false (and the refusal recorded) when it names an override the bindings do not allow.
func (s *Server) wholeBodyAllowed(ctx context.Context, inj *injected, h http.Header, b []byte) bool {
	g := s.newBodyGuard(ctx, inj, h, nil)
	if g == nil {
		return true
	}
	if _, err := g.scan.Write(b); err != nil {
		g.refuse(err)
		return false
	}
	if err := g.scan.Close(); err != nil {
		g.refuse(err)
		return false
	}
	return true
}

// bodyGuard passes an injecting request's body upstream through an inject.BodyScanner. It
// always holds back the last byte it has read until the scan has seen the body's end: so
// when the scan refuses an override, even one the body's last bytes complete, the upstream
// has not received the whole request (a server parses a form only once it has all of it),
// and the read fails with inject.ErrBodyOverride, which cuts the request off.
type bodyGuard struct {
	src      io.ReadCloser
	scan     *inject.BodyScanner
	onRefuse func()

	held    byte
	hasHeld bool
	pass    bool // the scan settled: the rest passes through as it comes
	one     [1]byte
	srcDone bool // the source ended and the scan passed it
	err     error
	close   sync.Once
}

func (g *bodyGuard) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if g.err != nil {
			return 0, g.err
		}
		if g.pass && !g.hasHeld && !g.srcDone {
			return g.src.Read(p)
		}
		if g.srcDone {
			if g.hasHeld {
				p[0], g.hasHeld = g.held, false
				return 1, nil
			}
			return 0, io.EOF
		}
		// New bytes go after the held one; with room for one byte only, into g.one.
		var fresh []byte
		var err error
		off := 0
		if g.hasHeld {
			off = 1
		}
		if off < len(p) {
			var n int
			n, err = g.src.Read(p[off:])
			fresh = p[off : off+n]
		} else {
			var n int
			n, err = g.src.Read(g.one[:])
			fresh = g.one[:n]
		}
		if len(fresh) > 0 {
			if _, serr := g.scan.Write(fresh); serr != nil {
				return 0, g.refuse(serr)
			}
		}
		switch {
		case err == io.EOF:
			if cerr := g.scan.Close(); cerr != nil {
				return 0, g.refuse(cerr)
			}
			g.srcDone = true
		case err != nil:
			g.scan.Abort()
			g.err = err
			return 0, err
		}
		if g.scan.Settled() {
			g.pass = true
		}
		if off == 1 && len(p) == 1 {
			if len(fresh) == 1 {
				p[0], g.held = g.held, fresh[0]
				return 1, nil
			}
			continue // nothing new: the held byte waits (or goes, once srcDone)
		}
		if off == 1 {
			p[0] = g.held
			g.hasHeld = false
		}
		n := off + len(fresh)
		if g.srcDone || g.pass {
			if n > 0 {
				return n, nil
			}
			continue
		}
		if n == 0 {
			continue
		}
		g.held, g.hasHeld = p[n-1], true
		if n > 1 {
			return n - 1, nil
		}
	}
}

func (g *bodyGuard) refuse(err error) error {
	g.err = err
	g.onRefuse()
	return err
}

// Close stops the scan and closes the source.
func (g *bodyGuard) Close() error {
	g.close.Do(g.scan.Abort)
	return g.src.Close()
}
