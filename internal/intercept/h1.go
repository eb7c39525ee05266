package intercept

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/textproto"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"crypto/tls"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// The HTTP/1.1 path. net/http's server, ReverseProxy and Transport hand every request
// across about six goroutines (the server's background reader, the transport's read and
// write loops, the pool); on a small machine each hand-off is a futex wake and a scheduler
// pass, and together they cost more than the TLS and the copying. This loop serves one
// terminated agent connection in one goroutine: it parses with net/http's parser, decides,
// writes the request on an upstream connection it holds for the agent connection's lifetime
// and copies the response back, flushing only when the upstream has nothing more buffered.
// HTTP/2 agents are still served by net/http's server and ReverseProxy; their requests
// use the same upstream pool (upstream_h2agent.go).

const (
	// maxRequestHeaderBytes bounds a request head (HTTP/1.1) or header list (HTTP/2). An
	// API request's head is a few KiB; each open connection or stream may hold this much
	// while it waits, so 1 MiB (net/http's default) let one user's connections hold tens
	// of GiB within its limit. nginx, Envoy and HAProxy allow 8-64 KiB.
	maxRequestHeaderBytes = 64 << 10
	h1MaxHeaderBytes      = maxRequestHeaderBytes
	// An upstream's response head may be larger (cookies, CSP); net/http's Transport allows
	// 10 MB by default.
	h1MaxResponseHeaderBytes = 10 << 20
	h1HeaderTimeout          = 30 * time.Second
	h1IdleTimeout            = 2 * time.Minute
	// An upstream connection idle for longer than this is probed before reuse: the server
	// may have closed it.
	upstreamProbeAfter = time.Second
	max1xxResponses    = 10
)

// limitReader caps how much the request parser may read; n is reset between the header and
// the body, as net/http's server does.
type limitReader struct {
	r io.Reader
	n int64
}

var errHeaderTooLarge = errors.New("request header too large")

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errHeaderTooLarge
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

type h1conn struct {
	s     *Server
	agent *tls.Conn
	lr    limitReader
	br    *bufio.Reader
	bw    *bufio.Writer
	f     inject.Facts
	ctx   context.Context
	up    *upConn // held while requests follow each other
	idle  atomic.Bool
	// replay is the current request's body when it was read whole with the headers.
	replay *bytes.Reader
	// body is the current request's body as sent upstream, when it is streamed.
	body *agentBody
	// pending is the current request's body when its write went on while the answer came
	// (exchange); serve finishes it once the answer is relayed.
	pending *pendingWrite
	// expectContinue is set while the current request's agent waits for 100 Continue
	// before it sends its body.
	expectContinue bool
}

// serveH1 runs the request loop of one terminated HTTP/1.x agent connection.
func (s *Server) serveH1(tc *tls.Conn, f inject.Facts) {
	hc := &h1conn{s: s, agent: tc, f: f}
	hc.ctx = context.WithValue(context.Background(), factsKey{}, &connFacts{Facts: f})
	hc.lr = limitReader{r: tc, n: math.MaxInt64}
	hc.br = bufio.NewReaderSize(&hc.lr, 4<<10)
	hc.bw = bufio.NewWriterSize(tc, 4<<10)
	s.trackH1(hc, true)
	defer func() {
		if r := recover(); r != nil {
			// As net/http does for a handler: one connection's bug ends that connection, not
			// the proxy. The upstream connection's state is unknown, so it is not pooled.
			s.logf("panic serving %s (sni %q), connection closed: %.200v\n%s", hc.f.OrigDst, hc.f.SNI, r, debug.Stack())
			if hc.up != nil {
				s.upstream.closeConn(hc.up)
				hc.up = nil
			}
		}
		s.trackH1(hc, false)
		if hc.up != nil {
			s.upstream.putH1(hc.up)
			hc.up = nil
		}
		tc.Close()
	}()
	for {
		hc.idle.Store(true)
		if s.isClosing() {
			return
		}
		if hc.up != nil && hc.br.Buffered() == 0 {
			// Waiting for the agent: the upstream connection goes back to the pool, so
			// idle agent connections do not each hold one (10,000 idle agents held
			// 10,000 upstream connections).
			s.upstream.putH1(hc.up)
			hc.up = nil
		}
		tc.SetReadDeadline(time.Now().Add(h1IdleTimeout))
		// Checked again after setting the deadline: Shutdown sets closing before it cuts
		// idle connections' deadlines short, so one of the two always wins.
		if s.isClosing() {
			return
		}
		if _, err := hc.br.Peek(1); err != nil {
			return
		}
		hc.idle.Store(false)
		tc.SetReadDeadline(time.Now().Add(h1HeaderTimeout))
		hc.lr.n = h1MaxHeaderBytes
		req, err := http.ReadRequest(hc.br)
		tooLarge := hc.lr.n <= 0
		hc.lr.n = math.MaxInt64
		tc.SetReadDeadline(time.Time{})
		if err != nil {
			if tooLarge {
				hc.writeRefusal(http.StatusRequestHeaderFieldsTooLarge, "request_header_too_large", true)
				// The agent may still be sending the rest of its head: closing with it
				// unread would reset the connection before the agent read the 431.
				hc.lingerClose()
			} else if !errors.Is(err, io.EOF) && !isTimeout(err) {
				hc.writeRefusal(http.StatusBadRequest, "bad_request", true)
			}
			return
		}
		if reason := checkH1Request(req); reason != "" {
			s.stats.requests.Add(1)
			s.countRefused(reason)
			hc.writeRefusal(http.StatusBadRequest, reason, true)
			return
		}
		if !hc.serve(req) {
			return
		}
	}
}

