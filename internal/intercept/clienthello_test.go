package intercept

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

const testMax = 16 << 10

// captureConn is a net.Conn that records what a TLS client writes and fails
// its reads, so a tls.Client handshake stops right after sending its hello.
type captureConn struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *captureConn) Read([]byte) (int, error) { return 0, io.EOF }
func (c *captureConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(b)
}
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *captureConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// captureHello returns the records a crypto/tls client sends as its first
// flight (exactly its ClientHello) for cfg.
func captureHello(tb testing.TB, cfg *tls.Config) []byte {
	tb.Helper()
	cc := &captureConn{}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = tls.Client(cc, cfg).HandshakeContext(ctx) // fails on Read; we only want the hello
	cc.mu.Lock()
	defer cc.mu.Unlock()
	out := bytes.Clone(cc.buf.Bytes())
	if len(out) < 5+4 {
		tb.Fatalf("captured only %d bytes", len(out))
	}
	return out
}

// recordsToMsg strips record headers and concatenates record payloads.
func recordsToMsg(tb testing.TB, recs []byte) []byte {
	tb.Helper()
	var msg []byte
	for len(recs) > 0 {
		if len(recs) < 5 {
			tb.Fatalf("short record header")
		}
		n := int(recs[3])<<8 | int(recs[4])
		if recs[0] != 22 || len(recs) < 5+n {
			tb.Fatalf("bad record type %d or length %d", recs[0], n)
		}
		msg = append(msg, recs[5:5+n]...)
		recs = recs[5+n:]
	}
	return msg
}

// frame wraps msg into handshake records, cutting it at the given offsets.
func frame(msg []byte, cuts ...int) []byte {
	var out []byte
	prev := 0
	for _, c := range append(cuts, len(msg)) {
		part := msg[prev:c]
		out = append(out, 22, 3, 1, byte(len(part)>>8), byte(len(part)))
		out = append(out, part...)
		prev = c
	}
	return out
}

// addExtension appends an extension to a ClientHello handshake message and
// fixes up the lengths.
func addExtension(tb testing.TB, msg []byte, typ uint16, data []byte) []byte {
	tb.Helper()
	m := bytes.Clone(msg)
	off := 4 + 2 + 32
	off += 1 + int(m[off])                      // session id
	off += 2 + (int(m[off])<<8 | int(m[off+1])) // cipher suites
	off += 1 + int(m[off])                      // compression
	extLen := int(m[off])<<8 | int(m[off+1])    // extensions
	ext := []byte{byte(typ >> 8), byte(typ), byte(len(data) >> 8), byte(len(data))}
	ext = append(ext, data...)
	extLen += len(ext)
	m[off], m[off+1] = byte(extLen>>8), byte(extLen)
	m = append(m, ext...)
	body := len(m) - 4
	m[1], m[2], m[3] = byte(body>>16), byte(body>>8), byte(body)
	if off+2+extLen != len(m) {
		tb.Fatalf("addExtension: extensions block is not at the end")
	}
	return m
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(tb testing.TB) (client, server *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		c.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s
}

func TestPeekClientHelloRealHellos(t *testing.T) {
	cases := []struct {
		name     string
		cfg      *tls.Config
		wantSNI  string
		wantALPN []string
	}{
		{"sni+alpn", &tls.Config{ServerName: "api.example.com", NextProtos: []string{"h2", "http/1.1"}}, "api.example.com", []string{"h2", "http/1.1"}},
		{"uppercase trailing dot", &tls.Config{ServerName: "API.Example.COM."}, "api.example.com", nil},
		{"no sni", &tls.Config{InsecureSkipVerify: true}, "", nil},
		{"ip literal sends no sni", &tls.Config{ServerName: "192.0.2.7"}, "", nil},
		{"tls12 only", &tls.Config{ServerName: "old.example.org", MaxVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}, "old.example.org", []string{"http/1.1"}},
		{"underscore", &tls.Config{ServerName: "_acme.example.net", InsecureSkipVerify: true}, "_acme.example.net", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			hello := captureHello(t, tc.cfg)
			client, server := tcpPair(t)
			go client.Write(hello)
			info, raw, err := PeekClientHello(server, 5*time.Second, testMax)
			if err != nil {
				t.Fatalf("PeekClientHello: %v", err)
			}
			if !bytes.Equal(raw, hello) {
				t.Fatalf("raw bytes differ from what the client sent (%d vs %d bytes)", len(raw), len(hello))
			}
			if info.ServerName != tc.wantSNI {
				t.Errorf("ServerName = %q, want %q", info.ServerName, tc.wantSNI)
			}
			if strings.Join(info.ALPN, ",") != strings.Join(tc.wantALPN, ",") {
				t.Errorf("ALPN = %q, want %q", info.ALPN, tc.wantALPN)
			}
			if info.HasECH {
				t.Errorf("HasECH = true for a client without ECH")
			}
		})
	}
}

