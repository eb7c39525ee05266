package redirect

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Every test that touches nftables runs inside its own network namespace so
// that the host's firewall is never read or changed. The namespace is created
// by unshare(CLONE_NEWNET) on a dedicated, locked OS thread; everything that
// must happen "inside" (opening the Firewall's netlink socket, binding
// listeners, starting nft and child processes) is sent to that thread. A
// socket stays in the namespace it was created in, so it can be used from any
// goroutine afterwards, and a child process inherits the namespace of the
// thread that started it.

const (
	testPort     = 14322 // listener port used in tests and in the reference file
	nftTimeout   = 10 * time.Second
	childTimeout = 20 * time.Second
)

// requireRoot skips the test when not running as root, unless CI is set: in
// CI these tests must run, so a missing privilege is a failure there.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "this test needs root (CAP_SYS_ADMIN to create a network namespace and CAP_NET_ADMIN for nftables)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg + ", and CI is set")
	}
	t.Skip(msg + "; run go test as root, or set CI to make this a failure")
}

func requireNft(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err == nil {
		return
	}
	msg := "this test needs the nft command-line tool to check the kernel's view of the ruleset"
	if os.Getenv("CI") != "" {
		t.Fatal(msg + ", and CI is set")
	}
	t.Skip(msg)
}

// netns is a private network namespace owned by one locked OS thread.
type netns struct {
	t    *testing.T
	work chan func()
}

// newNetns creates a fresh network namespace with the loopback interface up.
// It is destroyed at the end of the test.
func newNetns(t *testing.T) *netns {
	t.Helper()
	requireRoot(t)
	requireNft(t)
	ns := &netns{t: t, work: make(chan func())}
	ready := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		// Never unlocked: when this goroutine returns, the runtime
		// terminates the thread instead of reusing it, so no other goroutine
		// can ever run in this namespace by accident, and the namespace is
		// freed once its last socket is closed.
		runtime.LockOSThread()
		before, err := threadNetns()
		if err != nil {
			ready <- err
			return
		}
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- fmt.Errorf("unshare network namespace: %w", err)
			return
		}
		// Refuse to go on unless the thread really left the namespace it
		// was in, so a failure can never turn into editing the host's
		// firewall.
		after, err := threadNetns()
		if err != nil {
			ready <- err
			return
		}
		if after.Dev == before.Dev && after.Ino == before.Ino {
			ready <- fmt.Errorf("thread still in its original network namespace after unshare; refusing to touch nftables")
			return
		}
		if err := loopbackUp(); err != nil {
			ready <- err
			return
		}
		ready <- nil
		for fn := range ns.work {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(ns.work)
		<-exited
	})
	return ns
}

// threadNetns identifies the network namespace of the calling thread.
func threadNetns() (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return st, fmt.Errorf("stat network namespace of thread: %w", err)
	}
	return st, nil
}

// loopbackUp brings lo up; a new namespace starts with it down, and all the
// functional tests connect over it.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for ioctl: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("get lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	return nil
}

// do runs fn on the namespace's thread and returns its error.
func (ns *netns) do(fn func() error) error {
	errc := make(chan error, 1)
	ns.work <- func() { errc <- fn() }
	return <-errc
}

// nft runs the nft tool inside the namespace, with stdin as its input, and
// returns its standard output.
func (ns *netns) nft(stdin string, args ...string) (string, error) {
	var out, errOut bytes.Buffer
	err := ns.do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), nftTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, "nft", args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Stdout = &out
		cmd.Stderr = &errOut
		return cmd.Run()
	})
	if err != nil {
		return out.String(), fmt.Errorf("nft %s: %w: %s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// mustNft is nft that fails the test on error.
func (ns *netns) mustNft(args ...string) string {
	ns.t.Helper()
	out, err := ns.nft("", args...)
	if err != nil {
		ns.t.Fatal(err)
	}
	return out
}

// listTable is the kernel's view of the owned table, as an operator sees it.
func (ns *netns) listTable() string {
	ns.t.Helper()
	return ns.mustNft("list", "table", "inet", TableName)
}

// newFirewall opens a Firewall inside the namespace and removes its table and
// closes it at the end of the test.
func (ns *netns) newFirewall(port uint16) *Firewall {
	ns.t.Helper()
	var fw *Firewall
	if err := ns.do(func() error {
		var err error
		fw, err = New(port)
		return err
	}); err != nil {
		ns.t.Fatal(err)
	}
	ns.t.Cleanup(func() {
		if err := fw.Remove(); err != nil && !strings.Contains(err.Error(), errClosed.Error()) {
			ns.t.Errorf("cleanup: %v", err)
		}
		if err := fw.Close(); err != nil {
			ns.t.Errorf("cleanup: %v", err)
		}
	})
	return fw
}

// stripComments removes the explanations from the reference ruleset file:
// every line whose first non-blank character is '#', then blank lines at the
// start and end. What remains must equal "nft list" output exactly, tabs and
// blank lines between blocks included.
func stripComments(s string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		b.WriteString(line)
	}
	return strings.TrimSpace(b.String()) + "\n"
}