// checkH1Request applies the checks net/http's server makes after parsing.
func checkH1Request(req *http.Request) string {
	if req.ProtoMajor != 1 {
		return "unsupported_protocol_version"
	}
	// http.ReadRequest has already moved the Host header (the first one, or the host of an
	// absolute request-target) to req.Host; only that one value is decided on and sent.
	if req.ProtoAtLeast(1, 1) && req.Host == "" && req.Method != http.MethodConnect {
		return "missing_host_header"
	}
	if !validHostHeader(req.Host) {
		return "malformed_host_header"
	}
	for k, vv := range req.Header {
		if !validHeaderFieldName(k) {
			return "invalid_header_name"
		}
		for _, v := range vv {
			if !validHeaderFieldValue(v) {
				return "invalid_header_value"
			}
		}
	}
	return ""
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}

// serve handles one request and reports whether the connection can take another.
func (hc *h1conn) serve(req *http.Request) (keep bool) {
	s := hc.s
	s.stats.requests.Add(1)
	defer req.Body.Close()
	if req.Method == http.MethodConnect {
		s.countRefused("connect_not_allowed")
		hc.writeRefusal(http.StatusMethodNotAllowed, "connect_not_allowed", true)
		return false
	}
	stripH2CUpgrade(req.Header)
	hc.expectContinue = false
	if ex, ok := req.Header["Expect"]; ok {
		// The proxy answers 100-continue itself when it starts reading the body; the
		// upstream gets the body without waiting. Other expectations are not supported.
		if len(ex) != 1 || !strings.EqualFold(ex[0], "100-continue") {
			s.countRefused("expectation_failed")
			hc.writeRefusal(http.StatusExpectationFailed, "expectation_failed", true)
			return false
		}
		delete(req.Header, "Expect")
		hc.expectContinue = req.Body != http.NoBody
	}
	upgrade, trailers := forwarded(req.Header)
	p := s.prepare(hc.ctx, hc.f, req.Method, req.Host, req.URL, req.Header)
	defer p.finish()
	// A body not read to its end would be taken for the next request.
	keepAlive := !req.Close && req.Body == http.NoBody
	if p.status != 0 {
		return hc.writeRefusal(p.status, p.reason, !keepAlive) && keepAlive
	}

	// A _method in the body (bodyguard.go): a short body is read whole and checked before
	// anything is sent; a longer one as it goes, and cut off before its end when refused.
	checkBody := req.Body != http.NoBody && p.inj.checksBody(req.Header)
	var pre []byte
	whole := false
	if checkBody && req.ContentLength <= maxWholeBody {
		if hc.expectContinue {
			// The agent waits for this before it sends the body read ahead.
			hc.expectContinue = false
			if !hc.writeContinue() {
				return false
			}
		}
		var status int
		var reason string
		if pre, whole, status, reason = s.readAhead(hc.ctx, &p, req.Header, req.Body, req.ContentLength, hc.agent.SetReadDeadline); status != 0 {
			hc.writeRefusal(status, reason, true)
			return false
		}
	}
	out := hc.outbound(req, p.inj, upgrade, trailers, pre, whole)
	if checkBody && !whole {
		out.Body = s.guardBody(hc.ctx, p.inj, req.Header, out.Body)
	}
	hc.pending = nil
	resp, err := hc.roundTrip(out, &p)
	pw := hc.pending
	if pw != nil {
		hc.pending = nil
		defer func() {
			// An upstream that answered before it read the whole body may never read the
			// rest: the write is stopped once the answer is relayed, and then neither
			// connection is in step any more.
			if !pw.finish() {
				hc.dropUpstream()
				hc.lingerClose()
				keep = false
			}
		}()
	}
	if hc.replay != nil {
		// Move the parser past the body that went out from its buffer.
		io.Copy(io.Discard, req.Body)
		hc.replay = nil
	}
	if err != nil {
		switch {
		case p.inj.refusedBody():
			// Recorded and counted by the guard; the upstream has part of a body at most.
			hc.dropUpstream()
			hc.writeRefusal(http.StatusForbidden, p.inj.bodyRefusal(), true)
			hc.lingerClose() // the agent may still be sending the rest
			return false
		case hc.body != nil && hc.body.err != nil:
			hc.dropUpstream() // it has part of a body
			hc.writeRefusal(http.StatusBadRequest, "bad_request_body", true)
		case errors.Is(err, errPolicyChanged):
			p.inj.recordNotSent(hc.ctx)
			hc.writeRefusal(http.StatusBadGateway, "upstream_unreachable", true)
		default:
			hc.badGateway(p.inj.errText(err))
		}
		if hc.body != nil && hc.body.cut.Load() {
			// The agent may still be sending the body avpd stopped reading.
			hc.lingerClose()
		}
		return false
	}
	defer resp.Body.Close()
	// Decided before scrubbing, which drops the length of what it rewrites: only a body
	// delimited by the upstream closing the connection leaves it unusable.
	upReusable := reusableAfter(req, resp)
	if err := p.inj.scrubResponse(resp); err != nil {
		return hc.badGateway("read response: " + p.inj.errText(err))
	}
	if resp.Uncompressed {
		// Decoded for the scrubber: the decoder may stop short of the upstream's framing,
		// so the connection is not trusted for another response.
		upReusable = false
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if upgrade == "" {
			// A switch nobody asked for: what follows on that connection is not HTTP.
			return hc.badGateway("101 without an upgrade request")
		}
		if pw != nil && !pw.finish() {
			// The body was not all sent before the switch: the bytes that follow would mix.
			return hc.badGateway("101 before the request body was sent")
		}
		if p.inj != nil && len(resp.Header["Sec-Websocket-Extensions"]) > 0 {
			// Not offered (injectHeaders drops the offer), and under compression an echo
			// would pass the scrubber.
			return hc.badGateway("101 with WebSocket extensions that were not offered")
		}
		hc.switchProtocols(resp, p.inj)
		return false
	}
	// A body still going out when the answer starts is likely never to be read: the agent
	// is told the connection ends.
	keepAlive = !req.Close && (pw == nil || !pw.writing(5*time.Millisecond))
	ok, complete := hc.writeResponse(req, resp, keepAlive, p.inj)
	if !upReusable || !complete {
		hc.dropUpstream()
	}
	return ok && keepAlive
}

