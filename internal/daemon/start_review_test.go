package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestStartOwnDirDoesNotChmodSharedDir: ownDir "fixes" any directory avpd's user owns
// that group or others may write by chmod(perm &^ 022). Run as root with a shared,
// sticky, world-writable directory (a --runtime-dir or --state-dir of /tmp, /var/tmp,
// /dev/shm), that is the system's /tmp: avpd silently makes it 0755 and drops the sticky
// bit, so no other user can create files there any more. (os.Chmod with a bare Perm()
// also clears setgid/sticky on any directory it touches.)
func TestStartOwnDirDoesNotChmodSharedDir(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOutsideCI(t, "needs root: the shared directory is root's, as /tmp is")
	}
	shared := filepath.Join(t.TempDir(), "tmp")
	if err := os.Mkdir(shared, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o777|os.ModeSticky); err != nil { // as /tmp is
		t.Fatal(err)
	}
	d := &Daemon{logf: t.Logf}
	err := d.ownDir(shared, "runtime directory")
	fi, _ := os.Stat(shared)
	t.Logf("ownDir: %v; mode now %v", err, fi.Mode())
	if fi.Mode()&os.ModeSticky == 0 || fi.Mode().Perm() != 0o777 {
		t.Fatalf("ownDir changed a shared sticky directory (mode 1777, as /tmp) to %v: every other user loses the right to create files there (ownDir returned %v)", fi.Mode(), err)
	}
}

// TestStartFailClosedTrustsRefusedStateDir: start refuses a state directory another user
// owns ("who could replace what avpd keeps in it"), and then failClosed reads
// enrolled.json and redirect-port from that very directory and installs a redirect from
// them. The directory's owner chooses which UIDs' HTTPS (any user but root and avpd) is
// redirected, and to which local port (one it listens on).
func TestStartFailClosedTrustsRefusedStateDir(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOutsideCI(t, "needs root for a network namespace")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		skipOutsideCI(t, "needs nft (package nftables)")
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.Mkdir(state, 0o700)
	const attacker = 4242
	// The agent's files in a state directory it owns.
	os.WriteFile(filepath.Join(state, "enrolled.json"), []byte(`{"uids":[1000]}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(state, "redirect-port"), []byte("8443\n"), 0o644)
	for _, p := range []string{state, filepath.Join(state, "enrolled.json"), filepath.Join(state, "redirect-port")} {
		if err := os.Chown(p, attacker, attacker); err != nil {
			t.Fatal(err)
		}
	}
	cfg := filepath.Join(dir, "bindings.yaml")
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("A: x\n"), 0o600)
	os.WriteFile(cfg, []byte(`version: 1
backend: {type: file, file: {path: `+dir+`/secrets.yaml}}
audit: {path: `+dir+`/audit.jsonl}
secrets:
  A:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa
    bindings: [{host: api.example.com}]
`), 0o600)

	type result struct {
		startErr error
		ruleset  string
		err      error
	}
	res := make(chan result, 1)
	go func() {
		// Never unlocked: the thread dies with the goroutine, and the namespace with it.
		runtime.LockOSThread()
		var before, after unix.Stat_t
		if err := unix.Stat("/proc/thread-self/ns/net", &before); err != nil {
			res <- result{err: err}
			return
		}
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			res <- result{err: err}
			return
		}
		if err := unix.Stat("/proc/thread-self/ns/net", &after); err != nil || (after.Dev == before.Dev && after.Ino == before.Ino) {
			res <- result{err: fmt.Errorf("not in a new network namespace (%v); refusing to go on", err)}
			return
		}
		_, serr := start(Options{ConfigPath: cfg, StateDir: state, RuntimeDir: filepath.Join(dir, "run"), Logf: t.Logf})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var out bytes.Buffer
		cmd := exec.CommandContext(ctx, "nft", "list", "ruleset")
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.Run()
		res <- result{startErr: serr, ruleset: out.String()}
	}()
	var r result
	select {
	case r = <-res:
	case <-time.After(30 * time.Second):
		t.Fatal("start did not return within 30 s")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Logf("start: %v", r.startErr)
	if r.startErr == nil || !strings.Contains(r.startErr.Error(), "owned by uid 4242") {
		t.Fatalf("start did not refuse the state directory owned by uid %d: %v", attacker, r.startErr)
	}
	if strings.Contains(r.ruleset, "8443") || strings.Contains(r.ruleset, "1000") {
		t.Fatalf("start refused the state directory as untrusted, yet failClosed installed a redirect from its files (uid 1000's HTTPS to port 8443, both chosen by uid %d):\n%s", attacker, r.ruleset)
	}
}

// skipOutsideCI skips with why, except in CI (CI=true), where the test must run.
func skipOutsideCI(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("cannot run in CI: %s", why)
	}
	t.Skip(why)
}

// TestStartTrustsLinkedStateDir: a state directory that is a symbolic link (moved to
// another disk) is avpd's as much as the directory it points to; only the files in it must
// not be links.
func TestStartTrustsLinkedStateDir(t *testing.T) {
	real := filepath.Join(t.TempDir(), "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "state")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := saveEnrollment(link, []uint32{4242}); err != nil {
		t.Fatal(err)
	}
	if uids, err := loadEnrollment(link); err != nil || len(uids) != 1 || uids[0] != 4242 {
		t.Fatalf("enrollment in a linked state directory: %v %v", uids, err)
	}
	target := filepath.Join(t.TempDir(), "elsewhere.json")
	os.WriteFile(target, []byte(`{"uids":[]}`), 0o600)
	os.Remove(filepath.Join(real, enrollmentFile))
	if err := os.Symlink(target, filepath.Join(real, enrollmentFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := loadEnrollment(link); err == nil {
		t.Fatal("an enrollment file that is a link was believed")
	}
}
