package redirect

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

const (
	enrolledUID = 4242
	otherUID    = 4243
)

// referenceFile is the hand-loadable copy of the ruleset, relative to this
// package's directory (where go test runs).
var referenceFile = filepath.Join("..", "..", "nft", "agent-vault-proxy.nft")

func readReference(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(referenceFile)
	if err != nil {
		t.Fatalf("read reference ruleset: %v", err)
	}
	return string(b)
}

func mustInstall(t *testing.T, fw *Firewall, uids ...uint32) {
	t.Helper()
	if err := fw.Install(uids); err != nil {
		t.Fatal(err)
	}
}

func wantEnrolled(t *testing.T, fw *Firewall, want ...uint32) {
	t.Helper()
	got, err := fw.Enrolled()
	if err != nil {
		t.Fatal(err)
	}
	if want == nil {
		want = []uint32{}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Enrolled() = %v, want %v", got, want)
	}
}

func wantHealthy(t *testing.T, fw *Firewall, want bool) {
	t.Helper()
	got, err := fw.Healthy()
	if err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	if got != want {
		t.Fatalf("Healthy() = %v, want %v", got, want)
	}
}

// TestGoldenRuleset checks that the reference file is exactly what the kernel
// lists after Install, so documentation and code cannot drift apart.
func TestGoldenRuleset(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	mustInstall(t, fw, enrolledUID)

	got := ns.listTable()
	want := stripComments(readReference(t))
	if got != want {
		t.Errorf("nft list table inet %s differs from %s (without # lines)\n--- got:\n%s\n--- want:\n%s",
			TableName, referenceFile, got, want)
	}
}