// TestPeekThenTerminate checks that the peeked bytes, replayed through
// PrefixConn, let crypto/tls complete a real handshake with a CA leaf.
func TestPeekThenTerminate(t *testing.T) {
	ca, err := LoadOrCreateCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	client, server := tcpPair(t)
	deadline := time.Now().Add(10 * time.Second)
	client.SetDeadline(deadline)
	server.SetDeadline(deadline)

	errc := make(chan error, 1)
	go func() {
		tc := tls.Client(client, &tls.Config{ServerName: "vault.example.com", RootCAs: pool, NextProtos: []string{"h2"}})
		if err := tc.Handshake(); err != nil {
			errc <- err
			return
		}
		_, err := tc.Write([]byte("ping"))
		errc <- err
	}()

	info, raw, err := PeekClientHello(server, 5*time.Second, testMax)
	if err != nil {
		t.Fatal(err)
	}
	if info.ServerName != "vault.example.com" {
		t.Fatalf("ServerName = %q", info.ServerName)
	}
	pc := NewPrefixConn(server, raw)
	if pc.Underlying() != server {
		t.Fatalf("Underlying() is not the original conn")
	}
	ts := tls.Server(pc, &tls.Config{GetCertificate: ca.GetCertificate, NextProtos: []string{"h2"}})
	if err := ts.Handshake(); err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	if p := ts.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Errorf("negotiated %q, want h2", p)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(ts, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("client: %v", err)
	}
}

