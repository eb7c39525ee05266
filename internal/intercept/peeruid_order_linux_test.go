package intercept

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNATMovedPortIsNotTakenForAnEstablishedSocketsOwner: the NAT moved an agent's source
// port (two of its sockets on one port to two destinations, both redirected) to a port P'
// that another user's established, not redirected, socket to the same destination has.
// The accepted connection's tuple (P' -> destination) is then that other socket's, and
// sock_diag's exact lookup answers with the other user's UID. Conntrack's original tuple
// is the agent socket's own, so it is asked first. Which port the NAT picks cannot be
// chosen, so the collision is built here from real sockets and a conntrack answer the
// test gives: the victim's socket from P' to the destination, the agent's from its own
// port, and conntrack saying the connection came from the agent's port.
func TestNATMovedPortIsNotTakenForAnEstablishedSocketsOwner(t *testing.T) {
	requireNetnsPrivileges(t)
	ns := newTestNetns(t)
	const agent, victim = 1000, 4242
	var dst, agentSrc, victimSrc netip.AddrPort
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	dialAs := func(uid int) (net.Conn, error) {
		prev, _ := unix.SetfsuidRetUid(uid)
		defer unix.SetfsuidRetUid(prev)
		return net.DialTimeout("tcp4", dst.String(), 5*time.Second)
	}
	resetDiag := closeNetlinkSockets
	listener := netip.MustParseAddrPort("127.0.0.1:9443") // avpd's, as the accepted socket's local address
	type answer struct {
		src netip.AddrPort
		err error
	}
	for _, tc := range []struct {
		name string
		ct   func() answer
		want int64
	}{
		// Conntrack says the connection came from the agent's socket: its owner.
		{"conntrack answers", func() answer { return answer{agentSrc, nil} }, agent},
		// Without ctnetlink, the accepted tuple is looked up as it is (today's behaviour).
		{"conntrack cannot answer", func() answer { return answer{err: errors.New("no ctnetlink")} }, victim},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got int64
			ns.do(t, func() error {
				ln, err := net.Listen("tcp4", "127.0.0.3:0")
				if err != nil {
					return err
				}
				defer ln.Close()
				dst = netip.MustParseAddrPort(ln.Addr().String())
				v, err := dialAs(victim)
				if err != nil {
					return err
				}
				a, err := dialAs(agent)
				if err != nil {
					v.Close()
					return err
				}
				conns = append(conns, v, a)
				victimSrc = netip.MustParseAddrPort(v.LocalAddr().String())
				agentSrc = netip.MustParseAddrPort(a.LocalAddr().String())
				for range 2 {
					s, err := ln.Accept()
					if err != nil {
						return err
					}
					conns = append(conns, s)
				}
				prev := ctSource
				ctSource = func(local, remote netip.AddrPort) (netip.AddrPort, error) {
					if local != listener || remote != victimSrc {
						t.Errorf("conntrack asked about %v -> %v, want %v -> %v", remote, local, victimSrc, listener)
					}
					a := tc.ct()
					return a.src, a.err
				}
				defer func() { ctSource = prev }()
				resetDiag()
				defer resetDiag()
				// The accepted connection's remote address is the NAT-moved P', which is
				// the victim socket's port.
				got = peerUIDOf(listener, victimSrc, dst)
				return nil
			})
			if got != tc.want {
				t.Fatalf("peerUID of the agent's connection whose NAT-moved port %d is uid %d's established socket's (agent socket %v) = %d, want %d", victimSrc.Port(), victim, agentSrc, got, tc.want)
			}
		})
	}
}
