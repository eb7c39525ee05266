package intercept

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/rawconn"
)

// Timeouts on the agent side. There is no write timeout: SSE streams live for minutes and
// are kept alive by data, so idle deadlines do the work instead.
const (
	helloTimeout     = 10 * time.Second
	helloMax         = 16 << 10
	handshakeTimeout = 10 * time.Second
	dialTimeout      = 10 * time.Second
)

// Secrets is what the proxy needs from the store: a copy of a named value, which the caller
// wipes after use.
type Secrets interface {
	Get(ctx context.Context, name string) ([]byte, error)
}

// Logf is the logger the proxy writes operational messages to. Messages never contain
// secret values, header values, queries or bodies.
type Logf func(format string, args ...any)

// Options configure a Server.
type Options struct {
	Policy  *inject.Policy
	CA      *CA
	Secrets Secrets
	Auditor audit.Auditor
	Logf    Logf
	// Listeners are the addresses avpd accepts on; a connection whose original destination
	// is one of them came straight to the listener, not through the redirect, and is closed.
	Listeners []netip.AddrPort
	// UpstreamTLS verifies upstreams; ServerName is set per connection from the SNI.
	UpstreamTLS *tls.Config
	// UpstreamDial dials the original destination; nil means a net.Dialer.
	UpstreamDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// IsEnrolled reports whether a UID is enrolled. A connection from a UID that is not
	// (conntrack can hand another user's connection to the redirect when it reuses an
	// entry) is spliced through untouched: only enrolled users ever get injection.
	IsEnrolled func(uid uint32) bool
	// MaxConnsPerUID bounds the connections one user has open through avpd at a time;
	// 0 means config.DefaultMaxConnsPerUID.
	MaxConnsPerUID int
}

// Stats are counters for status.
type Stats struct {
	Connections   uint64 `json:"connections"`
	Passthrough   uint64 `json:"passthrough"`
	Terminated    uint64 `json:"terminated"`
	Requests      uint64 `json:"requests"`
	Injected      uint64 `json:"injected"`
	Verbatim      uint64 `json:"forwarded_verbatim"`
	Refused       uint64 `json:"refused"`
	BackendErrors uint64 `json:"backend_errors"`
	AuditErrors   uint64 `json:"audit_errors"`
	Rejected      uint64 `json:"rejected_connections"`
	// Direct counts connections made to the listener itself rather than redirected to it
	// (avpctl doctor's probe, a curious user): closed at once, and not counted as rejected,
	// which is what an agent's refused connection is.
	Direct uint64 `json:"direct_to_listener,omitempty"`
	// OverUIDLimit counts the rejected connections that were over
	// proxy.max_connections_per_uid.
	OverUIDLimit uint64 `json:"connections_over_uid_limit"`
	// LateDropped counts audit_unavailable refusals that could not even be queued for a
	// late record (the queue of 1024 was full).
	LateDropped uint64 `json:"late_refusals_dropped"`
	// LogSuppressed counts the log lines an agent caused (a failed handshake, an unreachable
	// destination, ...) that were not logged, past the first few per user every 10 s.
	LogSuppressed uint64 `json:"log_lines_suppressed"`
	// VerbatimByReason and RefusedByReason split Verbatim and Refused by reason (the
	// audit's reason field), so an operator sees at once, say, that an agent's client
	// sends its key in a header the config does not list.
	VerbatimByReason map[string]uint64 `json:"forwarded_verbatim_by_reason,omitempty"`
	RefusedByReason  map[string]uint64 `json:"refused_by_reason,omitempty"`
}

// reasonCounts counts requests by reason. Reasons are the proxy's own constants, so the map
// stays small; the cap guards against a future caller passing something unbounded.
type reasonCounts struct {
	mu sync.Mutex
	m  map[string]uint64
}

const maxReasons = 64

func (r *reasonCounts) add(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]uint64{}
	}
	if _, ok := r.m[reason]; ok || len(r.m) < maxReasons {
		r.m[reason]++
	}
}

func (r *reasonCounts) snapshot() map[string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.m) == 0 {
		return nil
	}
	return maps.Clone(r.m)
}

// countRefused counts a request the proxy answered itself, with its reason.
func (s *Server) countRefused(reason string) {
	s.stats.refused.Add(1)
	s.stats.refusedReasons.add(reason)
}

