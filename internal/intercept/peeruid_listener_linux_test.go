package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// listenAs opens a TCP listener owned by uid (the socket's owner is the creating thread's
// fsuid) on addr, inside ns. Must run inside ns.do.
func listenAsUID(uid int, addr string) (*net.TCPListener, error) {
	prev, _ := unix.SetfsuidRetUid(uid)
	defer unix.SetfsuidRetUid(prev)
	network := "tcp4"
	if strings.HasPrefix(addr, "[") {
		network = "tcp" // a dual-stack listener, as most servers open on [::]
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// TestDiagLookupIgnoresListeners: sock_diag's exact lookup (inet_diag_find_one_icsk)
// is inet_lookup, which tries the established hash and then the LISTEN hash. A tuple with
// no established socket is answered with whatever listener holds its local port, and
// peerUID returns that listener's owner as the agent's UID.
func TestDiagLookupIgnoresListeners(t *testing.T) {
	requireNetnsPrivileges(t)
	ns := newTestNetns(t)
	const victim = 4242
	for _, addr := range []string{"0.0.0.0:0", "127.0.0.1:0", "[::]:0"} {
		var got int64
		var port uint16
		ns.do(t, func() error {
			ln, err := listenAsUID(victim, addr)
			if err != nil {
				return err
			}
			defer ln.Close()
			port = uint16(ln.Addr().(*net.TCPAddr).Port)
			diag.mu.Lock()
			diag.close()
			diag.mu.Unlock()
			defer func() { diag.mu.Lock(); diag.close(); diag.mu.Unlock() }()
			// No socket runs from 127.0.0.1:port to 127.0.0.3:443.
			got = diag.lookup(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), netip.MustParseAddrPort("127.0.0.3:443"))
			return nil
		})
		if got != -1 {
			t.Errorf("sock_diag lookup of a tuple with no established socket (local port %d held by a listener of uid %d on %s) = %d, want -1", port, victim, addr, got)
		}
	}
}

// TestNATMovedPortIsNotTakenForAListenersOwner: an enrolled agent (uid 1000) takes a secret
// bound to another enrolled user only (uids: [4242]). It opens two sockets on one source
// port (SO_REUSEADDR) to two destinations on 443; both are redirected to avpd's listener,
// so the NAT moves the second one's source port to a random P'. avpd looks the moved
// tuple up with sock_diag, which finds no established socket and answers with the
// LISTEN socket that holds local port P' — any listener of any user (here uid 4242's
// dev servers). avpd takes the connection for uid 4242's and injects uid 4242's secret
// into the attacker's request. Retried until P' lands on one of the victim's ports.
func TestNATMovedPortIsNotTakenForAListenersOwner(t *testing.T) {
	requireNetnsPrivileges(t)
	const (
		attacker = 1000
		victim   = 4242
		real     = "sk-REAL-0123456789abcdefghijklmnop"
	)
	ns, ln := redirectedListener(t)
	// The victim's listening sockets (a dev server, a debugger, a language server...):
	// about one port in 20 over the NAT's range, so that a try hits one in ~20.
	var victims []*net.TCPListener
	ns.do(t, func() error {
		for p := 1100; p < 65535; p += 20 {
			if l, err := listenAsUID(victim, fmt.Sprintf("0.0.0.0:%d", p)); err == nil {
				victims = append(victims, l)
			}
		}
		// avpd's sock_diag and ctnetlink sockets live in the agents' namespace, as in
		// production.
		closeNetlinkSockets()
		diag.mu.Lock()
		ok := diag.open()
		diag.mu.Unlock()
		ct.mu.Lock()
		ok = ct.open() && ok
		ct.mu.Unlock()
		if !ok {
			return errors.New("open sock_diag or ctnetlink")
		}
		return nil
	})
	t.Cleanup(func() {
		for _, l := range victims {
			l.Close()
		}
		closeNetlinkSockets()
	})

	// Upstream: reports whether it received the real key.
	ca := newTestCA(t)
	leaf, err := ca.Leaf(rawHost)
	if err != nil {
		t.Fatal(err)
	}
	upLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*leaf}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { upLn.Close() })
	go (&http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") == "Bearer "+real {
			w.Header().Set("X-Upstream-Got", "real")
		} else {
			w.Header().Set("X-Upstream-Got", "placeholder")
		}
	}), ErrorLog: log.New(io.Discard, "", 0)}).Serve(upLn)

	cfg, err := config.Parse("bindings.yaml", []byte(strings.Replace(rawConfig, `paths: ["/**"]`, fmt.Sprintf("uids: [%d]", victim), 1)))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	audit := &eventLog{}
	s, err := NewServer(Options{
		Policy: inject.NewPolicy(cfg), CA: ca, Secrets: mapSecrets{"KEY": real}, Auditor: audit,
		UpstreamTLS: &tls.Config{RootCAs: roots},
		UpstreamDial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, upLn.Addr().String())
		},
		Listeners:  []netip.AddrPort{ln.Addr().(*net.TCPAddr).AddrPort()},
		IsEnrolled: func(uid uint32) bool { return uid == attacker || uid == victim },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); s.Shutdown(context.Background()) })
	go s.Serve(ctx, ln)

	reuse := func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		return serr
	}
	// request sends one request for rawHost with the placeholder over c (the attacker's
	// socket) and says what the upstream got.
	request := func(c net.Conn) string {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		tc := tls.Client(c, &tls.Config{ServerName: rawHost, RootCAs: roots, NextProtos: []string{"http/1.1"}})
		if _, err := io.WriteString(tc, "GET /v1/x HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"Connection: close\r\n\r\n"); err != nil {
			return "error: " + err.Error()
		}
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			return "error: " + err.Error()
		}
		resp.Body.Close()
		return resp.Header.Get("X-Upstream-Got")
	}

	// Control: the attacker's own connection is its own, and its placeholder goes verbatim.
	var plain net.Conn
	ns.do(t, func() error {
		unix.SetfsuidRetUid(attacker)
		var err error
		plain, err = (&net.Dialer{Timeout: 5 * time.Second}).Dial("tcp4", "127.0.0.2:443")
		return err
	})
	if got := request(plain); got != "placeholder" {
		t.Fatalf("control: the attacker's own request: upstream got %q, want placeholder", got)
	}

	for try := 1; try <= 400; try++ {
		var a, b net.Conn
		ns.do(t, func() error {
			unix.SetfsuidRetUid(attacker)
			d := &net.Dialer{Timeout: 5 * time.Second, Control: reuse, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
			var err error
			if a, err = d.Dial("tcp4", "127.0.0.2:443"); err != nil {
				return err
			}
			d.LocalAddr = a.LocalAddr()
			b, _ = d.Dial("tcp4", "127.0.0.3:443") // reset at once when its owner is not found
			return nil
		})
		got := "dial failed"
		if b != nil {
			got = request(b)
		}
		a.Close()
		if got == "real" {
			for _, e := range audit.snapshot() {
				if e.Decision == "inject" {
					t.Errorf("audit: inject %s for uid %d (the socket is uid %d's)", e.Secret, *e.UID, attacker)
				}
			}
			t.Fatalf("try %d: uid %d's request got uid %d's secret injected: avpd took the NAT-moved connection for the owner of the listener on its new source port", try, attacker, victim)
		}
	}
	t.Log("no try was attributed to the victim")
}
