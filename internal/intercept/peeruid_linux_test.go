package intercept

import (
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

// TestPeerUIDOfClosedSocket: a socket in TIME_WAIT has no owner left, and the kernel reports
// UID 0 for it. An agent that sends and closes at once could so have its connection taken
// for root's (not enrolled: spliced through, audited as root). Its UID is unknown instead.
func TestPeerUIDOfClosedSocket(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	src := netip.MustParseAddrPort(c.LocalAddr().String())
	dst := netip.MustParseAddrPort(ln.Addr().String())
	// The client closes first, then the server: the client's end goes to TIME_WAIT.
	c.Close()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.Copy(io.Discard, s)
	s.Close()
	time.Sleep(50 * time.Millisecond)
	if got := diag.lookup(src, dst); got != -1 {
		t.Fatalf("lookup of a socket in TIME_WAIT = %d, want -1 (unknown)", got)
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

// TestPeerUIDOfDualStackSocket: a client on an IPv6 socket that connects to an IPv4 address
// (Java's default, and any dual-stack socket) is reported by the kernel as AF_INET6 with
// IPv4-mapped addresses; it is the same tuple, and its owner is found.
func TestPeerUIDOfDualStackSocket(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no IPv6 sockets: %v", err)
	}
	defer unix.Close(fd)
	unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	dst := netip.MustParseAddrPort(ln.Addr().String())
	sa := &unix.SockaddrInet6{Port: int(dst.Port()), Addr: netip.AddrFrom16(dst.Addr().As16()).As16()}
	if err := unix.Connect(fd, sa); err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := peerUID(s.(*net.TCPConn), dst); got != int64(os.Geteuid()) {
		t.Fatalf("peerUID of a dual-stack client = %d, want %d", got, os.Geteuid())
	}
}
