package intercept

// Availability tests: each one failed on the code before its fix and shows one way a single
// hostile enrolled agent exhausted avpd's resources or stalled other users.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// rtConfig is rawConfig with a binding that lists methods (POST and GET) instead of paths,
// as most real ones do, so an injected request's form body is checked for _method.
var rtConfig = strings.Replace(rawConfig, `paths: ["/**"]`, "methods: [POST, GET]", 1)

// tarpitAddr is the original destination a hostile agent dials: an address on port 443 that
// accepts TCP and then never says anything (a host of its own, anywhere on the internet).
// The dial hook sends it to a local listener that behaves so.
var tarpitAddr = netip.MustParseAddrPort("192.0.2.66:443")

// rtEnv is avpd in process, with a real upstream (HTTP/1.1 and h2, TLS for rawHost) and a
// tarpit; agents connect through listeners whose connections carry given facts, as the
// redirect would have given them.
type rtEnv struct {
	srv     *Server
	roots   *x509.CertPool
	logs    *logBuffer
	tarpits atomic.Int64 // connections the tarpit accepted
	tpMu    sync.Mutex
	tpConns []net.Conn
}

func newRTEnv(t *testing.T) *rtEnv {
	t.Helper()
	e := &rtEnv{}
	ca := newTestCA(t)
	cfg, err := config.Parse("bindings.yaml", []byte(rtConfig))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Leaf(rawHost)
	if err != nil {
		t.Fatal(err)
	}
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	up := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, `{"ok":true}`)
	})}
	go up.Serve(upLn)
	t.Cleanup(func() { up.Close() })

	tp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	go func() {
		for {
			c, err := tp.Accept()
			if err != nil {
				return
			}
			e.tarpits.Add(1)
			e.tpMu.Lock()
			e.tpConns = append(e.tpConns, c) // held open, never answered
			e.tpMu.Unlock()
		}
	}()
	t.Cleanup(e.releaseTarpit)

	e.roots = x509.NewCertPool()
	e.roots.AddCert(ca.Certificate())
	upAddr, tpAddr := upLn.Addr().String(), tp.Addr().String()
	e.logs = &logBuffer{}
	e.srv, err = NewServer(Options{
		Logf:   e.logs.logf,
		Policy: inject.NewPolicy(cfg), CA: ca, Secrets: mapSecrets{"KEY": "real-secret-value-0123456789"}, Auditor: &eventLog{},
		UpstreamTLS: &tls.Config{RootCAs: e.roots},
		// What net.Dialer does with the original destination: the tarpit's address reaches
		// the tarpit, any other the real upstream.
		UpstreamDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			if addr == tarpitAddr.String() {
				return d.DialContext(ctx, network, tpAddr)
			}
			return d.DialContext(ctx, network, upAddr)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		e.srv.Shutdown(ctx)
	})
	return e
}

// releaseTarpit closes what the tarpit holds, so avpd's handshakes with it fail at once.
func (e *rtEnv) releaseTarpit() {
	e.tpMu.Lock()
	defer e.tpMu.Unlock()
	for _, c := range e.tpConns {
		c.Close()
	}
	e.tpConns = nil
}

// agentListener returns an address whose connections avpd terminates with facts f.
func (e *rtEnv) agentListener(t *testing.T, f inject.Facts) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go acceptTerminating(ln, e.srv, func() inject.Facts { return f })
	return ln.Addr().String()
}

func (e *rtEnv) dialAgent(t *testing.T, addr string, proto string) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: rawHost, RootCAs: e.roots, NextProtos: []string{proto}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// h2UpstreamListener is a TLS listener for rawHost (the test CA's leaf) that offers h2 only,
// for an upstream written frame by frame (acceptRawH2, writeH2Frame).
func (e *rtEnv) h2UpstreamListener(t *testing.T) net.Listener {
	t.Helper()
	leaf, err := e.srv.ca.Leaf(rawHost)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialProbeThen sends the server's first upstream dial (speaksH2's probe) to the real h2