// badGateway logs an upstream failure (msg already free of real values), gives up the
// upstream connection and answers 502; the agent's connection ends.
func (hc *h1conn) badGateway(msg string) bool {
	hc.s.logAgent("upstream", hc.f.UID, "upstream %s (sni %q): %s", hc.f.OrigDst, hc.f.SNI, msg)
	hc.dropUpstream()
	hc.writeRefusal(http.StatusBadGateway, "upstream_unreachable", true)
	return false
}

// forwarded reduces the agent's headers to those that may be forwarded: hop-by-hop and
// forwarding headers go, before the decision, so that what is decided on (and audited) is
// what reaches the upstream. A header the agent lists in Connection is hop-by-hop too. The
// upgrade asked for, and whether trailers are accepted, are returned to be sent again.
func forwarded(h http.Header) (upgrade string, trailers bool) {
	if headerValuesContainToken(h["Connection"], "Upgrade") {
		upgrade = h.Get("Upgrade")
		if !asciiPrintable(upgrade) {
			upgrade = ""
		}
	}
	trailers = headerValuesContainToken(h["Te"], "trailers")
	removeHopByHop(h)
	for _, k := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		delete(h, k)
	}
	return upgrade, trailers
}

// outbound builds the request sent upstream: the agent's headers (already reduced by
// forwarded), with the real values injected.
//
// pre is what was read of the body ahead (prereadBody): all of it when whole, else its first
// bytes.
func (hc *h1conn) outbound(req *http.Request, inj *injected, upgrade string, trailers bool, pre []byte, whole bool) *http.Request {
	h := req.Header
	if upgrade != "" {
		h["Connection"] = []string{"Upgrade"}
		h["Upgrade"] = []string{upgrade}
	}
	if trailers {
		h["Te"] = []string{"trailers"}
	}
	if _, ok := h["User-Agent"]; !ok {
		// Keep net/http from adding its own.
		h["User-Agent"] = []string{""}
	}
	if inj != nil {
		inj.injectHeaders(h)
	}
	var body io.ReadCloser = http.NoBody
	hc.body = nil
	if req.Body != http.NoBody {
		hc.body = &agentBody{ReadCloser: req.Body}
		body = hc.body
	}
	hc.replay = nil
	switch {
	case whole:
		hc.replay = bytes.NewReader(pre)
		body = io.NopCloser(hc.replay)
	case pre != nil:
		body = newPrefixed(pre, hc.body)
	// A small body already read with the headers goes out in the same write, and can be
	// replayed if a reused upstream connection turns out to be closed. The agent's body is
	// read past it (drainReplayed) once the request is sent.
	case req.ContentLength > 0 && req.ContentLength <= int64(hc.br.Buffered()):
		if b, err := hc.br.Peek(int(req.ContentLength)); err == nil {
			hc.replay = bytes.NewReader(b)
			body = io.NopCloser(hc.replay)
		}
	}
	u := *req.URL
	u.Scheme, u.Host = "", ""
	host := req.Host
	if inj != nil {
		host = upstreamAuthority(hc.f)
	}
	return &http.Request{
		Method: req.Method, URL: &u, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Body: body, ContentLength: req.ContentLength, Host: host,
	}
}

