package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

const journaldBin = "/lib/systemd/systemd-journald"

// journaldScript runs a real systemd-journald in the mount namespace it is started in (by
// unshare), on tmpfs over its runtime and log directories so the host's journal is never
// touched, then becomes the audit journal with --journald auto.
const journaldScript = `set -e
for d in /run/systemd /run/log /var/log/journal; do
  mkdir -p "$d"
  mount -t tmpfs -o mode=0755 tmpfs "$d"
done
mkdir -p /run/systemd/journal
` + journaldBin + ` >"$1/journald.log" 2>&1 &
echo $! >"$1/journald.pid"
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
[ -S /run/systemd/journal/socket ] || { echo "journald did not start"; cat "$1/journald.log"; exit 1; }
shift
exec "$@"
`

// TestJournaldMirror runs the journal against a real systemd-journald (in a private mount
// namespace) and reads the mirrored events back with journalctl: every acknowledged event
// arrives with its AVP_* fields and the same seq as in the file, which stays the record.
func TestJournaldMirror(t *testing.T) {
	if _, err := os.Stat(journaldBin); err != nil {
		t.Fatalf("%s is missing (apt-get install systemd): %v", journaldBin, err)
	}
	dir, err := os.MkdirTemp("", "avpjd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	script := filepath.Join(dir, "ns.sh")
	writeFile(t, script, []byte(journaldScript), 0o755)
	sock := filepath.Join(dir, "journal.sock")
	logPath := filepath.Join(dir, "log", "audit.jsonl")
	// journald's parent is the shell that becomes the journal; it is killed after the
	// journal stops (cleanups run last first).
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(dir, "journald.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				unix.Kill(pid, unix.SIGKILL)
			}
		}
	})
	var out syncBuffer
	cmd, done := startProcess(t, &out, "unshare", "--mount", "--propagation", "private", "sh", script, dir,
		filepath.Join(binDir, "avpd"), "journal", "--log", logPath, "--socket", sock, "--journald", "auto")
	waitOutput(t, &out, done, "journal: ready on ", 15*time.Second)

	c := audit.NewJournalClient(sock, 10*time.Second)
	defer c.Close()
	uid, binding := int64(4242), 0
	ev := audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionInject, Reason: "binding_matched",
		Secret: "OPENAI_API_KEY", Binding: &binding, UID: &uid, Dst: "203.0.113.7:443",
		SNI: "api.openai.com", Method: "POST", Path: "/v1/chat/completions"}
	for i := 0; i < 5; i++ {
		if err := c.Record(context.Background(), ev); err != nil {
			t.Fatalf("record %d: %v\n%s", i, err, out.String())
		}
	}

	// What the file says: the seqs of the decisions.
	var fileSeqs []string
	data, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		if m["type"] == "decision" {
			fileSeqs = append(fileSeqs, fmt.Sprint(m["seq"]))
		}
	}
	if len(fileSeqs) != 5 {
		t.Fatalf("the file has %d decisions, want 5:\n%s", len(fileSeqs), data)
	}

	// What journald has, read in the journal's mount namespace. The mirror is best effort
	// and asynchronous, so wait for it.
	var entries []map[string]string
	deadline := time.Now().Add(10 * time.Second)
	for {
		jc := exec.Command("nsenter", "--mount", "--target", strconv.Itoa(cmd.Process.Pid),
			"journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=avp-journal", "AVP_TYPE=decision")
		raw, err := jc.Output()
		entries = entries[:0]
		sc := bufio.NewScanner(bytes.NewReader(raw))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m map[string]string
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				entries = append(entries, m)
			}
		}
		if err == nil && len(entries) >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("journald has %d decision entries from the journal, want 5 (journalctl: %v):\n%s", len(entries), err, raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	want := map[string]string{
		"AVP_DECISION": "inject", "AVP_REASON": "binding_matched", "AVP_SECRET": "OPENAI_API_KEY",
		"AVP_BINDING": "0", "AVP_UID": "4242", "AVP_DST": "203.0.113.7:443", "AVP_SNI": "api.openai.com",
		"AVP_METHOD": "POST", "AVP_PATH": "/v1/chat/completions", "PRIORITY": "6",
	}
	for i, m := range entries {
		for k, v := range want {
			if m[k] != v {
				t.Errorf("entry %d: %s = %q, want %q", i, k, m[k], v)
			}
		}
		if m["AVP_SEQ"] != fileSeqs[i] {
			t.Errorf("entry %d: AVP_SEQ %q, the file's seq %s", i, m["AVP_SEQ"], fileSeqs[i])
		}
		if !strings.Contains(m["MESSAGE"], "inject") {
			t.Errorf("entry %d: MESSAGE %q does not say the decision", i, m["MESSAGE"])
		}
	}
}