// upstream and every later one to addr, and counts them.
func (e *rtEnv) dialProbeThen(addr string) *atomic.Int32 {
	inner := e.srv.upstream.dial
	dials := new(atomic.Int32)
	e.srv.upstream.dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
		if dials.Add(1) == 1 {
			return inner(ctx, network, "127.0.0.1:443")
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	return dials
}

// acceptRawH2 accepts one connection on ln and reads the client's preface off it.
func acceptRawH2(ln net.Listener) (net.Conn, error) {
	c, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c, make([]byte, 24)); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (e *rtEnv) h2Client(t *testing.T, addr string) *http.Client {
	return h2ClientTo(t, addr, rawHost, e.roots)
}

func (e *rtEnv) setUIDLimit(n int) {
	e.srv.uidLimit.mu.Lock()
	e.srv.uidLimit.max = n
	e.srv.uidLimit.mu.Unlock()
}

func (e *rtEnv) openSlots(uid int64) int {
	e.srv.uidLimit.mu.Lock()
	defer e.srv.uidLimit.mu.Unlock()
	return e.srv.uidLimit.open[uid]
}

// TestDoSH2ProbeDialsTakeSlots: an HTTP/2 stream that asks for trailers (or is gRPC)
// first finds out whether its upstream speaks HTTP/2 (speaksH2), dialling it, before it
// takes a slot of its user's budget (proxy.max_connections_per_uid). A hostile agent sends
// many such streams on one connection to an original destination that accepts and never
// answers: every stream holds an upstream socket for up to dialTimeout+handshakeTimeout (20
// s), none of them counted. With 100 streams per connection, one user holds 100 times as
// many descriptors as its limit allows (16384 connections: 1.6 million sockets, past any
// process's RLIMIT_NOFILE), and avpd's accept, journal and netlink sockets then fail with
// EMFILE for every user.
func TestDoSH2ProbeDialsTakeSlots(t *testing.T) {
	e := newRTEnv(t)
	const limit = 2
	e.setUIDLimit(limit)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: tarpitAddr})
	c := e.h2Client(t, addr)
	const streams = 50
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+rawHost+"/v1/x", nil)
			req.Header.Set("Te", "trailers")
			if resp, err := c.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) && e.tarpits.Load() < streams {
		time.Sleep(20 * time.Millisecond)
	}
	got, slots := e.tarpits.Load(), e.openSlots(1001)
	cancel()
	e.releaseTarpit()
	wg.Wait()
	if got > limit {
		t.Fatalf("one HTTP/2 connection of uid 1001 (limit %d) made avpd open %d upstream sockets at once; slots counted for the user: %d", limit, got, slots)
	}
}

