package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestAgentCannotReachControlPlane: the enrolled agent UID and another unprivileged UID
// cannot use the admin socket (file mode, then SO_PEERCRED), read the CA key or the secrets,
// or enroll/unenroll anyone (I12).
func TestAgentCannotReachControlPlane(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	avpctl := filepath.Join(binDir, "avpctl")
	sock := filepath.Join(e.runtime, "admin.sock")

	for _, uid := range []int{agentUID, notEnrolled} {
		out, err := e.agent(uid, avpctl, "--runtime-dir", e.runtime, "unenroll-uid", strconv.Itoa(agentUID))
		if err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("uid %d used the admin socket: %q %v", uid, out, err)
		}
	}

	// Even if the socket's mode were loosened by mistake, the daemon checks the peer.
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	out, err := e.agent(agentUID, avpctl, "--runtime-dir", e.runtime, "unenroll-uid", strconv.Itoa(agentUID))
	if err == nil || !strings.Contains(err.Error(), "permission denied: uid 4242 is not root and not in group avp-admin") {
		t.Fatalf("SO_PEERCRED check: %q %v", out, err)
	}
	if st := string(e.avpctl("status", "--json")); !strings.Contains(st, `"enrolled_uids": [
    4242
  ]`) {
		t.Fatalf("the agent changed enrollment: %s", st)
	}

	// avpd runs as root here: its own UID (and root in general) can never be enrolled, or its
	// upstream connections would loop back into itself.
	for _, who := range []string{"0", "root"} {
		out, err := e.avpctlErr("enroll-uid", who)
		if err == nil || !strings.Contains(string(out), "can never be enrolled") {
			t.Fatalf("enroll-uid %s: %v %s", who, err, out)
		}
	}

	for _, f := range []string{filepath.Join(e.state, "ca-key.pem"), e.secrets, e.config} {
		if out, err := e.agent(agentUID, "cat", f); err == nil {
			t.Fatalf("agent read %s: %q", f, out)
		}
	}
	fi, err := os.Stat(filepath.Join(e.state, "ca-key.pem"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v %v", fi.Mode(), err)
	}
}
