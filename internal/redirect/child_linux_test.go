package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The functional tests need connections made by a process running as a given
// UID, because nftables matches the UID that owns the socket. The test binary
// re-executes itself as that child: it starts as root (so it can run the
// binary from Go's private build directory), drops to the UID, makes one
// connection and prints one line describing the outcome.

const (
	childModeEnv = "AVP_REDIRECT_TEST_CHILD" // "tcp" or "udp"
	childUIDEnv  = "AVP_REDIRECT_TEST_UID"
	childAddrEnv = "AVP_REDIRECT_TEST_ADDR"

	childIOTimeout = 5 * time.Second
)

// Outcomes printed by the child.
const (
	outcomeRefused = "REFUSED" // ECONNREFUSED: nothing listening, or ICMP port unreachable
	outcomeEPERM   = "EPERM"   // the packet was dropped by a local netfilter verdict
	outcomeTimeout = "TIMEOUT"
	outcomeGot     = "GOT " // followed by the line the peer sent

	sendEPERM = "SEND-EPERM " // prefix: a UDP send failed with EPERM
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childModeEnv); mode != "" {
		os.Exit(runChild(mode))
	}
	os.Exit(m.Run())
}

func runChild(mode string) int {
	uid, err := strconv.Atoi(os.Getenv(childUIDEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad uid:", err)
		return 2
	}
	// Drop privileges for the whole process (Go applies these to all
	// threads) before creating any socket.
	if err := syscall.Setgroups(nil); err != nil {
		fmt.Fprintln(os.Stderr, "setgroups:", err)
		return 2
	}
	if err := syscall.Setgid(uid); err != nil {
		fmt.Fprintln(os.Stderr, "setgid:", err)
		return 2
	}
	if err := syscall.Setuid(uid); err != nil {
		fmt.Fprintln(os.Stderr, "setuid:", err)
		return 2
	}
	if os.Getuid() != uid || os.Geteuid() != uid {
		fmt.Fprintln(os.Stderr, "still running as", os.Getuid(), os.Geteuid())
		return 2
	}
	addr := os.Getenv(childAddrEnv)
	var outcome string
	switch mode {
	case "tcp":
		outcome = childTCP(addr)
	case "udp":
		outcome = childUDP(addr)
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		return 2
	}
	fmt.Println(outcome)
	return 0
}

func classify(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return outcomeRefused
	case errors.Is(err, syscall.EPERM):
		return outcomeEPERM
	case errors.Is(err, os.ErrDeadlineExceeded):
		return outcomeTimeout
	default:
		return "ERROR " + err.Error()
	}
}

// childTCP connects and reads the greeting line the listener sends.
func childTCP(addr string) string {
	conn, err := net.DialTimeout("tcp", addr, childIOTimeout)
	if err != nil {
		return classify(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(childIOTimeout)); err != nil {
		return classify(err)
	}
	buf := make([]byte, 128)
	n, err := conn.Read(buf)
	if err != nil {
		return classify(err)
	}
	return outcomeGot + strings.TrimSpace(string(buf[:n]))
}

// childUDP sends one datagram on a connected socket and waits for the echo.
// If the send itself fails with EPERM (a local netfilter drop), it still
// reads, to see whether an ICMP error came back; the outcome is then prefixed
// with "SEND-EPERM ".
func childUDP(addr string) string {
	conn, err := net.DialTimeout("udp", addr, childIOTimeout)
	if err != nil {
		return classify(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(childIOTimeout)); err != nil {
		return classify(err)
	}
	prefix := ""
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		if !errors.Is(err, syscall.EPERM) {
			return classify(err)
		}
		prefix = sendEPERM
	}
	buf := make([]byte, 128)
	n, err := conn.Read(buf)
	if err != nil {
		return prefix + classify(err)
	}
	return prefix + outcomeGot + strings.TrimSpace(string(buf[:n]))
}

// connectAs runs the child in the namespace as uid, connecting over network
// ("tcp" or "udp") to addr, and returns the outcome line.
func (ns *netns) connectAs(uid uint32, network, addr string) string {
	ns.t.Helper()
	exe, err := os.Executable()
	if err != nil {
		ns.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), childTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(),
		childModeEnv+"="+network,
		childUIDEnv+"="+strconv.FormatUint(uint64(uid), 10),
		childAddrEnv+"="+addr,
	)
	var stdout, stderr strings.Builder
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// Start on the namespace's thread so the child inherits its namespace;
	// waiting can happen anywhere.
	if err := ns.do(cmd.Start); err != nil {
		ns.t.Fatalf("start child: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		ns.t.Fatalf("child as uid %d, %s %s: %v\nstderr: %s", uid, network, addr, err, stderr.String())
	}
	return strings.TrimSpace(stdout.String())
}
