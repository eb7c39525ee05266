package intercept

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// replayConn serves a fixed byte string, like a socket that already holds a ClientHello.
type replayConn struct {
	net.Conn
	data []byte
	off  int
}

func (r *replayConn) Read(p []byte) (int, error) {
	if r.off >= len(r.data) {
		return 0, io.EOF
	}
	n := copy(p, r.data[r.off:])
	r.off += n
	return n, nil
}
func (r *replayConn) SetReadDeadline(time.Time) error { return nil }

// BenchmarkPeekClientHello measures the per-connection cost of classifying a connection:
// reading and parsing a real crypto/tls ClientHello (with the post-quantum key share, so
// about 1.8 KB) from the socket, as handleConn does before anything else.
func BenchmarkPeekClientHello(b *testing.B) {
	hello := captureHello(b, &tls.Config{ServerName: "api.openai.com", NextProtos: []string{"h2", "http/1.1"}})
	conn := &replayConn{data: hello}
	b.SetBytes(int64(len(hello)))
	b.ReportAllocs()
	for b.Loop() {
		conn.off = 0
		info, _, err := PeekClientHello(conn, time.Second, helloMax)
		if err != nil || info.ServerName != "api.openai.com" {
			b.Fatal(info, err)
		}
	}
}

// BenchmarkParseClientHello is the parse alone, without the record reassembly.
func BenchmarkParseClientHello(b *testing.B) {
	msg := recordsToMsg(b, captureHello(b, &tls.Config{ServerName: "api.openai.com"}))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseClientHello(msg); err != nil {
			b.Fatal(err)
		}
	}
}