// agentBody remembers an error reading the agent's request body (net/http's Request.Write
// does not let it be told apart), so a broken upload is answered as the agent's fault (400),
// not the upstream's.
type agentBody struct {
	io.ReadCloser
	err error
	// cut is set when the proxy itself stopped the read (the upstream had answered): the
	// error that follows is not the agent's.
	cut atomic.Bool
}

func (b *agentBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && !b.cut.Load() {
		b.err = err
	}
	return n, err
}

// cutBody stops a read of the agent's body in progress (exchange's writer, once the answer
// is relayed).
func (hc *h1conn) cutBody() {
	if hc.body != nil {
		hc.body.cut.Store(true)
	}
	hc.agent.SetReadDeadline(time.Unix(1, 0))
}

// lingerClose ends an agent connection whose request body was not read to its end: it
// closes the sending side, then reads and drops what the agent still sends for a moment.
// Closing with unread data would reset the connection, and the agent could lose the answer
// it has not read yet (net/http's server does the same).
func (hc *h1conn) lingerClose() {
	hc.agent.CloseWrite()
	hc.agent.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.Copy(io.Discard, io.LimitReader(hc.br, 64<<20))
}

func asciiPrintable(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// hopHeaders are removed in both directions (RFC 9110 section 7.6.1), as ReverseProxy does.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopByHop(h http.Header) {
	for _, f := range h["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				delete(h, http.CanonicalHeaderKey(sf))
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
}

var errPolicyChanged = errors.New("policy reloaded before the request could be retried")

// regate is what an injecting request takes again before it injects after letting the
// reload gate go (a retry, after a dial, after reading a body ahead): the gate, and only
// while the policy that decided inj's request is still in force and its user is still
// enrolled (an unenroll waits for the gate's holders, Revoke). release gives it back (once).
func (s *Server) regate(inj *injected) (release func(), ok bool) {
	s.gate.RLock()
	if s.policy.Load() != inj.policy || s.unenrolled(inj.uid) {
		s.gate.RUnlock()
		return nil, false
	}
	return sync.OnceFunc(s.gate.RUnlock), true
}

// roundTrip writes out on the held upstream connection (dialling one, or taking an idle one
// from the pool) and reads the response head. A request that fails on a reused connection
// before any response byte arrived is retried once on a fresh one when it is idempotent and
// its body can be replayed.
func (hc *h1conn) roundTrip(out *http.Request, p *prepared) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		if attempt > 0 && p.inj != nil {
			p.inj.retried = true // the first attempt was sent (recordNotSent)
			rel, ok := hc.s.upstream.regate(p.inj)
			if !ok {
				return nil, errPolicyChanged
			}
			p.release = rel
		}
		// A request that is not retried if its connection turns out closed checks it first.
		probe := !idempotent(out)
		scope := scopeOf(hc.f, p.inj)
		if hc.up != nil && hc.up.scope != scope {
			// Held for a pipelined request of another scope: it waits in the pool instead.
			hc.s.upstream.putH1(hc.up)
			hc.up = nil
		}
		if hc.up != nil && !alive(hc.up, probe) {
			hc.dropUpstream()
		}
		reused := hc.up != nil
		if hc.up == nil {
			var g *heldGate
			if p.inj != nil {
				g = &heldGate{inj: p.inj, release: p.release}
			}
			up, r, err := hc.s.upstream.getH1(hc.ctx, hc.f, scope, probe, g)
			if g != nil {
				p.release = g.release
			}
			if err != nil {
				p.release()
				return nil, err
			}
			hc.up, reused = up, r
		}
		up := hc.up
		if hc.expectContinue {
			// Sent here, before the body's writer starts: from then on the answer may be
			// written to the agent at any time, and one writer at a time uses hc.bw.
			hc.expectContinue = false
			if !hc.writeContinue() {
				p.release()
				return nil, errors.New("write 100 Continue to the agent")
			}
		}
		streamed := out.Body != nil && out.Body != http.NoBody && hc.replay == nil
		resp, pending, noAnswer, err := exchange(up, out, streamed, p.release, hc.cutBody)
		if err == nil {
			hc.pending = pending
			up.lastUsed = time.Now()
			return resp, nil
		}
		hc.dropUpstream()
		// Nothing at all coming back means the server closed the connection; a request it
		// began to answer is not sent again.
		if !noAnswer || !reused || attempt > 0 || !idempotent(out) || !hc.replayable(out) {
			return nil, err
		}
	}
}

