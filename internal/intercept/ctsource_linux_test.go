package intercept

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPeerUIDWhenTheNATMovedTheSourcePort: two sockets of one user on one source port
// (SO_REUSEADDR) to two destinations on 443 both go to the listener, so the NAT moves the
// second to another source port. Its owner was not found (sock_diag looked up the moved
// port), and it was served as nobody's, or refused; conntrack gives the port back.
func TestPeerUIDWhenTheNATMovedTheSourcePort(t *testing.T) {
	requireNetnsPrivileges(t)
	ns, ln := redirectedListener(t)
	reuse := func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		return serr
	}
	var a, b net.Conn
	ns.do(t, func() error {
		var err error
		d := &net.Dialer{Timeout: 5 * time.Second, Control: reuse, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
		if a, err = d.Dial("tcp4", "127.0.0.2:443"); err != nil {
			return err
		}
		d.LocalAddr = a.LocalAddr()
		b, err = d.Dial("tcp4", "127.0.0.3:443")
		return err
	})
	defer a.Close()
	defer b.Close()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	var moved *net.TCPConn
	for range 2 {
		s, err := ln.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if s.RemoteAddr().String() != a.LocalAddr().String() {
			moved = s
		}
	}
	if moved == nil {
		t.Skip("the NAT did not move the second connection's source port here")
	}
	orig, err := OriginalDst(moved)
	if err != nil || orig != netip.MustParseAddrPort("127.0.0.3:443") {
		t.Fatalf("original destination %v %v", orig, err)
	}
	// The lookups run in the namespace, as avpd's do in the agent's; the shared sock_diag
	// socket is opened anew there and closed after.
	resetDiag := closeNetlinkSockets
	var got int64
	ns.do(t, func() error {
		resetDiag()
		defer resetDiag()
		got = peerUID(moved, orig)
		return nil
	})
	if got != int64(os.Geteuid()) {
		t.Fatalf("peerUID of the moved connection (%v, agent socket %v) = %d, want %d", moved.RemoteAddr(), b.LocalAddr(), got, os.Geteuid())
	}
}

// redirectedListener makes a namespace in which TCP to port 443 goes to the returned
// listener on 127.0.0.1, as avpd's rule sends an enrolled user's.
func redirectedListener(t testing.TB) (*testNetns, *net.TCPListener) {
	t.Helper()
	ns := newTestNetns(t)
	var ln *net.TCPListener
	ns.do(t, func() error {
		var err error
		ln, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	t.Cleanup(func() { ln.Close() })
	ns.nft(t, fmt.Sprintf(`table inet avp_test {
	chain output {
		type nat hook output priority -100; policy accept;
		tcp dport 443 redirect to :%d
	}
}
`, ln.Addr().(*net.TCPAddr).Port))
	return ns, ln
}

// BenchmarkPeerUIDRedirected is peerUID as avpd runs it on each new connection: a
// connection redirected by the NAT, whose owner is found with conntrack and sock_diag.
func BenchmarkPeerUIDRedirected(b *testing.B) {
	requireNetnsPrivileges(b)
	ns, ln := redirectedListener(b)
	var c net.Conn
	ns.do(b, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", "127.0.0.2:443", 5*time.Second)
		return err
	})
	defer c.Close()
	s, err := ln.AcceptTCP()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	orig, err := OriginalDst(s)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	ns.do(b, func() error {
		closeNetlinkSockets()
		defer closeNetlinkSockets()
		// What is measured is the lookup through conntrack, not its fallback.
		local, remote := s.LocalAddr().(*net.TCPAddr).AddrPort(), s.RemoteAddr().(*net.TCPAddr).AddrPort()
		if src, err := ctSource(local, remote); err != nil || src != remote {
			return fmt.Errorf("conntrack: %v %v", src, err)
		}
		b.ResetTimer()
		for range b.N {
			if peerUID(s, orig) != int64(os.Geteuid()) {
				return errors.New("not found")
			}
		}
		b.StopTimer()
		return nil
	})
}

// closeNetlinkSockets closes the shared sock_diag and ctnetlink sockets, so that the next
// lookup opens them in the namespace of the thread it runs on (as avpd's are in the
// agents' namespace).
func closeNetlinkSockets() {
	diag.mu.Lock()
	diag.close()
	diag.mu.Unlock()
	ct.mu.Lock()
	ct.close()
	ct.mu.Unlock()
}