// TestReferenceFileLoadsWithNft checks that an operator can load the file by
// hand, that the result is the same ruleset, that the Go side recognises a
// hand-loaded table as healthy, and that the documented reload recipe
// replaces rather than duplicates it.
func TestReferenceFileLoadsWithNft(t *testing.T) {
	ns := newNetns(t)
	ref := readReference(t)
	ns.mustNft("-f", referenceFile)
	if got, want := ns.listTable(), stripComments(ref); got != want {
		t.Fatalf("after nft -f, listing differs from the file\n--- got:\n%s\n--- want:\n%s", got, want)
	}

	fw := ns.newFirewall(testPort)
	wantHealthy(t, fw, true)
	wantEnrolled(t, fw, enrolledUID)

	reload := "table inet " + TableName + "\ndelete table inet " + TableName + "\n" + ref
	for range 2 {
		if _, err := ns.nft(reload, "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := ns.listTable(), stripComments(ref); got != want {
		t.Fatalf("after reloading, listing differs from the file\n--- got:\n%s\n--- want:\n%s", got, want)
	}
}

// TestInstallIdempotent checks that installing twice leaves one copy of
// everything and the same listing.
func TestInstallIdempotent(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	mustInstall(t, fw, enrolledUID)
	first := ns.mustNft("list", "ruleset")
	mustInstall(t, fw, enrolledUID)
	second := ns.mustNft("list", "ruleset")
	if first != second {
		t.Fatalf("ruleset changed on second Install\n--- first:\n%s\n--- second:\n%s", first, second)
	}
	for _, s := range []string{"table inet " + TableName, "set " + SetName, "chain " + natChainName, "chain " + filterChainName, "redirect to", "tcp dport 443 reject", "udp dport 443 reject"} {
		if n := strings.Count(second, s); n != 1 {
			t.Errorf("%q appears %d times in the ruleset, want 1:\n%s", s, n, second)
		}
	}
	if tables := ns.mustNft("list", "tables"); strings.TrimSpace(tables) != "table inet "+TableName {
		t.Errorf("nft list tables = %q, want only our table", tables)
	}
	wantHealthy(t, fw, true)
}

// TestInstallReplacesPreviousContents checks that Install discards whatever
// the table held: stray chains and rules, another port, other UIDs.
func TestInstallReplacesPreviousContents(t *testing.T) {
	ns := newNetns(t)
	old := ns.newFirewall(9999)
	mustInstall(t, old, 1, 2, 3)
	ns.mustNft("add", "chain", "inet", TableName, "stray")
	ns.mustNft("add", "rule", "inet", TableName, natChainName, "meta", "skuid", "7", "counter")
	ns.mustNft("add", "set", "inet", TableName, "extra", "{ type ipv4_addr; }")

	fw := ns.newFirewall(testPort)
	wantHealthy(t, fw, false) // two rules in nat_output
	mustInstall(t, fw, enrolledUID)
	if got, want := ns.listTable(), stripComments(readReference(t)); got != want {
		t.Fatalf("Install did not replace the table\n--- got:\n%s\n--- want:\n%s", got, want)
	}
	wantHealthy(t, fw, true)

	mustInstall(t, fw, 30, 10, 20, 10) // unsorted with a duplicate
	wantEnrolled(t, fw, 10, 20, 30)
	mustInstall(t, fw)
	wantEnrolled(t, fw)
	if strings.Contains(ns.listTable(), "elements") {
		t.Errorf("empty set still lists elements:\n%s", ns.listTable())
	}
}

// TestInstallManyUIDs checks that large sets are split across messages (a
// netlink attribute cannot exceed 64 KiB) and still installed atomically,
// and that the documented limit is enforced.
func TestInstallManyUIDs(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	var uids []uint32
	for uid := range uint32(maxUIDs) {
		uids = append(uids, 100000+uid)
	}
	mustInstall(t, fw, uids...)
	wantEnrolled(t, fw, uids...)
	wantHealthy(t, fw, true)

	err := fw.Install(append(uids, 1))
	if err == nil || !strings.Contains(err.Error(), "install nftables table inet "+TableName) {
		t.Fatalf("Install of %d uids: err = %v, want a wrapped limit error", maxUIDs+1, err)
	}
	wantEnrolled(t, fw, uids...) // unchanged
}

// TestEnrollUnenroll checks the set round trip and that both operations are
// idempotent.
func TestEnrollUnenroll(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	mustInstall(t, fw)
	wantEnrolled(t, fw)

	for _, uid := range []uint32{enrolledUID, 1000, enrolledUID, 65534} {
		if err := fw.Enroll(uid); err != nil {
			t.Fatal(err)
		}
	}
	wantEnrolled(t, fw, 1000, enrolledUID, 65534)
	// nft shows real uid numbers, which proves the host byte order.
	if set := ns.mustNft("list", "set", "inet", TableName, SetName); !strings.Contains(set, "elements = { 1000, 4242, 65534 }") {
		t.Errorf("nft list set does not show the uids in order:\n%s", set)
	}

	for range 2 {
		if err := fw.Unenroll(enrolledUID); err != nil {
			t.Fatal(err)
		}
	}
	if err := fw.Unenroll(99999); err != nil {
		t.Fatalf("Unenroll of a uid never enrolled: %v", err)
	}
	wantEnrolled(t, fw, 1000, 65534)
	if err := fw.Unenroll(1000); err != nil {
		t.Fatal(err)
	}
	if err := fw.Unenroll(65534); err != nil {
		t.Fatal(err)
	}
	wantEnrolled(t, fw)
	wantHealthy(t, fw, true)
}

// TestWithoutTable checks that set operations fail with a wrapped error when
// the table is missing, and that the Firewall is still usable afterwards
// (a rejected batch must not leave the netlink connection out of step).
func TestWithoutTable(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	if err := fw.Enroll(enrolledUID); err == nil || !strings.Contains(err.Error(), "enroll uid 4242") {
		t.Errorf("Enroll without table: err = %v", err)
	}
	if err := fw.Unenroll(enrolledUID); err == nil || !strings.Contains(err.Error(), "unenroll uid 4242") {
		t.Errorf("Unenroll without table: err = %v", err)
	}
	if _, err := fw.Enrolled(); err == nil || !strings.Contains(err.Error(), "list nftables set") {
		t.Errorf("Enrolled without table: err = %v", err)
	}
	wantHealthy(t, fw, false)
	if err := fw.Remove(); err != nil {
		t.Errorf("Remove without table: %v", err)
	}
	if out := ns.mustNft("list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Errorf("failed operations left something behind:\n%s", out)
	}

	mustInstall(t, fw)
	if err := fw.Enroll(enrolledUID); err != nil {
		t.Fatal(err)
	}
	wantEnrolled(t, fw, enrolledUID)
}

// TestHealthy checks that Healthy notices the ways another tool can break
// the ruleset, "nft flush ruleset" above all, and that Install repairs it.
func TestHealthy(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	wantHealthy(t, fw, false)
	mustInstall(t, fw, enrolledUID)
	wantHealthy(t, fw, true)

	breakages := []struct {
		name string
		args [][]string
	}{
		{"flush ruleset", [][]string{{"flush", "ruleset"}}},
		{"flush table", [][]string{{"flush", "table", "inet", TableName}}},
		{"delete nat chain", [][]string{{"flush", "chain", "inet", TableName, natChainName}, {"delete", "chain", "inet", TableName, natChainName}}},
		{"flush filter chain", [][]string{{"flush", "chain", "inet", TableName, filterChainName}}},
		{"extra rule", [][]string{{"add", "rule", "inet", TableName, filterChainName, "counter"}}},
		{"delete table", [][]string{{"delete", "table", "inet", TableName}}},
	}
	for _, b := range breakages {
		for _, args := range b.args {
			ns.mustNft(args...)
		}
		ok, err := fw.Healthy()
		if err != nil || ok {
			t.Errorf("after nft %s: Healthy() = %v, %v; want false, nil", b.name, ok, err)
		}
		mustInstall(t, fw, enrolledUID)
		wantHealthy(t, fw, true)
	}
}

// TestRemove checks that Remove deletes the table and is idempotent.
func TestRemove(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	if err := fw.Remove(); err != nil {
		t.Fatalf("Remove before Install: %v", err)
	}
	mustInstall(t, fw, enrolledUID)
	for range 2 {
		if err := fw.Remove(); err != nil {
			t.Fatal(err)
		}
	}
	if out := ns.mustNft("list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Fatalf("ruleset not empty after Remove:\n%s", out)
	}
	wantHealthy(t, fw, false)
}

// TestClose checks that Close is idempotent and that a closed Firewall
// refuses work with an error rather than panicking.
func TestClose(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	mustInstall(t, fw, enrolledUID)
	for range 2 {
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := fw.Enroll(1); err == nil {
		t.Error("Enroll after Close succeeded")
	}
	if _, err := fw.Healthy(); err == nil {
		t.Error("Healthy after Close succeeded")
	}
	// Closing the connection does not remove the table.
	if !strings.Contains(ns.listTable(), "elements = { 4242 }") {
		t.Error("table gone after Close")
	}
}

// TestConcurrentUse checks that the Firewall can be shared by goroutines
// (run with -race).
func TestConcurrentUse(t *testing.T) {
	ns := newNetns(t)
	fw := ns.newFirewall(testPort)
	mustInstall(t, fw)
	const workers, each = 8, 16
	var wg sync.WaitGroup
	errs := make(chan error, workers*each*3)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				uid := uint32(10000 + w*each + i)
				errs <- fw.Enroll(uid)
				errs <- fw.Enroll(uid)
				if _, err := fw.Healthy(); err != nil {
					errs <- err
				}
			}
			if _, err := fw.Enrolled(); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	var want []uint32
	for i := range workers * each {
		want = append(want, uint32(10000+i))
	}
	wantEnrolled(t, fw, want...)
}

// greeter is a TCP listener in the namespace that answers every connection
// with one line naming itself, so the child can tell who it reached.
type greeter struct {
	name     string
	accepted atomic.Int32
}

func (ns *netns) startGreeter(network, addr, name string) (*greeter, error) {
	var ln net.Listener
	if err := ns.do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	}); err != nil {
		return nil, err
	}
	g := &greeter{name: name}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			g.accepted.Add(1)
			fmt.Fprintln(c, name)
			c.Close()
		}
	}()
	ns.t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return g, nil
}

