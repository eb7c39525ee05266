package intercept

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// requireNetnsPrivileges skips (on a developer machine) or fails (in CI) when
// the test cannot create network namespaces and nftables rules.
func requireNetnsPrivileges(t testing.TB) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "needs root to create a network namespace and nftables rules"
	} else {
		for _, bin := range []string{"ip", "nft"} {
			if _, err := exec.LookPath(bin); err != nil {
				reason = fmt.Sprintf("needs the %s command: %v", bin, err)
				break
			}
		}
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "" {
		t.Skip(reason)
	}
	t.Fatal(reason)
}

// testNetns is a named network namespace created with "ip netns add", so
// that both exec'd tools ("ip netns exec") and locked Go threads (setns) can
// enter it. The test process itself never leaves the host namespace.
type testNetns struct {
	name string
}

func runCmd(t testing.TB, stdin string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newTestNetns(t testing.TB) *testNetns {
	t.Helper()
	var b [4]byte
	rand.Read(b[:])
	ns := &testNetns{name: "avp-od-" + hex.EncodeToString(b[:])}
	runCmd(t, "", "ip", "netns", "add", ns.name)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "ip", "netns", "del", ns.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", ns.name, err, out)
		}
	})
	runCmd(t, "", "ip", "-n", ns.name, "link", "set", "lo", "up")
	return ns
}

func (ns *testNetns) nft(t testing.TB, ruleset string) {
	t.Helper()
	runCmd(t, ruleset, "ip", "netns", "exec", ns.name, "nft", "-f", "-")
}

// do runs fn on an OS thread that has been moved into the namespace. Sockets
// belong to the namespace they were created in, so listeners and dialled
// conns made by fn keep working from any goroutine afterwards. The goroutine
// exits still locked to its thread, which makes the runtime destroy that
// thread instead of reusing it for unrelated goroutines.
func (ns *testNetns) do(t testing.TB, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	var inNS func()
	inNS = func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// This is the process's main thread, whose namespace is what
			// /proc/<pid>/ns/net shows and which the runtime would wedge
			// rather than destroy. Leave it alone: run on another thread,
			// which the locked main thread cannot be lent to.
			done := make(chan struct{})
			go func() { defer close(done); inNS() }()
			<-done
			runtime.UnlockOSThread()
			return
		}
		// From here on the thread is never unlocked, on purpose.
		fd, err := unix.Open(filepath.Join("/run/netns", ns.name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open netns: %w", err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}
	go inNS()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("timed out inside the test namespace")
	}
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

func TestOriginalDst(t *testing.T) {
	requireNetnsPrivileges(t)
	hostNS, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if now, _ := os.Readlink("/proc/self/ns/net"); now != hostNS {
			t.Errorf("test process network namespace changed from %s to %s", hostNS, now)
		}
	}()

	ns := newTestNetns(t)
	var ln4, ln6, lnDual *net.TCPListener
	ns.do(t, func() error {
		var err error
		if ln4, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		if ln6, err = net.ListenTCP("tcp6", &net.TCPAddr{IP: net.IPv6loopback, Port: ln4.Addr().(*net.TCPAddr).Port}); err != nil {
			return err
		}
		// A dual-stack [::] listener sees IPv4 clients with v4-mapped
		// local addresses; OriginalDst must still ask the IPv4 way.
		lnDual, err = net.ListenTCP("tcp", &net.TCPAddr{})
		return err
	})
	for _, l := range []*net.TCPListener{ln4, ln6, lnDual} {
		t.Cleanup(func() { l.Close() })
	}
	port := ln4.Addr().(*net.TCPAddr).Port
	dualPort := lnDual.Addr().(*net.TCPAddr).Port
	listeners := []netip.AddrPort{addrPort(ln4.Addr()), addrPort(ln6.Addr()), addrPort(lnDual.Addr())}

	// Only the redirected service ports match, so connections made to the
	// listeners themselves are never rewritten.
	ns.nft(t, fmt.Sprintf(`table inet avp_test {
	chain output {
		type nat hook output priority -100; policy accept;
		tcp dport 443 redirect to :%d
		tcp dport 8443 redirect to :%d
	}
}
`, port, dualPort))

	cases := []struct {
		name     string
		dial     string
		ln       *net.TCPListener
		want     netip.AddrPort
		wantSelf bool
	}{
		{"ipv4 redirected", "127.0.0.2:443", ln4, netip.MustParseAddrPort("127.0.0.2:443"), false},
		{"ipv6 redirected", "[::1]:443", ln6, netip.MustParseAddrPort("[::1]:443"), false},
		{"ipv4 on dual-stack listener", "127.0.0.3:8443", lnDual, netip.MustParseAddrPort("127.0.0.3:8443"), false},
		{"ipv4 direct to listener", fmt.Sprintf("127.0.0.1:%d", port), ln4, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)), true},
		{"ipv6 direct to listener", fmt.Sprintf("[::1]:%d", port), ln6, netip.AddrPortFrom(netip.IPv6Loopback(), uint16(port)), true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var client net.Conn
			ns.do(t, func() error {
				var err error
				client, err = (&net.Dialer{Timeout: 5 * time.Second}).Dial("tcp", tc.dial)
				return err
			})
			defer client.Close()
			tc.ln.SetDeadline(time.Now().Add(5 * time.Second))
			server, err := tc.ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer server.Close()
			server.SetDeadline(time.Now().Add(5 * time.Second))
			if server.RemoteAddr().String() != client.LocalAddr().String() {
				t.Fatalf("accepted %v, but dialled from %v", server.RemoteAddr(), client.LocalAddr())
			}

			got, err := OriginalDst(server)
			if err != nil {
				t.Fatalf("OriginalDst (local %v): %v", server.LocalAddr(), err)
			}
			if got != tc.want {
				t.Fatalf("OriginalDst = %v, want %v (local address %v)", got, tc.want, server.LocalAddr())
			}
			if self := IsSelf(got, listeners); self != tc.wantSelf {
				t.Errorf("IsSelf(%v) = %v, want %v", got, self, tc.wantSelf)
			}

			// The conn must still work normally after the syscall.
			if _, err := client.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1)
			if _, err := server.Read(buf); err != nil || !bytes.Equal(buf, []byte("x")) {
				t.Fatalf("read after OriginalDst: %q, %v", buf, err)
			}
		})
	}
}