// TestDoSReloadNotStalledByAgentDestination: an injecting request holds the reload gate
// (read side) until its headers are written upstream, and that includes dialling and
// handshaking with the original destination, which the agent chooses (any IP on port 443,
// with a bound SNI). A destination that accepts and never answers holds the gate for up to
// dialTimeout+handshakeTimeout (20 s). A reload (SetPolicy) then waits, and while it waits
// sync.RWMutex lets no new reader in: every other user's request, injecting or not, stalls
// in prepare until the hostile request gives up. One agent can do this to every reload.
func TestDoSReloadNotStalledByAgentDestination(t *testing.T) {
	e := newRTEnv(t)
	hostile := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: tarpitAddr})
	victim := e.agentListener(t, inject.Facts{UID: 1002, SNI: rawHost, OrigDst: netip.MustParseAddrPort("127.0.0.1:443")})

	// The victim works before.
	vc := e.dialAgent(t, victim, "http/1.1")
	vbr := bufio.NewReader(vc)
	getReq := "GET /v1/models HTTP/1.1\r\nHost: " + rawHost + "\r\n" + rawAuthLine + "\r\n"
	if code := rtDo(t, vc, vbr, getReq); code != 200 {
		t.Fatalf("victim before: %d", code)
	}

	hc := e.dialAgent(t, hostile, "http/1.1")
	io.WriteString(hc, getReq)
	for deadline := time.Now().Add(2 * time.Second); e.tarpits.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the hostile request never reached the tarpit")
		}
		time.Sleep(10 * time.Millisecond)
	}

	cfg, _ := config.Parse("bindings.yaml", []byte(rtConfig))
	reloaded := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		e.srv.SetPolicy(inject.NewPolicy(cfg))
		reloaded <- time.Since(start)
	}()
	time.Sleep(100 * time.Millisecond)

	// Another user's plain request, verbatim (no placeholder), while the reload waits.
	done := make(chan int, 1)
	start := time.Now()
	go func() {
		vc2 := e.dialAgent(t, victim, "http/1.1")
		done <- rtDo(t, vc2, bufio.NewReader(vc2), "GET /v1/models HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n")
	}()
	var failed []string
	answered := false
	select {
	case code := <-done:
		answered = true
		if time.Since(start) > time.Second || code != 200 {
			failed = append(failed, fmt.Sprintf("another user's request took %v (status %d)", time.Since(start), code))
		}
	case <-time.After(3 * time.Second):
		failed = append(failed, "another user's request (uid 1002, no placeholder) got no answer within 3 s while a reload waited for uid 1001's request to the tarpit")
	}
	select {
	case d := <-reloaded:
		if d > time.Second {
			failed = append(failed, fmt.Sprintf("the reload took %v", d))
		}
	default:
		failed = append(failed, "the reload had not returned after 3 s")
	}
	// Let go: the hostile handshake fails, and a victim still waiting is answered.
	e.releaseTarpit()
	if !answered {
		select {
		case code := <-done:
			failed = append(failed, fmt.Sprintf("once the tarpit let go, the victim got %d after %v", code, time.Since(start).Round(time.Millisecond)))
		case <-time.After(5 * time.Second):
			failed = append(failed, "the victim got no answer even after the tarpit let go")
		}
	}
	// The hostile request, whose policy was replaced while it dialled, is not injected
	// under the new one: it fails.
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(hc), nil); err != nil || resp.StatusCode != http.StatusBadGateway {
		failed = append(failed, fmt.Sprintf("the hostile request decided before the reload got %v %v, want 502", resp, err))
	}
	if len(failed) > 0 {
		t.Fatal(strings.Join(failed, "; "))
	}
}

// rtDo writes raw and returns the status of the answer.
func rtDo(t *testing.T, c *tls.Conn, br *bufio.Reader, raw string) int {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		return -1
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return -1
	}
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// rtHold waits RT_HOLD (a duration; unset: no wait) before memory is measured, to show
// that what is held outlives the header timeout (30 s) and the idle timeout.
func rtHold(t *testing.T) {
	if d, _ := time.ParseDuration(os.Getenv("RT_HOLD")); d > 0 {
		t.Logf("holding for %v", d)
		time.Sleep(d)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// rtH2Headers is a header block for stream id, as HEADERS + CONTINUATION frames of 16 KiB:
// an injecting POST of a form that announces a 10-byte body, with about pad bytes of
// distinct header values (literals, never indexed: no HPACK trick, the agent sends every
// byte avpd keeps).
func rtH2Headers(id uint32, pad int) []byte {
	var blk bytes.Buffer
	enc := hpack.NewEncoder(&blk)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":authority", rawHost}, {":path", "/v1/chat"},
		{"authorization", "Bearer " + rawPlaceholder}, {"content-type", "application/x-www-form-urlencoded"}, {"content-length", "10"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	val := strings.Repeat("v", 8000)
	for i := 0; blk.Len() < pad; i++ {
		enc.WriteField(hpack.HeaderField{Name: fmt.Sprintf("x-pad-%d", i), Value: fmt.Sprintf("%d-%d", id, i) + val, Sensitive: true})
	}
	b := blk.Bytes()
	var out bytes.Buffer
	first := true
	for len(b) > 0 {
		n := min(len(b), 16<<10)
		typ, flags := byte(frContinuation), byte(0)
		if first {
			typ = frHeaders
		}
		if n == len(b) {
			flags = flEndHeaders
		}
		out.Write([]byte{byte(n >> 16), byte(n >> 8), byte(n), typ, flags, byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)})
		out.Write(b[:n])
		b = b[n:]
		first = false
	}
	return out.Bytes()
}

// h2Preface opens an HTTP/2 connection by hand and drains what the server sends in the
// background, logging GOAWAY and RST_STREAM.
func h2Preface(t *testing.T, c *tls.Conn) {
	t.Helper()
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Fatal("no h2")
	}
	io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	c.Write([]byte{0, 0, 0, frSettings, 0, 0, 0, 0, 0})
	// The server's SETTINGS come first; ack them, then drop whatever else it sends.
	var fh [9]byte
	if _, err := io.ReadFull(c, fh[:]); err != nil || fh[3] != frSettings {
		t.Fatalf("server preface: %v %v", fh, err)
	}
	io.CopyN(io.Discard, c, int64(fh[0])<<16|int64(fh[1])<<8|int64(fh[2]))
	c.Write([]byte{0, 0, 0, frSettings, 1, 0, 0, 0, 0})
	go func() {
		for {
			var fh [9]byte
			if _, err := io.ReadFull(c, fh[:]); err != nil {
				return
			}
			p := make([]byte, int(fh[0])<<16|int(fh[1])<<8|int(fh[2]))
			io.ReadFull(c, p)
			if fh[3] == frGoAway && len(p) >= 8 {
				t.Logf("GOAWAY %x %q", p[:8], p[8:])
			}
		}
	}()
}

