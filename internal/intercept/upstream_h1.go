package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"hash/maphash"
	"math"
	"net/http"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/rawconn"
)

// upConn is one verified HTTP/1.1 connection to an upstream. An agent connection takes one
// from the pool for a request (and keeps it for pipelined ones that follow) and puts it back
// before it waits for the agent, so agent connections, new or idle, share them.
type upConn struct {
	key upstreamKey
	// scope is whose requests the connection carries (see connScope).
	scope    connScope
	c        *tls.Conn
	lr       limitReader // bounds a response head
	br       *bufio.Reader
	bw       *bufio.Writer
	lastUsed time.Time
	// onWrite runs after the first write to the network of a request (its headers).
	onWrite func()
}

// upWriter is what upConn.bw flushes to: the TLS connection, with the hook that releases the
// reload gate once a request's headers are on their way.
type upWriter struct{ u *upConn }

func (w upWriter) Write(p []byte) (int, error) {
	n, err := w.u.c.Write(p)
	if f := w.u.onWrite; f != nil {
		w.u.onWrite = nil
		f()
	}
	return n, err
}

func (u *upConn) close() { u.c.Close() }

const (
	maxIdleH1PerKey = 64
	maxIdleH1       = 512
	idleH1Timeout   = 90 * time.Second
)

// tlsConfig returns the client TLS config of one upstream key. One per key keeps its session
// cache, so a new upstream connection resumes instead of doing a full handshake.
func (p *upstreamPool) tlsConfig(k upstreamKey) *tls.Config {
	return p.cachedTLS(p.configs, k, "http/1.1")
}

// cachedTLS returns k's client config from m (one per upstream, so its session cache
// lets a new connection resume), making it with protos when there is none.
func (p *upstreamPool) cachedTLS(m map[upstreamKey]*tls.Config, k upstreamKey, protos ...string) *tls.Config {
	p.mu.Lock()
	defer p.mu.Unlock()
	if tc, ok := m[k]; ok {
		return tc
	}
	if len(m) >= maxTransports {
		for old := range m {
			delete(m, old)
			break
		}
	}
	tc := p.clientTLS(k, protos)
	m[k] = tc
	return tc
}

// heldGate is the reload gate as an injecting request holds it, from its decision until its
// headers are written upstream: release lets it go, and inj is what was decided.
type heldGate struct {
	inj     *injected
	release func()
}

// getH1 returns an idle connection for f's name and original destination, or dials one.
// reused tells the caller that the server may have closed it meanwhile; probe makes sure
// an idle one is still open however briefly it was idle. A request that holds the reload
// gate (g, nil for one that does not) dials without it: how long a dial takes is up to the
// original destination, which the agent chose, and a reload, and every request behind it,
// would wait that long. It takes the gate again after the dial, only under the policy that
// decided it (else errPolicyChanged), and g.release is then the new hold's.
func (p *upstreamPool) getH1(ctx context.Context, f inject.Facts, scope connScope, probe bool, g *heldGate) (up *upConn, reused bool, err error) {
	k := upstreamKey{sni: f.SNI, addr: f.OrigDst}
	ik := idleKey{k, scope}
	now := time.Now()
	for {
		p.mu.Lock()
		idle := p.idle[ik]
		if len(idle) == 0 {
			p.mu.Unlock()
			break
		}
		up = idle[len(idle)-1]
		idle[len(idle)-1] = nil
		p.idle[ik] = idle[:len(idle)-1]
		p.nIdle--
		p.mu.Unlock()
		if now.Sub(up.lastUsed) < idleH1Timeout && alive(up, probe) {
			return up, true, nil
		}
		p.closeConn(up)
	}
	if g != nil && p.regate != nil {
		g.release()
		defer func() {
			if v := recover(); v != nil {
				// A panic in the dial: the gate is not taken again (nothing would release
				// it); serveH1 recovers and the request fails.
				panic(v)
			}
			rel, ok := p.regate(g.inj)
			if !ok {
				if up != nil {
					p.closeConn(up)
				}
				up, err = nil, errPolicyChanged
				return
			}
			g.release = rel
		}()
	}
	if up, err = p.dialH1(ctx, k); up != nil {
		up.scope = scope
	}
	return up, false, err
}

// connScope is whose requests an upstream connection carries: the agent's UID and the
// secrets injected (none for a verbatim request). A connection serves one scope only.
// HTTP/1.1 matches answers to requests by order alone; an upstream that answers once too
// often (one that leaves a request body unread and takes it for the next request) shifts
// every later answer onto the next request. Within one scope that answer is scrubbed of
// the same secrets; across scopes an echo of one secret would reach a request that is not
// scrubbed of it, or another user.
//
// The values count as well as the names: after a rotation (or a reload that changes a
// template) the same names inject other bytes, and a request scrubbed of the new value only
// must not read an answer left over from one that carried the old.
type connScope struct {
	uid     int64
	secrets string // the injected secrets' names, NUL-separated
	values  uint64 // a seeded hash of every real byte string the request injects
}

// scopeSeed keys the values' hash: random per process, so the hash says nothing outside it.
var scopeSeed = maphash.MakeSeed()

