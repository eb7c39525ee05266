package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// TestUnknownPeerUIDIsRefused: a redirected connection whose owner cannot be found (its
// socket already gone, or its tuple changed by the NAT) was handled as any enrolled user's:
// terminated and injected for every binding without uids, and counted in one shared bucket.
// It is refused instead, before anything is read or dialled.
func TestUnknownPeerUIDIsRefused(t *testing.T) {
	requireNetnsPrivileges(t)
	var dialled atomic.Int64
	e := newRawEnv(t, "sk-REAL-0123456789abcdefghijklmnop", []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		dialled.Add(1)
	}))
	lookupPeerUID = func(*net.TCPConn, netip.AddrPort) int64 { return -1 }
	t.Cleanup(func() { lookupPeerUID = peerUID })

	ns, ln := redirectedListener(t)
	var client net.Conn
	ns.do(t, func() error {
		var err error
		client, err = (&net.Dialer{Timeout: 5 * time.Second}).Dial("tcp4", "127.0.0.2:443")
		return err
	})
	defer client.Close()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	server, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	before := e.srv.Stats().Rejected
	go e.srv.handleConn(context.Background(), server)
	tc := tls.Client(client, &tls.Config{ServerName: rawHost, RootCAs: e.roots})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err == nil {
		t.Fatal("a connection of unknown owner was terminated")
	}
	time.Sleep(50 * time.Millisecond)
	if got := e.srv.Stats().Rejected - before; got != 1 || dialled.Load() != 0 {
		t.Fatalf("rejected %d, upstream dialled %d times; want 1 and 0", got, dialled.Load())
	}
}