// writeContinue tells the agent to send its body. It may hold the reload gate meanwhile, so
// an agent that does not read (its receive buffer full) cannot hold it for longer than the
// header timeout.
func (hc *h1conn) writeContinue() bool {
	hc.agent.SetWriteDeadline(time.Now().Add(h1HeaderTimeout))
	defer hc.agent.SetWriteDeadline(time.Time{})
	hc.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
	return hc.bw.Flush() == nil
}

// idempotent reports whether out may be sent again after a connection failed with no
// answer: the upstream may have acted on it, so only methods that mean the same when
// repeated, or a request that carries an idempotency key, are (RFC 9110 section 9.2.2; the
// same rule as net/http's Transport). A POST to an LLM API is a paid call.
func idempotent(out *http.Request) bool {
	switch out.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, key := out.Header["Idempotency-Key"]
	_, xkey := out.Header["X-Idempotency-Key"]
	return key || xkey
}

// replayable reports whether out's body can be sent again, and rewinds it.
func (hc *h1conn) replayable(out *http.Request) bool {
	if out.Body == nil || out.Body == http.NoBody {
		return true
	}
	if hc.replay != nil {
		_, err := hc.replay.Seek(0, io.SeekStart)
		return err == nil
	}
	return false
}

// readResponse reads the response head, skipping interim 1xx responses (the agent's
// Expect is answered by the proxy itself) but not 101.
func readResponse(br *bufio.Reader, out *http.Request) (*http.Response, error) {
	for i := 0; ; i++ {
		resp, err := http.ReadResponse(br, out)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols || resp.StatusCode < 100 {
			return resp, nil
		}
		if i >= max1xxResponses {
			return nil, errors.New("too many interim responses")
		}
	}
}

func (hc *h1conn) dropUpstream() {
	if hc.up != nil {
		hc.s.upstream.closeConn(hc.up)
		hc.up = nil
	}
}