// scopeOf is the scope of a request from f that injects inj (nil: verbatim).
func scopeOf(f inject.Facts, inj *injected) connScope {
	sc := connScope{uid: f.UID}
	if inj == nil {
		return sc
	}
	for i, in := range inj.secrets {
		if i == 0 {
			sc.secrets = in.Secret.Name
		} else {
			sc.secrets += "\x00" + in.Secret.Name
		}
	}
	var h maphash.Hash
	h.SetSeed(scopeSeed)
	for _, r := range inj.scrub {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(r.from)))
		h.Write(n[:])
		h.Write(r.from)
	}
	sc.values = h.Sum64()
	return sc
}

// idleKey is where an idle connection waits: its upstream and its scope.
type idleKey struct {
	upstreamKey
	scope connScope
}

// aliveReadWait bounds alive's read of bytes already waiting in the socket.
var aliveReadWait = time.Millisecond

// alive probes an idle connection without blocking: a closed one reads EOF (or an error, or
// bytes an idle HTTP/1.1 connection has no business sending, such as a close_notify), a live
// one has nothing to read. The probe is a non-blocking MSG_PEEK on the socket, one system
// call; a connection idle for under a second is taken as it is unless always is set (for a
// request that cannot be retried if the connection turns out closed).
func alive(up *upConn, always bool) bool {
	if !always && time.Since(up.lastUsed) < upstreamProbeAfter {
		return true
	}
	if up.br.Buffered() > 0 {
		return false
	}
	sc, ok := up.c.NetConn().(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	switch peekSocket(rc) {
	case 0:
		return true
	case -1:
		return false
	}
	// Bytes are waiting. They may be TLS's own (a late session ticket, a key update), which
	// TLS consumes without any data for the reader: that connection is fine. Anything else
	// (data, an alert such as close_notify, EOF after it) is not. A read that times out
	// while bytes are still in the socket has not looked at them yet (on a loaded machine
	// the deadline can pass before the read is tried), so it looks again.
	for range 8 {
		up.c.SetReadDeadline(time.Now().Add(aliveReadWait))
		_, err = up.br.Peek(1)
		up.c.SetReadDeadline(time.Time{})
		if !isTimeout(err) {
			return false
		}
		if peekSocket(rc) == 0 {
			return true
		}
	}
	return false // still unsure: a new connection costs a handshake, a dead one a failed request
}

// peekSocket says, without blocking, whether a socket holds unread bytes: 1 yes, 0 no, -1
// it is closed (EOF or a reset) or failed.
func peekSocket(rc syscall.RawConn) int {
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, rerr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return true // never wait
	}); err != nil {
		return -1
	}
	switch {
	case rerr == unix.EAGAIN:
		return 0
	case rerr != nil || n == 0:
		return -1
	}
	return 1
}

func (p *upstreamPool) dialH1(ctx context.Context, k upstreamKey) (*upConn, error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout+handshakeTimeout)
	defer cancel()
	raw, err := p.dial(dctx, "tcp", k.addr.String())
	if err != nil {
		return nil, err
	}
	tc := tls.Client(rawconn.New(raw), p.tlsConfig(k))
	if err := tc.HandshakeContext(dctx); err != nil {
		raw.Close()
		return nil, err
	}
	if np := tc.ConnectionState().NegotiatedProtocol; np != "" && np != "http/1.1" {
		tc.Close()
		return nil, errors.New("upstream negotiated " + np + " for an HTTP/1.1 connection")
	}
	up := &upConn{key: k, c: tc, lastUsed: time.Now()}
	up.lr = limitReader{r: tc, n: math.MaxInt64}
	up.br = bufio.NewReaderSize(&up.lr, 4<<10)
	// A request body is copied through this buffer (bufio.Writer.ReadFrom): at 4 KiB a
	// 1 MiB upload took 256 TLS records and writes, at 16 KiB (one full record) 64.
	up.bw = bufio.NewWriterSize(upWriter{up}, 16<<10)
	if p.onConn != nil {
		p.onConn(tc, true)
	}
	return up, nil
}

func (p *upstreamPool) closeConn(up *upConn) {
	if p.onConn != nil {
		p.onConn(up.c, false)
	}
	up.close()
}

// putH1 returns a connection that finished its last response cleanly.
func (p *upstreamPool) putH1(up *upConn) {
	if up.br.Buffered() > 0 {
		// Bytes nobody asked for: the connection is out of step.
		p.closeConn(up)
		return
	}
	now := time.Now()
	var expired []*upConn
	p.mu.Lock()
	ik := idleKey{up.key, up.scope}
	if p.closed || p.nIdle >= maxIdleH1 || len(p.idle[ik]) >= maxIdleH1PerKey {
		p.mu.Unlock()
		p.closeConn(up)
		return
	}
	p.idle[ik] = append(p.idle[ik], up)
	p.nIdle++
	if now.Sub(p.lastSweep) > idleH1Timeout/3 {
		p.lastSweep = now
		for k, conns := range p.idle {
			kept := conns[:0]
			for _, c := range conns {
				if now.Sub(c.lastUsed) >= idleH1Timeout {
					expired = append(expired, c)
					p.nIdle--
				} else {
					kept = append(kept, c)
				}
			}
			clear(conns[len(kept):])
			if len(kept) == 0 {
				delete(p.idle, k)
			} else {
				p.idle[k] = kept
			}
		}
	}
	p.mu.Unlock()
	for _, c := range expired {
		p.closeConn(c)
	}
}