// echoer is a UDP server in the namespace that answers each datagram with
// one line naming itself.
func (ns *netns) startEchoer(network, addr, name string) error {
	var pc net.PacketConn
	if err := ns.do(func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	}); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(name+"\n"), from)
		}
	}()
	ns.t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return nil
}

type family struct {
	name       string
	listenNet  string // for the proxy listener
	listenAddr string // loopback, where the redirect lands
	target     string // an address:443 the child dials
	udpNet     string
}

var families = []family{
	{"IPv4", "tcp4", fmt.Sprintf("127.0.0.1:%d", testPort), "127.0.0.2:443", "udp4"},
	{"IPv6", "tcp6", fmt.Sprintf("[::1]:%d", testPort), "[::1]:443", "udp6"},
}

// TestRedirectTCP checks the point of the package: an enrolled UID's
// connection to port 443 arrives at the local listener, over IPv4 and IPv6,
// while other UIDs (and the enrolled one after Unenroll) reach the real
// destination, where nothing listens here, so they are refused.
func TestRedirectTCP(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			ns := newNetns(t)
			proxy, err := ns.startGreeter(fam.listenNet, fam.listenAddr, "avp-listener")
			if err != nil {
				t.Skipf("cannot listen on %s in the namespace (no %s on loopback?): %v", fam.listenAddr, fam.name, err)
			}
			fw := ns.newFirewall(testPort)
			mustInstall(t, fw, enrolledUID)

			if got := ns.connectAs(enrolledUID, "tcp", fam.target); got != outcomeGot+"avp-listener" {
				t.Errorf("enrolled uid %d dialling %s: %q, want to reach the listener", enrolledUID, fam.target, got)
			}
			if n := proxy.accepted.Load(); n != 1 {
				t.Errorf("listener accepted %d connections, want 1", n)
			}
			for _, uid := range []uint32{otherUID, 0} {
				if got := ns.connectAs(uid, "tcp", fam.target); got != outcomeRefused {
					t.Errorf("uid %d (not enrolled) dialling %s: %q, want %s (not redirected)", uid, fam.target, got, outcomeRefused)
				}
			}
			// Port 443 only: other ports are not redirected.
			other := strings.Replace(fam.target, ":443", ":8443", 1)
			if got := ns.connectAs(enrolledUID, "tcp", other); got != outcomeRefused {
				t.Errorf("enrolled uid dialling %s: %q, want %s", other, got, outcomeRefused)
			}

			if err := fw.Unenroll(enrolledUID); err != nil {
				t.Fatal(err)
			}
			if got := ns.connectAs(enrolledUID, "tcp", fam.target); got != outcomeRefused {
				t.Errorf("unenrolled uid %d dialling %s: %q, want %s", enrolledUID, fam.target, got, outcomeRefused)
			}
			if err := fw.Enroll(otherUID); err != nil {
				t.Fatal(err)
			}
			if got := ns.connectAs(otherUID, "tcp", fam.target); got != outcomeGot+"avp-listener" {
				t.Errorf("newly enrolled uid %d dialling %s: %q, want to reach the listener", otherUID, fam.target, got)
			}
			if n := proxy.accepted.Load(); n != 2 {
				t.Errorf("listener accepted %d connections, want 2", n)
			}
		})
	}
}