// TestOriginalDstNoConntrack checks the error for a connection that netfilter
// never tracked: a fresh namespace without any NAT rules.
func TestOriginalDstNoConntrack(t *testing.T) {
	requireNetnsPrivileges(t)
	ns := newTestNetns(t)
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			var (
				ln     *net.TCPListener
				client net.Conn
			)
			ns.do(t, func() error {
				var err error
				ip := net.IPv4(127, 0, 0, 1)
				if network == "tcp6" {
					ip = net.IPv6loopback
				}
				if ln, err = net.ListenTCP(network, &net.TCPAddr{IP: ip}); err != nil {
					return err
				}
				client, err = (&net.Dialer{Timeout: 5 * time.Second}).Dial(network, ln.Addr().String())
				return err
			})
			defer ln.Close()
			defer client.Close()
			ln.SetDeadline(time.Now().Add(5 * time.Second))
			server, err := ln.AcceptTCP()
			if err != nil {
				t.Fatal(err)
			}
			defer server.Close()
			got, err := OriginalDst(server)
			if err == nil {
				t.Fatalf("OriginalDst = %v without a conntrack entry, want an error", got)
			}
			t.Logf("error: %v", err)
			if !strings.HasPrefix(err.Error(), "get original destination: ") || !strings.Contains(err.Error(), "conntrack") {
				t.Errorf("error %q", err)
			}
		})
	}
}

func TestIsSelf(t *testing.T) {
	p := netip.MustParseAddrPort
	listeners := []netip.AddrPort{p("127.0.0.1:8443"), p("[::1]:8443"), p("192.0.2.10:9443")}
	cases := []struct {
		orig netip.AddrPort
		want bool
	}{
		{p("127.0.0.1:8443"), true},
		{p("[::1]:8443"), true},
		{p("[::ffff:127.0.0.1]:8443"), true},
		{p("127.0.0.5:8443"), true}, // any loopback address reaches a loopback listener
		{p("0.0.0.0:8443"), true},
		{p("[::]:8443"), true},
		{p("192.0.2.10:9443"), true},
		{p("[::ffff:192.0.2.10]:9443"), true},
		{p("192.0.2.10:8443"), false},
		{p("192.0.2.11:9443"), false},
		{p("127.0.0.1:9443"), false}, // that listener is not on loopback
		{p("127.0.0.1:443"), false},
		{p("93.184.216.34:443"), false},
	}
	for _, tc := range cases {
		if got := IsSelf(tc.orig, listeners); got != tc.want {
			t.Errorf("IsSelf(%v) = %v, want %v", tc.orig, got, tc.want)
		}
	}
	if IsSelf(p("127.0.0.1:8443"), nil) {
		t.Error("IsSelf with no listeners")
	}
	if !IsSelf(p("127.0.0.1:7000"), []netip.AddrPort{p("[::]:7000")}) {
		t.Error("loopback destination not matched to a wildcard listener")
	}
}

func TestOriginalDstNil(t *testing.T) {
	if _, err := OriginalDst(nil); err == nil {
		t.Fatal("OriginalDst(nil) returned no error")
	}
}

func TestNtohs(t *testing.T) {
	var b [2]byte
	b[0], b[1] = 0x01, 0xbb                 // 443 in network byte order, as stored in sockaddr
	raw := binary.NativeEndian.Uint16(b[:]) // how the kernel's bytes look as a Go uint16
	if got := ntohs(raw); got != 443 {
		t.Fatalf("ntohs = %d, want 443", got)
	}
}