// TestDoSH2OversizedHeadersRefused: a header list over the limit (64 KiB, not net/http's
// 1 MiB) is not kept. 100 streams of 700 KiB each held 82 MiB of one connection's memory
// while they waited for a body that never came.
func TestDoSH2OversizedHeadersRefused(t *testing.T) {
	e := newRTEnv(t)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: netip.MustParseAddrPort("127.0.0.1:443")})
	base := heapInUse()
	c := e.dialAgent(t, addr, "h2")
	h2Preface(t, c)
	for i := 0; i < 100; i++ {
		if _, err := c.Write(rtH2Headers(uint32(2*i+1), 700<<10)); err != nil {
			break // the server gave up on the connection
		}
	}
	time.Sleep(300 * time.Millisecond)
	if held := int64(heapInUse()) - int64(base); held > 16<<20 {
		t.Fatalf("one HTTP/2 connection holds %.1f MiB in streams with oversized headers", float64(held)/(1<<20))
	}
}

// TestDoSH2StreamsWaitingForBodyAreBounded: streams whose heads fit the limit and whose
// short body never comes each take a slot of the user's budget while they wait, and wait
// no longer than readAheadTimeout. Before, they took no slot (readAhead ran before the
// stream's upstream slot) and waited as long as the agent kept the connection.
func TestDoSH2StreamsWaitingForBodyAreBounded(t *testing.T) {
	old := readAheadTimeout
	// Long enough that all 100 streams are waiting at once on a loaded machine (1.5 s was
	// not, under -race), short enough for a test.
	readAheadTimeout = 5 * time.Second
	t.Cleanup(func() { readAheadTimeout = old })
	e := newRTEnv(t)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: netip.MustParseAddrPort("127.0.0.1:443")})
	c := e.dialAgent(t, addr, "h2")
	h2Preface(t, c)
	const streams = 100
	for i := 0; i < streams; i++ {
		if _, err := c.Write(rtH2Headers(uint32(2*i+1), 40<<10)); err != nil {
			t.Fatal(err, e.logs.String())
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && e.srv.Stats().Requests < streams {
		time.Sleep(20 * time.Millisecond)
	}
	if slots := e.openSlots(1001); slots != streams {
		t.Errorf("%d streams wait for a body, %d slots of their user's budget are counted", streams, slots)
	}
	for deadline := time.Now().Add(10 * time.Second); e.openSlots(1001) > 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if slots := e.openSlots(1001); slots != 0 {
		t.Errorf("after the read-ahead timeout %d streams still wait", slots)
	}
	if n := e.srv.Stats().RefusedByReason["request_body_timeout"]; n != streams {
		t.Errorf("request_body_timeout refusals: %d, want %d", n, streams)
	}
}

// TestDoSH1ConnectionsWaitingForBodyAreBounded: each HTTP/1.1 connection could hold about
// 1 MiB of request head (net/http's default limit) while it waited, with no deadline, for a
// short form body it announced, where the limit's reasoning assumes about 36 KB per
// connection. A head over 64 KiB now gets 431, and a body that does not come within
// readAheadTimeout gets 408.
func TestDoSH1ConnectionsWaitingForBodyAreBounded(t *testing.T) {
	old := readAheadTimeout
	readAheadTimeout = 1500 * time.Millisecond
	t.Cleanup(func() { readAheadTimeout = old })
	e := newRTEnv(t)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: netip.MustParseAddrPort("127.0.0.1:443")})
	head := func(i, size int) string {
		var b strings.Builder
		b.WriteString("POST /v1/chat HTTP/1.1\r\nHost: " + rawHost + "\r\n" + rawAuthLine +
			"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 10\r\n")
		pad := strings.Repeat("v", 4000)
		for j := 0; b.Len() < size; j++ {
			fmt.Fprintf(&b, "X-Pad-%d: %d%s\r\n", j, i, pad)
		}
		b.WriteString("\r\n")
		return b.String()
	}

	big := e.dialAgent(t, addr, "http/1.1")
	go io.WriteString(big, head(0, 200<<10))
	big.SetReadDeadline(time.Now().Add(5 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(big), nil); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("a 200 KiB request head: %v %v, want 431", resp, err)
	}

	base := heapInUse()
	const conns = 32
	var cs []*tls.Conn
	for i := 0; i < conns; i++ {
		c := e.dialAgent(t, addr, "http/1.1")
		if _, err := io.WriteString(c, head(i, 56<<10)); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && e.srv.Stats().Requests < conns+1 {
		time.Sleep(20 * time.Millisecond)
	}
	held := int64(heapInUse()) - int64(base)
	per := held / conns
	t.Logf("heap held %.1f MiB, %.0f KiB per connection", float64(held)/(1<<20), float64(per)/1024)
	if per > 256<<10 {
		t.Errorf("each HTTP/1.1 connection holds %.0f KiB while it waits for its body", float64(per)/1024)
	}
	for _, c := range cs {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("a body that never came: %v %v, want 408", resp, err)
		}
	}
}