// TestRejectQUIC checks that UDP 443 from an enrolled UID is rejected before
// it leaves the host, while other UIDs reach a real UDP service on 443.
func TestRejectQUIC(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			ns := newNetns(t)
			if err := ns.startEchoer(fam.udpNet, fam.target, "udp-upstream"); err != nil {
				t.Skipf("cannot listen on %s in the namespace (no %s on loopback?): %v", fam.target, fam.name, err)
			}
			fw := ns.newFirewall(testPort)
			mustInstall(t, fw, enrolledUID)

			if got := ns.connectAs(otherUID, "udp", fam.target); got != outcomeGot+"udp-upstream" {
				t.Errorf("uid %d (not enrolled) sending UDP to %s: %q, want the echo", otherUID, fam.target, got)
			}
			// The reject verdict drops the datagram in the output path, so
			// the send may fail at once with EPERM (it does on Linux 6.x);
			// either way the ICMP port unreachable that reject generates
			// must come back as ECONNREFUSED, which is what tells a QUIC
			// client that UDP 443 is closed.
			got := ns.connectAs(enrolledUID, "udp", fam.target)
			if got != outcomeRefused && got != sendEPERM+outcomeRefused {
				t.Errorf("enrolled uid %d sending UDP to %s: %q, want %s (optionally after %s)", enrolledUID, fam.target, got, outcomeRefused, strings.TrimSpace(sendEPERM))
			}
			t.Logf("enrolled uid sending UDP to %s: %s", fam.target, got)
		})
	}
}