// TestPeekClientHelloSegmented feeds a large hello in 100-byte TCP writes.
func TestPeekClientHelloSegmented(t *testing.T) {
	hello := captureHello(t, &tls.Config{ServerName: "segments.example.com", NextProtos: []string{"h2"}})
	t.Logf("ClientHello is %d bytes", len(hello))
	if len(hello) < 1000 {
		t.Logf("hello is smaller than expected (no post-quantum key share?); still split into %d writes", (len(hello)+99)/100)
	}
	client, server := tcpPair(t)
	client.SetNoDelay(true)
	go func() {
		for off := 0; off < len(hello); off += 100 {
			end := min(off+100, len(hello))
			if _, err := client.Write(hello[off:end]); err != nil {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	info, raw, err := PeekClientHello(server, 5*time.Second, testMax)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, hello) {
		t.Fatalf("raw differs from hello")
	}
	if info.ServerName != "segments.example.com" || len(info.ALPN) != 1 || info.ALPN[0] != "h2" {
		t.Fatalf("info = %+v", info)
	}
}

// TestPeekClientHelloMultiRecord re-frames a real hello into several TLS
// records, including cuts inside the 4-byte handshake header, and checks
// that nothing after the hello is consumed.
func TestPeekClientHelloMultiRecord(t *testing.T) {
	msg := recordsToMsg(t, captureHello(t, &tls.Config{ServerName: "records.example.com", NextProtos: []string{"h2", "http/1.1"}}))
	extra := []byte{23, 3, 3, 0, 2, 'h', 'i'} // a following record that must stay unread
	splits := [][]int{{1}, {2}, {3}, {4}, {5}, {100}, {len(msg) / 2}, {len(msg) - 1}, {1, 2, 3}, {10, 500, len(msg) - 2}}
	for _, cuts := range splits {
		framed := frame(msg, cuts...)
		client, server := net.Pipe()
		go func() {
			client.Write(append(bytes.Clone(framed), extra...))
		}()
		info, raw, err := PeekClientHello(server, 5*time.Second, testMax)
		if err != nil {
			t.Fatalf("cuts %v: %v", cuts, err)
		}
		if !bytes.Equal(raw, framed) {
			t.Fatalf("cuts %v: raw is %d bytes, want exactly the %d framed bytes", cuts, len(raw), len(framed))
		}
		if info.ServerName != "records.example.com" || len(info.ALPN) != 2 {
			t.Fatalf("cuts %v: info = %+v", cuts, info)
		}
		server.SetReadDeadline(time.Now().Add(5 * time.Second))
		rest := make([]byte, len(extra))
		if _, err := io.ReadFull(server, rest); err != nil || !bytes.Equal(rest, extra) {
			t.Fatalf("cuts %v: bytes after the hello: %q, %v", cuts, rest, err)
		}
		client.Close()
		server.Close()
	}
}

func TestPeekClientHelloECH(t *testing.T) {
	msg := recordsToMsg(t, captureHello(t, &tls.Config{ServerName: "public.example.com"}))
	msg = addExtension(t, msg, 0xfe0d, []byte{0, 0, 1, 0, 1, 7, 0, 0, 0, 0})
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	go client.Write(frame(msg))
	info, _, err := PeekClientHello(server, 5*time.Second, testMax)
	if err != nil {
		t.Fatal(err)
	}
	if !info.HasECH || info.ServerName != "public.example.com" {
		t.Fatalf("info = %+v, want HasECH with outer name", info)
	}
}

func TestPeekClientHelloNotTLS(t *testing.T) {
	hello := captureHello(t, &tls.Config{ServerName: "x.example.com"})
	serverHello := bytes.Clone(hello)
	serverHello[5] = 2 // handshake type ServerHello
	cases := map[string][]byte{
		"http":          []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
		"one byte":      []byte("G"),
		"ssh":           []byte("SSH-2.0-OpenSSH_9.2\r\n"),
		"sslv2 version": {22, 2, 0},
		"bad minor":     {22, 3, 9},
		"server hello":  serverHello,
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			client, server := tcpPair(t)
			if _, err := client.Write(in); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_, raw, err := PeekClientHello(server, 5*time.Second, testMax)
			if !errors.Is(err, ErrNotTLS) {
				t.Fatalf("err = %v, want ErrNotTLS", err)
			}
			if el := time.Since(start); el > time.Second {
				t.Errorf("took %v; non-TLS input should be rejected without waiting", el)
			}
			if !bytes.HasPrefix(in, raw) || len(raw) == 0 {
				t.Errorf("raw %q is not a non-empty prefix of the input", raw)
			}
		})
	}
}

func TestPeekClientHelloTruncated(t *testing.T) {
	hello := captureHello(t, &tls.Config{ServerName: "slow.example.com"})
	half := hello[:len(hello)/2]
	client, server := tcpPair(t)
	if _, err := client.Write(half); err != nil {
		t.Fatal(err)
	}
	const timeout = 300 * time.Millisecond
	start := time.Now()
	_, raw, err := PeekClientHello(server, timeout, testMax)
	el := time.Since(start)
	if err == nil {
		t.Fatal("no error for a truncated hello")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("err = %v, want a deadline error", err)
	}
	if el < timeout || el > timeout+2*time.Second {
		t.Errorf("returned after %v, want about %v", el, timeout)
	}
	if !bytes.Equal(raw, half) {
		t.Errorf("raw is %d bytes, want the %d bytes sent", len(raw), len(half))
	}

	// The deadline must have been cleared: a later read waits for data
	// instead of failing at once.
	go func() {
		time.Sleep(50 * time.Millisecond)
		client.Write(hello[len(half):])
	}()
	buf := make([]byte, len(hello)-len(half))
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatalf("read after PeekClientHello: %v", err)
	}
}

func TestPeekClientHelloEOF(t *testing.T) {
	hello := captureHello(t, &tls.Config{ServerName: "eof.example.com"})
	for _, in := range [][]byte{nil, hello[:3], hello[:20]} {
		client, server := tcpPair(t)
		client.Write(in)
		client.CloseWrite()
		_, raw, err := PeekClientHello(server, 5*time.Second, testMax)
		if err == nil || !bytes.Equal(raw, in) {
			t.Fatalf("input %d bytes: raw %d bytes, err %v", len(in), len(raw), err)
		}
		if len(in) == 0 && !errors.Is(err, io.EOF) {
			t.Errorf("empty input: err = %v, want EOF", err)
		}
		if len(in) > 0 && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%d bytes: err = %v, want unexpected EOF", len(in), err)
		}
	}
}

