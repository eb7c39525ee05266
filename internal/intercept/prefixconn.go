package intercept

import "net"

// PrefixConn replays already-read bytes before reading from the underlying
// conn.
//
// PeekClientHello has to consume the ClientHello from the socket to learn the
// SNI, but whichever path handles the connection next (splicing to the
// original destination, or crypto/tls terminating it) must see the stream from
// its first byte. PrefixConn puts those bytes back in front. Every method other
// than Read is the underlying conn's.
type PrefixConn struct {
	net.Conn
	prefix []byte
}

// NewPrefixConn returns a conn whose reads yield prefix and then whatever c
// yields. It takes ownership of prefix: the caller must not modify it
// afterwards.
func NewPrefixConn(c net.Conn, prefix []byte) *PrefixConn {
	if len(prefix) == 0 {
		prefix = nil
	}
	return &PrefixConn{Conn: c, prefix: prefix}
}

// Read returns replayed bytes while any remain, never mixing them with fresh
// bytes from the socket in one call, so a short read never blocks on the
// network while buffered data is still pending.
func (p *PrefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		if len(p.prefix) == 0 {
			p.prefix = nil // let the buffer be collected
		}
		return n, nil
	}
	return p.Conn.Read(b)
}

// Underlying returns the wrapped conn, so a caller can reach the concrete
// *net.TCPConn (for OriginalDst, CloseWrite, or kernel splicing once the
// prefix has been drained).
func (p *PrefixConn) Underlying() net.Conn { return p.Conn }

// Buffered reports how many replayed bytes have not been read yet. A caller
// that bypasses Read via Underlying must first forward these bytes itself.
func (p *PrefixConn) Buffered() int { return len(p.prefix) }
