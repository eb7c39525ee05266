package intercept

import (
	"net"
	"net/netip"
	"os"
	"testing"
)

// TestPeerUIDOwnSocket looks up the client end of a loopback connection, as avpd looks up
// an agent's socket, on IPv4 and IPv6.
func TestPeerUIDOwnSocket(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			addr := "127.0.0.1:0"
			if network == "tcp6" {
				addr = "[::1]:0"
			}
			ln, err := net.Listen(network, addr)
			if err != nil {
				t.Skipf("no %s loopback: %v", network, err)
			}
			defer ln.Close()
			c, err := net.Dial(network, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// On the server side, the peer is the client socket; its "original
			// destination" is the listener itself when no NAT is involved.
			dst := netip.MustParseAddrPort(ln.Addr().String())
			if got := peerUID(s.(*net.TCPConn), dst); got != int64(os.Geteuid()) {
				t.Fatalf("peerUID = %d, want %d", got, os.Geteuid())
			}
			// A tuple with no socket answers -1, and the next lookup still works.
			if got := diag.lookup(netip.MustParseAddrPort("127.0.0.1:1"), dst); got != -1 {
				t.Fatalf("lookup of a missing socket = %d, want -1", got)
			}
			if got := peerUID(s.(*net.TCPConn), dst); got != int64(os.Geteuid()) {
				t.Fatalf("second peerUID = %d, want %d", got, os.Geteuid())
			}
		})
	}
}

func BenchmarkPeerUID(b *testing.B) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	dst := netip.MustParseAddrPort(ln.Addr().String())
	b.ReportAllocs()
	for b.Loop() {
		if peerUID(s.(*net.TCPConn), dst) < 0 {
			b.Fatal("not found")
		}
	}
}