// injectingTrailersStream sends, on c, an injecting request that wants HTTP/2 upstream (it
// asks for trailers), until ctx ends.
func injectingTrailersStream(ctx context.Context, c *http.Client) {
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+rawHost+"/v1/x", nil)
	req.Header.Set("Te", "trailers")
	req.Header.Set("Authorization", "Bearer "+rawPlaceholder)
	if resp, err := c.Do(req); err == nil {
		resp.Body.Close()
	}
}

// TestDoSReloadNotStalledByH2Probe: an injecting HTTP/2 stream that wants HTTP/2 upstream
// (trailers, gRPC) first finds out whether the upstream speaks it, with a handshake to the
// original destination, which the agent chooses. That handshake ran under the reload gate;
// to a destination that never answers it held a reload, and every request behind it, for up
// to 20 s.
func TestDoSReloadNotStalledByH2Probe(t *testing.T) {
	e := newRTEnv(t)
	addr := e.agentListener(t, inject.Facts{UID: 1001, SNI: rawHost, OrigDst: tarpitAddr})
	c := e.h2Client(t, addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go injectingTrailersStream(ctx, c)
	for deadline := time.Now().Add(2 * time.Second); e.tarpits.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the stream never reached the tarpit")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cfg, _ := config.Parse("bindings.yaml", []byte(rtConfig))
	reloaded := make(chan struct{})
	go func() {
		e.srv.SetPolicy(inject.NewPolicy(cfg))
		close(reloaded)
	}()
	select {
	case <-reloaded:
	case <-time.After(2 * time.Second):
		e.releaseTarpit()
		<-reloaded
		t.Fatal("a reload waited for an HTTP/2 probe of the agent's chosen destination")
	}
}