func TestPeekClientHelloOversize(t *testing.T) {
	hello := captureHello(t, &tls.Config{ServerName: "big.example.com"})
	t.Run("record larger than max", func(t *testing.T) {
		client, server := tcpPair(t)
		go client.Write(hello)
		_, _, err := PeekClientHello(server, 5*time.Second, 256)
		if err == nil || !strings.Contains(err.Error(), "exceeds") {
			t.Fatalf("err = %v, want an exceeds-max error", err)
		}
	})
	t.Run("declared length larger than max", func(t *testing.T) {
		// One small record announcing a 100000-byte ClientHello: rejected at
		// once, without waiting for the rest.
		msg := recordsToMsg(t, hello)[:200]
		msg[1], msg[2], msg[3] = 0x01, 0x86, 0xa0
		client, server := tcpPair(t)
		client.Write(frame(msg))
		start := time.Now()
		_, _, err := PeekClientHello(server, 5*time.Second, testMax)
		if err == nil || !strings.Contains(err.Error(), "exceeds") {
			t.Fatalf("err = %v, want an exceeds-max error", err)
		}
		if time.Since(start) > time.Second {
			t.Errorf("waited for bytes it would reject anyway")
		}
	})
	t.Run("many records beyond max", func(t *testing.T) {
		msg := recordsToMsg(t, hello)
		msg[1], msg[2], msg[3] = 0, 0x7f, 0xff // claims 32767 bytes, within the 24-bit field
		var framed []byte
		for len(framed) < 2*testMax {
			framed = append(framed, frame(msg[:1000])...)
		}
		client, server := tcpPair(t)
		go client.Write(framed)
		_, raw, err := PeekClientHello(server, 5*time.Second, testMax)
		if err == nil || !strings.Contains(err.Error(), "exceeds") {
			t.Fatalf("err = %v, want an exceeds-max error", err)
		}
		if len(raw) > testMax+1024 {
			t.Errorf("read %d bytes, far past max", len(raw))
		}
	})
}

func TestParseClientHello(t *testing.T) {
	msg := recordsToMsg(t, captureHello(t, &tls.Config{ServerName: "parse.example.com", NextProtos: []string{"h2"}}))
	if _, err := ParseClientHello(msg); err != nil {
		t.Fatalf("real hello: %v", err)
	}
	// Every truncation (with a fixed-up header length, so the body parser
	// itself has to notice) must fail cleanly.
	for n := 0; n < len(msg); n++ {
		m := bytes.Clone(msg[:n])
		if n >= 4 {
			body := n - 4
			m[1], m[2], m[3] = byte(body>>16), byte(body>>8), byte(body)
		}
		if _, err := ParseClientHello(m); err == nil && n < 4+2+32+1+2+1 {
			t.Fatalf("truncated to %d bytes: no error", n)
		}
	}
	if _, err := ParseClientHello(append(bytes.Clone(msg), 0)); err == nil {
		t.Error("trailing byte accepted")
	}

	sniMsg := func(name string) []byte {
		// A minimal hello with only a server_name extension.
		m := []byte{1, 0, 0, 0, 3, 3}
		m = append(m, make([]byte, 32)...)
		m = append(m, 0, 0, 2, 0x13, 0x01, 1, 0, 0, 0)
		m = addExtension(t, m, 0, append([]byte{byte((len(name) + 3) >> 8), byte(len(name) + 3), 0, byte(len(name) >> 8), byte(len(name))}, name...))
		return m
	}
	for _, bad := range []string{"exa mple.com", "a..b", ".a", "a/b", "evil\x00.com", "ünï.com", strings.Repeat("a", 64) + ".com", "", "."} {
		if info, err := ParseClientHello(sniMsg(bad)); err == nil {
			t.Errorf("server_name %q accepted as %q", bad, info.ServerName)
		}
	}
	for in, want := range map[string]string{"Example.COM": "example.com", "a-b_c.d.": "a-b_c.d", "xn--nxasmq6b.example": "xn--nxasmq6b.example"} {
		info, err := ParseClientHello(sniMsg(in))
		if err != nil || info.ServerName != want {
			t.Errorf("server_name %q: got %q, %v; want %q", in, info.ServerName, err, want)
		}
	}
	dup := addExtension(t, sniMsg("a.example"), 0, []byte{0, 4, 0, 0, 1, 'b'})
	if _, err := ParseClientHello(dup); err == nil {
		t.Error("duplicate server_name extension accepted")
	}
	noExt := []byte{1, 0, 0, 0, 3, 3}
	noExt = append(noExt, make([]byte, 32)...)
	noExt = append(noExt, 0, 0, 2, 0x00, 0x2f, 1, 0)
	noExt[3] = byte(len(noExt) - 4)
	if info, err := ParseClientHello(noExt); err != nil || info.ServerName != "" {
		t.Errorf("hello without extensions: %+v, %v", info, err)
	}
}

func TestPrefixConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go a.Write([]byte(" world"))
	pc := NewPrefixConn(b, []byte("hello"))
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := pc.Read(nil); n != 0 || err != nil || pc.Buffered() != 5 {
		t.Fatalf("zero-length read with a pending prefix: %d, %v", n, err)
	}
	var got []byte
	buf := make([]byte, 2)
	for len(got) < len("hello world") {
		n, err := pc.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
		if len(got) <= 5 && pc.Buffered() != 5-len(got) {
			t.Fatalf("Buffered() = %d after %d bytes", pc.Buffered(), len(got))
		}
	}
	if string(got) != "hello world" {
		t.Fatalf("got %q", got)
	}
	if pc.Underlying() != b {
		t.Fatal("Underlying() mismatch")
	}
	if NewPrefixConn(b, nil).Buffered() != 0 {
		t.Fatal("empty prefix buffered")
	}
}

// helloSeeds returns real ClientHello records from several client configs.
// They use X25519 only: the default post-quantum key share adds 1.2 KB of
// opaque bytes that teach the fuzzer nothing but make the fuzzing engine's
// input minimization take most of a short -fuzztime run.
func helloSeeds(tb testing.TB) [][]byte {
	x25519 := []tls.CurveID{tls.X25519}
	cfgs := []*tls.Config{
		{ServerName: "seed.example.com", NextProtos: []string{"h2", "http/1.1"}, CurvePreferences: x25519},
		{InsecureSkipVerify: true, CurvePreferences: x25519},
		{ServerName: "tls12.example.com", MaxVersion: tls.VersionTLS12},
	}
	var out [][]byte
	for _, c := range cfgs {
		out = append(out, captureHello(tb, c))
	}
	return out
}

func FuzzParseClientHello(f *testing.F) {
	for _, rec := range helloSeeds(f) {
		msg := recordsToMsg(f, rec)
		f.Add(msg)
		f.Add(addExtension(f, msg, 0xfe0d, []byte{0, 0, 1}))
	}
	f.Add([]byte{1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, msg []byte) {
		info, err := ParseClientHello(msg)
		if err != nil {
			return
		}
		if info.ServerName != "" {
			if n, ok := normalizeDNSName(info.ServerName); !ok || n != info.ServerName {
				t.Fatalf("accepted un-normalized server name %q", info.ServerName)
			}
		}
	})
}

// chunkConn serves data in reads of at most chunk bytes, then io.EOF.
type chunkConn struct {
	captureConn
	data  []byte
	chunk int
}

func (c *chunkConn) Read(b []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(b), c.chunk, len(c.data))
	copy(b, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func FuzzPeek(f *testing.F) {
	for _, rec := range helloSeeds(f) {
		f.Add(rec, uint8(0))
		msg := recordsToMsg(f, rec)
		f.Add(frame(msg, 3, 40), uint8(7))
		f.Add(frame(msg, len(msg)/2), uint8(100))
	}
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		c := &chunkConn{data: data, chunk: int(chunk) + 1}
		info, raw, err := PeekClientHello(c, time.Second, testMax)
		if !bytes.HasPrefix(data, raw) {
			t.Fatalf("raw is not a prefix of the input")
		}
		if err == nil && info.ServerName != strings.ToLower(info.ServerName) {
			t.Fatalf("server name %q not lowercased", info.ServerName)
		}
	})
}