// TestNoBypassWhenRedirectMisses: the nat rule only sees the first packet of a new
// conntrack entry, and a reused entry (TCP TIME_WAIT reuse on loopback was seen to do it
// under load) can carry an enrolled UID's connection to port 443 without the redirect. The
// filter chain must then refuse it rather than let it reach the real server (I12). The
// test removes the nat rule to make every connection miss the redirect.
func TestNoBypassWhenRedirectMisses(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			ns := newNetns(t)
			if _, err := ns.startGreeter(fam.listenNet, fam.target, "real-server"); err != nil {
				t.Skipf("cannot listen on %s in the namespace: %v", fam.target, err)
			}
			fw := ns.newFirewall(testPort)
			mustInstall(t, fw, enrolledUID)
			ns.mustNft("flush", "chain", "inet", TableName, "nat_output")

			if got := ns.connectAs(enrolledUID, "tcp", fam.target); got != outcomeRefused {
				t.Errorf("enrolled uid %d reached %s without the redirect: %q, want %s", enrolledUID, fam.target, got, outcomeRefused)
			}
			if got := ns.connectAs(otherUID, "tcp", fam.target); got != outcomeGot+"real-server" {
				t.Errorf("uid %d (not enrolled) dialling %s: %q, want to reach the real server", otherUID, fam.target, got)
			}
		})
	}
}

// TestConsistentList: a listing is taken only when two in a row agree, so one walk that a
// hash resize disturbed (a uid twice, another missing) is never returned; a set that keeps
// changing is an error, not a guess.
func TestConsistentList(t *testing.T) {
	seq := func(lists ...[]uint32) func() ([]uint32, error) {
		i := 0
		return func() ([]uint32, error) {
			l := lists[min(i, len(lists)-1)]
			i++
			return l, nil
		}
	}
	torn := []uint32{1, 2, 2, 4}
	good := []uint32{1, 2, 3, 4}
	got, err := consistentList(seq(torn, good, good), 5)
	if err != nil || !slices.Equal(got, good) {
		t.Fatalf("got %v, %v; want %v", got, err, good)
	}
	got, err = consistentList(seq(good, good), 5)
	if err != nil || !slices.Equal(got, good) {
		t.Fatalf("got %v, %v; want %v", got, err, good)
	}
	if got, err := consistentList(seq(torn, good, torn, good, torn), 5); err == nil {
		t.Fatalf("a set that differs on every listing gave %v", got)
	}
	boom := errors.New("netlink")
	if _, err := consistentList(func() ([]uint32, error) { return nil, boom }, 5); !errors.Is(err, boom) {
		t.Fatalf("err = %v, want the listing's error", err)
	}
}

// TestHealthyReadsTheRules: the check counted each chain's rules and never read them, so
// another tool that replaced the redirect with a rule that does nothing (keeping the count)
// left avpd saying "firewall: ok" and the enrolled user going straight out. Each rule is
// now compared with what Install writes.
func TestHealthyReadsTheRules(t *testing.T) {
	for _, tc := range []struct{ name, edit string }{
		{"nat rule replaced by a counter", "flush chain inet " + TableName + " " + natChainName + "\nadd rule inet " + TableName + " " + natChainName + " counter\n"},
		{"redirect to another port", "flush chain inet " + TableName + " " + natChainName + "\nadd rule inet " + TableName + " " + natChainName + " meta skuid @" + SetName + " tcp dport 443 redirect to :1\n"},
		{"filter rules replaced by counters", "flush chain inet " + TableName + " " + filterChainName + "\nadd rule inet " + TableName + " " + filterChainName + " counter\nadd rule inet " + TableName + " " + filterChainName + " counter\n"},
		{"bypass rule made to accept", "flush chain inet " + TableName + " " + filterChainName + "\nadd rule inet " + TableName + " " + filterChainName + " meta skuid @" + SetName + " tcp dport 443 accept\nadd rule inet " + TableName + " " + filterChainName + " meta skuid @" + SetName + " udp dport 443 reject\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNetns(t)
			fw := ns.newFirewall(testPort)
			mustInstall(t, fw, enrolledUID)
			wantHealthy(t, fw, true)
			if _, err := ns.nft(tc.edit, "-f", "-"); err != nil {
				t.Fatal(err)
			}
			wantHealthy(t, fw, false)
			mustInstall(t, fw, enrolledUID)
			wantHealthy(t, fw, true)
		})
	}
}