// Server accepts redirected connections, splices unbound ones and terminates bound ones.
type Server struct {
	// logs throttles the lines an agent can cause (logthrottle.go).
	logs       logThrottle
	policy     atomic.Pointer[inject.Policy]
	gate       sync.RWMutex
	ca         *CA
	secrets    Secrets
	auditor    audit.Auditor
	logf       Logf
	listeners  []netip.AddrPort
	dial       func(ctx context.Context, network, addr string) (net.Conn, error)
	isEnrolled func(uid uint32) bool

	httpSrv  *http.Server
	agentTLS *tls.Config
	tlsConns *connQueue
	upstream *upstreamPool
	proxy    http.Handler
	uidLimit *uidLimit
	// late holds refusals for the audit log to record once it answers again (late.go).
	late     chan audit.Event
	stopLate context.CancelFunc

	mu      sync.Mutex
	active  map[net.Conn]struct{}
	h1conns map[*h1conn]struct{}
	wg      sync.WaitGroup
	closed  bool
	closing atomic.Bool

	stats struct {
		connections, passthrough, terminated, requests, injected, verbatim,
		refused, backendErrors, auditErrors, rejected, overUIDLimit, lateDropped, direct atomic.Uint64
		verbatimReasons, refusedReasons reasonCounts
	}
}

// NewServer validates opts and builds a server; call Serve for each listener.
func NewServer(opts Options) (*Server, error) {
	if opts.Policy == nil || opts.CA == nil || opts.Secrets == nil || opts.Auditor == nil || opts.UpstreamTLS == nil {
		return nil, errors.New("intercept: policy, CA, secrets, auditor and upstream TLS config are required")
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	s := &Server{
		ca:         opts.CA,
		secrets:    opts.Secrets,
		auditor:    opts.Auditor,
		logf:       opts.Logf,
		listeners:  opts.Listeners,
		dial:       opts.UpstreamDial,
		isEnrolled: opts.IsEnrolled,
		tlsConns:   newConnQueue(),
		active:     map[net.Conn]struct{}{},
		h1conns:    map[*h1conn]struct{}{},
	}
	if s.dial == nil {
		d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
		s.dial = d.DialContext
	}
	s.policy.Store(opts.Policy)
	if opts.MaxConnsPerUID <= 0 {
		opts.MaxConnsPerUID = config.DefaultMaxConnsPerUID
	}
	s.uidLimit = newUIDLimit(opts.MaxConnsPerUID)
	s.late = make(chan audit.Event, lateQueue)
	lateCtx, stopLate := context.WithCancel(context.Background())
	s.stopLate = stopLate
	go s.recordLate(lateCtx)
	go s.reportSuppressed(lateCtx)
	s.agentTLS = s.newAgentTLS()
	s.upstream = newUpstreamPool(opts.UpstreamTLS, s.dial)
	s.upstream.onConn = s.trackUpstream
	s.upstream.regate = s.regate
	s.proxy = newReverseProxy(s.upstream, s.logAgent, s.agentLogf("upstream"))
	s.httpSrv = &http.Server{
		Handler:           http.HandlerFunc(s.serveHTTP),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    maxRequestHeaderBytes,
		ConnContext:       s.tlsConns.connContext,
		ConnState:         s.tlsConns.connState,
		ErrorLog:          log.New(logfWriter(s.agentLogf("agent side")), "agent side: ", 0),
		// Each stream may hold an upstream connection of its own; 100 is what most servers
		// allow (Go's default is 250).
		// The agent's request bodies wait here until the handler reads them (while its
		// upstream is dialled, say): Go's default of 1 MiB per stream and connection let
		// one user hold 8 GiB within its default slot budget.
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:          maxStreamsPerConn,
			MaxReceiveBufferPerStream:     h2ReceiveBufferPerStream,
			MaxReceiveBufferPerConnection: h2ReceiveBufferPerStream,
		},
	}
	s.httpSrv.SetKeepAlivesEnabled(true)
	go func() {
		// Serve returns only when the queue is closed at shutdown.
		_ = s.httpSrv.Serve(s.tlsConns)
	}()
	return s, nil
}

// maxStreamsPerConn bounds an HTTP/2 agent connection's concurrent requests.
const maxStreamsPerConn = 100

// Revoke is for an unenroll, once the user's enrollment is gone from IsEnrolled: a request
// of it decided before does not inject once Revoke returns. Requests that hold the gate
// finish first; one that let it go (dialling its upstream) finds its user unenrolled when it
// takes it again (regate) and fails; requests decided after see the user unenrolled
// (prepare) and go verbatim. Other users' requests are not touched.
func (s *Server) Revoke() {
	s.gate.Lock()
	s.gate.Unlock()
}

// SetPolicy swaps the policy atomically. Requests already deciding finish under the old one;
// SetPolicy returns only after each of them that injects has written its headers upstream.
func (s *Server) SetPolicy(p *inject.Policy) {
	s.gate.Lock()
	s.policy.Store(p)
	s.gate.Unlock()
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Connections: s.stats.connections.Load(), Passthrough: s.stats.passthrough.Load(),
		Terminated: s.stats.terminated.Load(), Requests: s.stats.requests.Load(),
		Injected: s.stats.injected.Load(), Verbatim: s.stats.verbatim.Load(),
		Refused: s.stats.refused.Load(), BackendErrors: s.stats.backendErrors.Load(),
		AuditErrors: s.stats.auditErrors.Load(), Rejected: s.stats.rejected.Load(), OverUIDLimit: s.stats.overUIDLimit.Load(), LateDropped: s.stats.lateDropped.Load(), Direct: s.stats.direct.Load(),
		LogSuppressed:    s.logs.suppressed.Load(),
		VerbatimByReason: s.stats.verbatimReasons.snapshot(), RefusedByReason: s.stats.refusedReasons.snapshot(),
	}
}