// writeResponse copies resp to the agent. ok is false when the agent can no longer be
// written to; complete is false when the upstream's body was not read to its end.
func (hc *h1conn) writeResponse(req *http.Request, resp *http.Response, keepAlive bool, inj *injected) (ok, complete bool) {
	bw := hc.bw
	h := resp.Header
	removeHopByHop(h)
	code := resp.StatusCode
	bodyless := !bodyAllowed(req, resp)
	chunked := false
	if !bodyless {
		switch {
		case resp.ContentLength >= 0:
			h["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
		case req.ProtoAtLeast(1, 1):
			delete(h, "Content-Length")
			h["Transfer-Encoding"] = []string{"chunked"}
			chunked = true
		default:
			// An HTTP/1.0 agent reads an unknown length to the end of the connection.
			delete(h, "Content-Length")
			keepAlive = false
		}
	}
	if chunked && len(resp.Trailer) > 0 {
		// Announced as the upstream announced them (Trailer is hop-by-hop); they follow the
		// last chunk. Only a chunked answer can carry them.
		h["Trailer"] = []string{strings.Join(slices.Sorted(maps.Keys(resp.Trailer)), ", ")}
	}
	if !keepAlive {
		h["Connection"] = []string{"close"}
	} else if req.ProtoMinor == 0 {
		// An HTTP/1.0 agent that asked to keep the connection is told it is kept.
		h["Connection"] = []string{"keep-alive"}
	}
	text := strings.TrimPrefix(resp.Status, strconv.Itoa(code))
	text = strings.TrimSpace(text)
	if text == "" || !validHeaderFieldValue(text) {
		text = http.StatusText(code)
	}
	fmt.Fprintf(bw, "HTTP/1.1 %03d %s\r\n", code, text)
	h.Write(bw)
	bw.WriteString("\r\n")
	if bodyless {
		return bw.Flush() == nil, true
	}
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	var cerr error
	// A chunk is framed in place (its size line before the data, CRLF after), so it goes to
	// TLS as one write: three writes made a 2-byte record of every chunk's CRLF.
	const chunkHead = 8 // "8000\r\n" is the longest size line of a 32 KiB read
	var sizeLine [16]byte
	for {
		var n int
		var err error
		if chunked {
			n, err = resp.Body.Read(buf[chunkHead : len(buf)-2])
		} else {
			n, err = resp.Body.Read(buf)
		}
		if n > 0 && cerr == nil {
			if chunked {
				line := append(strconv.AppendInt(sizeLine[:0], int64(n), 16), '\r', '\n')
				start := chunkHead - len(line)
				copy(buf[start:], line)
				buf[chunkHead+n], buf[chunkHead+n+1] = '\r', '\n'
				_, cerr = bw.Write(buf[start : chunkHead+n+2])
			} else {
				_, cerr = bw.Write(buf[:n])
			}
			// Flush when the upstream has nothing more buffered: streamed events go out as
			// they arrive, and a small response goes out in one write with its head.
			if cerr == nil && (hc.up == nil || hc.up.br.Buffered() == 0) {
				cerr = bw.Flush()
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			// The response cannot be completed; the agent must not take a truncated body
			// for a whole one, so the connection ends here.
			hc.s.logAgent("upstream", hc.f.UID, "upstream %s (sni %q): response body: %s", hc.f.OrigDst, hc.f.SNI, inj.errText(err))
			bw.Flush()
			return false, false
		}
		if cerr != nil {
			// The agent went away; stop reading the upstream.
			return false, false
		}
	}
	if chunked {
		bw.WriteString("0\r\n")
		if len(resp.Trailer) > 0 {
			// Filled in by the body's end, and scrubbed there too for an injected request
			// (scrubResponse); again here, so that no path can skip it.
			if inj != nil {
				scrubHeaders(resp.Trailer, inj.scrub)
			}
			writeTrailers(bw, resp.Trailer)
		}
		bw.WriteString("\r\n")
	}
	return bw.Flush() == nil, true
}

// writeTrailers writes the trailer fields that may stand in a trailer section and are well
// formed; the rest are dropped.
func writeTrailers(bw *bufio.Writer, tr http.Header) {
	for _, k := range slices.Sorted(maps.Keys(tr)) {
		if !validHeaderFieldName(k) || badTrailer(k) {
			continue
		}
		for _, v := range tr[k] {
			if validHeaderFieldValue(v) {
				bw.WriteString(k)
				bw.WriteString(": ")
				bw.WriteString(v)
				bw.WriteString("\r\n")
			}
		}
	}
}

// badTrailer reports fields a trailer must not carry (RFC 9110 section 6.5.1): framing,
// routing and the like, which a recipient might act on as if they were headers.
func badTrailer(k string) bool {
	switch http.CanonicalHeaderKey(k) {
	case "Content-Length", "Transfer-Encoding", "Trailer", "Host", "Connection", "Keep-Alive",
		"Te", "Upgrade", "Content-Encoding", "Content-Type", "Content-Range", "Authorization",
		"Set-Cookie", "Cache-Control", "Expires", "Location", "Www-Authenticate", "Proxy-Authenticate":
		return true
	}
	return false
}

// reusableAfter reports whether resp's framing leaves its upstream connection able to carry
// another request once the body is read: not when the upstream said close, nor when the
// body runs to the connection's end, nor after a request whose body the upstream may have
// left unread (see ignorableBody).
func reusableAfter(req *http.Request, resp *http.Response) bool {
	return !resp.Close && !(resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 && bodyAllowed(req, resp)) &&
		!ignorableBody(req)
}

// ignorableBody reports whether req has a body that a server may leave unread: one on a
// method other than POST, PUT and PATCH (a GET or a DELETE with a body). A server that
// does so takes the body for the next request on the connection and answers it too, and
// every later answer on that connection would go to the request after its own.
func ignorableBody(req *http.Request) bool {
	if req == nil || req.Body == nil || req.Body == http.NoBody || req.ContentLength == 0 {
		return false
	}
	switch req.Method {
	case http.MethodPost, http.MethodPut, http.MethodPatch:
		return false
	}
	return true
}

// bodyAllowed reports whether resp carries a body (RFC 9112 section 6.3).
func bodyAllowed(req *http.Request, resp *http.Response) bool {
	c := resp.StatusCode
	head := req != nil && req.Method == http.MethodHead
	return !head && c != http.StatusNoContent && c != http.StatusNotModified && c >= 200
}

// writeRefusal answers the agent with one line that says it was the proxy, not the upstream.
func (hc *h1conn) writeRefusal(status int, reason string, closeConn bool) bool {
	body := refusalBody(reason)
	fmt.Fprintf(hc.bw, "HTTP/1.1 %03d %s\r\nContent-Type: text/plain; charset=utf-8\r\nX-Agent-Vault-Proxy: %s\r\nContent-Length: %d\r\n",
		status, http.StatusText(status), reason, len(body))
	if closeConn {
		hc.bw.WriteString("Connection: close\r\n")
	}
	hc.bw.WriteString("\r\n")
	hc.bw.WriteString(body)
	return hc.bw.Flush() == nil
}

// switchProtocols hands a 101 response to the agent and then splices both ways: what follows
// is no longer HTTP, so no further request is checked on this connection. What the upstream
// sends goes through the scrubber like a response body: a real value it echoes reaches the
// agent as the placeholder (which breaks a WebSocket's framing: the agent's side fails).
func (hc *h1conn) switchProtocols(resp *http.Response, inj *injected) {
	up := hc.up
	hc.up = nil
	defer hc.s.upstream.closeConn(up)
	h := resp.Header
	upType := h.Get("Upgrade")
	removeHopByHop(h)
	if !asciiPrintable(upType) {
		hc.writeRefusal(http.StatusBadGateway, "upstream_unreachable", true)
		return
	}
	h["Connection"] = []string{"Upgrade"}
	h["Upgrade"] = []string{upType}
	fmt.Fprintf(hc.bw, "HTTP/1.1 101 Switching Protocols\r\n")
	h.Write(hc.bw)
	hc.bw.WriteString("\r\n")
	if hc.bw.Flush() != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		io.Copy(up.c, hc.br)
		up.c.CloseWrite()
		close(done)
	}()
	var fromUp io.Reader = up.br
	switch {
	case inj == nil || len(inj.scrub) == 0:
	case strings.EqualFold(strings.TrimSpace(upType), "websocket"):
		// Read as frames, so that an echo split by a fragment's header is still found, and
		// a message's end lets its tail go (ws.go).
		ws := newWSScrubber(up.br, inj.scrub)
		defer ws.Close()
		fromUp = ws
	default:
		sr := newScrubReader(io.NopCloser(up.br), inj.scrub)
		defer sr.Close()
		fromUp = sr
	}
	io.Copy(hc.agent, fromUp)
	hc.agent.CloseWrite()
	<-done
}