// closeIdleH1 closes every idle HTTP/1.1 connection; after shutdown none is pooled again.
func (p *upstreamPool) closeIdleH1(shutdown bool) {
	p.mu.Lock()
	idle := p.idle
	p.idle = map[idleKey][]*upConn{}
	p.nIdle = 0
	if shutdown {
		p.closed = true
	}
	p.mu.Unlock()
	for _, conns := range idle {
		for _, c := range conns {
			p.closeConn(c)
		}
	}
}

// exchange writes out on up and reads the response head. release runs once the request's
// headers are on the network (or the write failed). noAnswer reports that not one byte of
// an answer came, so an idempotent request may be retried on a new connection.
//
// A body that streams from the agent (too large to have been read with its head) is written
// by a goroutine of its own while this one waits for the answer: an upstream may answer
// before it has read the whole body (401 for a bad key, 413 for a large upload) and stop
// reading, and that answer is what the agent must get, not a 502 for a write that can no
// longer finish. The write then goes on while the answer is relayed, and pending is set:
// the caller calls its finish once it is done with the answer, which stops a write still
// going (cancelBody unblocks its read of the agent's body).
func exchange(up *upConn, out *http.Request, streamed bool, release, cancelBody func()) (resp *http.Response, pending *pendingWrite, noAnswer bool, err error) {
	if !streamed {
		up.onWrite = release
		err = out.Write(up.bw)
		if err == nil {
			err = up.bw.Flush()
		}
		up.onWrite = nil
		release()
		if err != nil {
			return nil, nil, true, err
		}
		resp, noAnswer, err = readHead(up, out)
		return resp, nil, noAnswer, err
	}

	w := &pendingWrite{done: make(chan error, 1), up: up, cancelBody: cancelBody}
	go func() {
		up.onWrite = release
		werr := out.Write(up.bw)
		if werr == nil {
			werr = up.bw.Flush()
		}
		up.onWrite = nil
		release()
		if werr != nil {
			w.mu.Lock()
			if !w.gotHead {
				// No answer may come for a request whose body broke off: stop waiting.
				up.c.SetReadDeadline(time.Unix(1, 0))
				w.readerCut = true
			}
			w.mu.Unlock()
		}
		w.done <- werr
	}()
	resp, noAnswer, rerr := readHead(up, out)
	w.mu.Lock()
	w.gotHead = true
	cut := w.readerCut
	w.mu.Unlock()
	if rerr == nil {
		if cut {
			up.c.SetReadDeadline(time.Time{}) // the head came in time; the body is still to read
		}
		return resp, w, false, nil
	}
	if w.finish() || !cut {
		return nil, nil, noAnswer, rerr
	}
	// The reader was cut short because the write failed: the write's error says why (an
	// agent whose body broke off, say).
	return nil, nil, noAnswer, w.err
}

// pendingWrite is a request body that was still being written when the answer began.
type pendingWrite struct {
	done       chan error // the writer's result, once
	up         *upConn
	cancelBody func()

	mu        sync.Mutex
	gotHead   bool // the reader has the head: the writer leaves the read deadline alone
	readerCut bool // the writer failed first and cut the reader's wait short

	finished, ok bool
	err          error
}

// writing reports whether the write is still going after grace, without stopping it. The
// grace covers a writer that has sent the last byte but not yet said so when the answer
// (to the whole body) arrives.
func (w *pendingWrite) writing(grace time.Duration) bool {
	if w.finished {
		return false
	}
	select {
	case w.err = <-w.done:
		w.finished, w.ok = true, w.err == nil
		return false
	default:
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case w.err = <-w.done:
		w.finished, w.ok = true, w.err == nil
		return false
	case <-t.C:
		return true
	}
}

// finish ends the write and reports whether the whole body went out, which leaves the
// upstream connection (and the agent's) in step. A write still going is stopped: its
// connection's write side is cut and the agent's body read is unblocked.
func (w *pendingWrite) finish() bool {
	if w.finished {
		return w.ok
	}
	w.finished = true
	select {
	case w.err = <-w.done:
	default:
		w.up.c.SetWriteDeadline(time.Unix(1, 0))
		w.cancelBody()
		w.err = <-w.done
		if w.err == nil {
			w.err = errors.New("request body write stopped")
		}
	}
	w.ok = w.err == nil
	return w.ok
}

// readHead waits for the first byte of the answer and reads the response head.
func readHead(up *upConn, out *http.Request) (resp *http.Response, noAnswer bool, err error) {
	if _, err := up.br.Peek(1); err != nil {
		return nil, true, err
	}
	up.lr.n = h1MaxResponseHeaderBytes
	resp, err = readResponse(up.br, out)
	up.lr.n = math.MaxInt64
	return resp, false, err
}