// Serve accepts on ln until ctx is done or ln is closed.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Running out of file descriptors must not stop the proxy for good.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logf("accept on %s: %v; retrying in %v", ln.Addr(), err, backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		if !s.track(c) {
			c.Close()
			return nil
		}
		go func() {
			defer s.untrack(c)
			s.handleConn(ctx, tc)
		}()
	}
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.active[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// trackUpstream keeps the HTTP/1.1 upstream connections in the set shutdown closes.
func (s *Server) trackUpstream(c net.Conn, open bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if open {
		s.active[c] = struct{}{}
	} else {
		delete(s.active, c)
	}
}

func (s *Server) trackH1(hc *h1conn, open bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if open {
		s.h1conns[hc] = struct{}{}
	} else {
		delete(s.h1conns, hc)
	}
}

func (s *Server) isClosing() bool { return s.closing.Load() }

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.active, c)
	s.mu.Unlock()
	s.wg.Done()
}

// Shutdown stops taking connections and waits for active ones until ctx ends, then closes
// what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.closing.Store(true)
	// HTTP/1.1 connections waiting for their next request end now; one in the middle of a
	// request finishes it and then sees closing.
	for hc := range s.h1conns {
		if hc.idle.Load() {
			hc.agent.SetReadDeadline(time.Now())
		}
	}
	s.mu.Unlock()
	s.upstream.closeIdleH1(true)
	err := s.httpSrv.Shutdown(ctx)
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.active {
			c.Close()
		}
		s.mu.Unlock()
		<-done
	}
	s.upstream.closeIdle()
	s.upstream.closeIdleH1(true)
	s.stopLate()
	return err
}

// connFacts are what the proxy learned about a connection before any HTTP was read.
type connFacts struct {
	inject.Facts
}

func (s *Server) handleConn(ctx context.Context, c *net.TCPConn) {
	s.stats.connections.Add(1)
	orig, err := OriginalDst(c)
	if err != nil {
		s.stats.rejected.Add(1)
		s.logAgent("close connection", -1, "close connection from %s: %v", c.RemoteAddr(), err)
		c.Close()
		return
	}
	if IsSelf(orig, s.listeners) {
		// Someone dialled the listener directly instead of being redirected: there is no
		// original destination to forward to.
		s.stats.direct.Add(1)
		c.Close()
		return
	}
	uid := lookupPeerUID(c, orig)
	if uid < 0 {
		// Its owner is gone (the agent closed at once) or its tuple is not the one the
		// agent's socket has: whose connection this is cannot be known, so nothing about
		// it can be decided (a binding's uids, the per-user limit, the audit line).
		s.stats.rejected.Add(1)
		s.logUnknownUID(orig)
		c.SetLinger(0)
		c.Close()
		return
	}
	if !s.uidLimit.acquire(uid) {
		s.stats.rejected.Add(1)
		s.stats.overUIDLimit.Add(1)
		s.logUIDLimit(uid)
		c.SetLinger(0) // a reset, so the client fails at once instead of on its first read
		c.Close()
		return
	}
	defer s.uidLimit.release(uid)
	info, peeked, err := PeekClientHello(c, helloTimeout, helloMax)
	facts := inject.Facts{UID: uid, SNI: info.ServerName, OrigDst: orig}
	policy := s.policy.Load()
	if s.unenrolled(uid) {
		s.passthrough(ctx, c, peeked, facts, ReasonNotEnrolled)
		return
	}
	if err != nil || info.ServerName == "" || !policy.Bound(info.ServerName) {
		reason := "host_not_bound"
		switch {
		case err != nil:
			reason = "no_tls_client_hello"
		case info.ServerName == "":
			reason = "no_sni"
		}
		s.passthrough(ctx, c, peeked, facts, reason)
		return
	}
	s.terminate(c, peeked, facts)
}

// unenrolled reports whether uid is known and not enrolled (IsEnrolled says no); a server
// without IsEnrolled takes every user as enrolled.
func (s *Server) unenrolled(uid int64) bool {
	return uid >= 0 && s.isEnrolled != nil && !s.isEnrolled(uint32(uid))
}

// passthroughAuditTimeout bounds the wait for a spliced connection's audit event.
const passthroughAuditTimeout = 10 * time.Second

// lookupPeerUID is peerUID; a test replaces it.
var lookupPeerUID = peerUID

// logUnknownUID logs a connection refused for want of an owner, at most once a minute.
func (s *Server) logUnknownUID(orig netip.AddrPort) {
	if log, _ := s.logs.note(logKey{"unknown owner", -1}, logRule{burst: 1, every: time.Minute}, time.Now()); log {
		s.logf("refused a connection to %s whose owner could not be found (its socket closed at once, or its tuple changed); such connections are refused, and this is logged once a minute", orig)
	}
}

// passthrough splices the connection to its original destination, replaying the peeked
// bytes, so the agent talks to the real server and sees its real certificate.
func (s *Server) passthrough(ctx context.Context, c *net.TCPConn, peeked []byte, f inject.Facts, reason string) {
	s.stats.passthrough.Add(1)
	// Passthrough carries no secret, so its audit event does not hold the splice up; but the
	// connection keeps its slot of the user's budget until the event is recorded (the wait
	// runs after the close below): an agent that opened and closed connections in a loop
	// would otherwise pile up records without bound, ahead of every other user's.
	recorded := make(chan struct{})
	defer func() { <-recorded }()
	defer c.Close()
	go func() {
		defer close(recorded)
		ctx, cancel := context.WithTimeout(context.Background(), passthroughAuditTimeout)
		defer cancel()
		s.record(ctx, audit.Event{
			Type: audit.TypeDecision, Decision: audit.DecisionPassthrough, Reason: reason,
			UID: uidPtr(f.UID), Dst: f.OrigDst.String(), SNI: f.SNI,
		})
	}()
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	up, err := s.dial(dctx, "tcp", f.OrigDst.String())
	cancel()
	if err != nil {
		s.logAgent("passthrough", f.UID, "passthrough to %s (sni %q): %v", f.OrigDst, f.SNI, err)
		return
	}
	defer up.Close()
	if _, err := up.Write(peeked); err != nil {
		return
	}
	splice(c, up)
}

// splice copies both ways until both directions end, propagating half-closes.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

// agentConn is what the agent-side TLS server reads: the peeked bytes replayed, and the name
// the connection is terminated for.
type agentConn struct {
	*PrefixConn
	sni string
}

// newAgentTLS is the one TLS config of every terminated connection. Sharing it shares its
// session ticket keys, so an agent that reconnects resumes its session instead of doing a
// full handshake (a config per connection had keys of its own, and no ticket ever came
// back). What is decided for a connection never comes from a resumed session: the facts are
// the peeked ClientHello's, and the upstream is verified on avpd's own connection.
func (s *Server) newAgentTLS() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"},
		// The agent's connection never leaves the host (the redirect is to a local
		// listener), so the post-quantum hybrid key exchange protects nothing here; it was
		// half of avpd's handshake CPU on a new connection. Upstream connections keep Go's
		// defaults, hybrid included.
		CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256, tls.CurveP384},
		// Full-size records from the first byte: small first records only help a client
		// across a slow network, and on loopback each record is one more write.
		DynamicRecordSizingDisabled: true,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			// The peeked SNI decided that this connection is terminated; mint for that
			// name only, whatever the handshake claims later.
			ac, ok := hello.Conn.(*agentConn)
			if !ok {
				return nil, errors.New("intercept: handshake on an unknown connection")
			}
			return s.ca.Leaf(ac.sni)
		},
	}
}

func (s *Server) terminate(c *net.TCPConn, peeked []byte, f inject.Facts) {
	s.stats.terminated.Add(1)
	tc := tls.Server(&agentConn{PrefixConn: NewPrefixConn(rawconn.New(c), peeked), sni: f.SNI}, s.agentTLS)
	hctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		s.logAgent("tls handshake with agent", f.UID, "tls handshake with agent for %q: %v", f.SNI, err)
		tc.Close()
		return
	}
	if tc.ConnectionState().NegotiatedProtocol == "h2" {
		done := s.tlsConns.push(tc, &connFacts{Facts: f})
		<-done
		return
	}
	s.serveH1(tc, f)
}

// record sends events to the auditor and counts failures. An agent that goes away (resets
// its stream) does not cancel it: the decision is recorded all the same, within
// audit.timeout, and a cancelled wait is not the audit log failing.
func (s *Server) record(ctx context.Context, events ...audit.Event) error {
	err := s.auditor.Record(context.WithoutCancel(ctx), events...)
	if err != nil {
		s.stats.auditErrors.Add(1)
		// Once per request while the log does not answer: the first few lines of each
		// interval say why, the count says how many (status counts every one).
		s.logAgent("audit failures", -1, "audit: %v", err)
	}
	return err
}

func uidPtr(uid int64) *int64 {
	if uid < 0 {
		return nil
	}
	return audit.Int64(uid)
}
