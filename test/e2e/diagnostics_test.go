package e2e

// What status and doctor tell an operator, checked against what actually happened.

import (
	"encoding/json"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// TestDoctorDoesNotInflateRejected: doctor's listener probe dials avpd's listener
// directly, and each run added 2 to status's rejected connections, which has no breakdown
// and reads as agents being refused. Such connections are counted on their own now.
func TestDoctorDoesNotInflateRejected(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	stats := func() map[string]any {
		var st struct {
			Stats map[string]any `json:"stats"`
		}
		if err := json.Unmarshal(e.avpctl("status", "--json"), &st); err != nil || st.Stats == nil {
			t.Fatalf("status --json: %v %v", st, err)
		}
		return st.Stats
	}
	before := stats()
	exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime,
		"doctor", "--config", e.config, "--state-dir", e.state).Run()
	after := stats()
	if after["rejected_connections"] != before["rejected_connections"] {
		t.Errorf("avpctl doctor alone raised status's rejected connections from %v to %v", before["rejected_connections"], after["rejected_connections"])
	}
	if d, _ := after["direct_to_listener"].(float64); d == 0 {
		t.Errorf("doctor's probe was not counted as a direct connection: %v", after)
	}
}

// TestDoctorQueryPlaceholder: a placeholder sent in the query (?key=, as Google's REST APIs
// take a key) was counted as placeholder_in_wrong_header, and doctor's fix was to list "the
// header" under inject.also: there is no header to list, and avpd never injects into a URL.
func TestDoctorQueryPlaceholder(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	if _, _, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models?key="+phOpenAI); err != nil {
		t.Fatal(err)
	}
	e.waitAudit("decision", "forward_verbatim", "reason", "placeholder_in_url")
	out, _ := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime,
		"doctor", "--config", e.config, "--state-dir", e.state).CombinedOutput()
	if !strings.Contains(string(out), "placeholder_in_url") || !strings.Contains(string(out), "header instead of the query") {
		t.Errorf("doctor after a placeholder in the query:\n%s", out)
	}
	if strings.Contains(string(out), "placeholder_in_wrong_header 1") {
		t.Errorf("a placeholder in the query is diagnosed as a wrong header:\n%s", out)
	}
}

// TestDoctorDamagedEnrollment: a damaged enrolled.json makes avpd refuse to start, and
// doctor said only that avpd does not answer.
func TestDoctorDamagedEnrollment(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.stopAvpd()
	writeFile(t, filepath.Join(e.state, "enrolled.json"), []byte(`{"uids":[4242`), 0o600)
	out, err := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime,
		"doctor", "--config", e.config, "--state-dir", e.state).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "enrolled.json is damaged") {
		t.Errorf("doctor with a damaged enrolled.json: %v\n%s", err, out)
	}
}

// hungJournal listens on a seqpacket socket in e.private that accepts and reads avpd's
// events but never acknowledges one: a journal stuck on a dead disk. It rewrites the config
// to send the audit there.
func hungJournal(t *testing.T, e *env) string {
	t.Helper()
	sock := filepath.Join(e.private, "journal.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 65536)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	cfg := strings.Replace(mustRead(t, e.config), "audit: {path: "+e.audit+"}", "audit: {socket: "+sock+", timeout: 200ms}", 1)
	writeFile(t, e.config, []byte(cfg), 0o600)
	return sock
}

// TestDoctorJournalNeverAcks: the journal's socket accepts connections (doctor's own probe,
// as root, succeeds) but acknowledges nothing, so avpd never got proxy_start acknowledged
// and every injection gets 503 audit_unavailable. doctor said "OK journal", only WARNed
// about the failed requests and exited 0; status said nothing of it. Found by the operator
// review (rt1), where the cause was a journal socket avpd's user could not connect to.
func TestDoctorJournalNeverAcks(t *testing.T) {
	e := newEnv(t)
	hungJournal(t, e)
	e.startAvpd()
	out, err := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime,
		"doctor", "--config", e.config, "--state-dir", e.state).CombinedOutput()
	if err == nil {
		t.Errorf("doctor exited 0 while avpd's audit journal acknowledges nothing:\n%s", out)
	}
	c := doctorCheck(t, e, "audit", "--config", e.config, "--state-dir", e.state)
	if c.Status != "fail" || !strings.Contains(c.Detail, "proxy_start") || !strings.Contains(c.Detail, "audit_unavailable") || c.Fix == "" {
		t.Errorf("doctor's audit check while the journal acknowledges nothing: %+v\n%s", c, out)
	}
	st := string(e.avpctl("status"))
	if !strings.Contains(st, "NOT READY") {
		t.Errorf("status does not say avpd is not ready:\n%s", st)
	}
}

// TestEnrollmentUnrecordedSaysSo: with an audit journal that acknowledges nothing,
// enroll-uid and unenroll-uid took effect, avpd only logged that the event was not
// recorded, and avpctl printed plain success with exit 0. The change must still take effect
// (unenroll above all must never wait on the journal), avpctl must say it is not in the
// audit log yet and exit 3, and status must count it as waiting to be recorded. Found by the
// operator review (rt1).
func TestEnrollmentUnrecordedSaysSo(t *testing.T) {
	e := newEnv(t)
	hungJournal(t, e)
	e.startAvpd()
	uid := strconv.Itoa(agentUID)
	for _, cmd := range []string{"enroll-uid", "unenroll-uid"} {
		out, err := e.avpctlErr(cmd, uid)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 || !strings.Contains(string(out), "not recorded in the audit log") {
			t.Errorf("avpctl %s while the journal acknowledges nothing: %v, %q; want exit 3 and a warning that the audit log did not record it", cmd, err, out)
		}
		var st struct {
			Enrolled []int `json:"enrolled_uids"`
			Pending  int   `json:"audit_pending"`
		}
		if err := json.Unmarshal(e.avpctl("status", "--json"), &st); err != nil {
			t.Fatal(err)
		}
		if enrolled := slices.Contains(st.Enrolled, agentUID); enrolled != (cmd == "enroll-uid") {
			t.Errorf("after %s the kernel's set is %v: the change did not take effect", cmd, st.Enrolled)
		}
		if want := map[string]int{"enroll-uid": 1, "unenroll-uid": 2}[cmd]; st.Pending != want {
			t.Errorf("after %s status counts %d event(s) waiting to be recorded, want %d", cmd, st.Pending, want)
		}
	}
}

// TestDoctorStateFilesUnreadableByDaemonUser: after "Running it by hand" (avpd as root) the
// production install runs avpd as avp, and the root-owned ca-key.pem and enrolled.json in the
// state directory are unreadable to it: the start fails and the redirect is not put back.
// doctor said "OK state" and flagged only the CA key. It now checks every file in the state
// directory against the daemon's user and gives the one chown -R that fixes them all. Found
// by the operator review (rt1).
func TestDoctorStateFilesUnreadableByDaemonUser(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.stopAvpd()
	// avpd as root left root-owned files; say the service runs as the agent's neighbour.
	user := strconv.Itoa(otherAgentUID)
	c := doctorCheck(t, e, "state", "--config", e.config, "--state-dir", e.state, "--daemon-user", user)
	if c.Status != "fail" || !strings.Contains(c.Detail, "enrolled.json") || !strings.Contains(c.Fix, "chown -R") {
		t.Errorf("doctor's state check with root's state files and --daemon-user %s: %+v", user, c)
	}
}

// TestDoctorAsNonAdmin: doctor run by a user who may not read the config said "FAIL config
// invalid: read config ...: permission denied" with a fix about bindings check: the file is
// fine, and the fix is to run doctor as root. Found by the operator review (rt1).
func TestDoctorAsNonAdmin(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	out, _ := e.agent(otherAgentUID, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime, "doctor", "--json", "--config", e.config, "--state-dir", e.state)
	var r struct{ Checks []doctorEntry }
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("doctor --json as uid %d: %v\n%s", otherAgentUID, err, out)
	}
	found := false
	for _, c := range r.Checks {
		if c.Name != "config" {
			continue
		}
		found = true
		if strings.Contains(c.Detail, "invalid") || strings.Contains(c.Fix, "bindings check") || !strings.Contains(c.Fix, "root") {
			t.Errorf("doctor as a user who may not read the config: %+v; want it to say the file was not read and to run doctor as root", c)
		}
	}
	if !found {
		t.Fatalf("no config check:\n%s", out)
	}
}

// TestBindingsCheckShortValueAsAvpdRefusesIt: bindings check warns about a value shorter
// than inject.MinValueLen; avpd refuses to inject exactly those (503 secret_too_short), so
// the two agree: a 7-byte value gets the warning and the 503, an 8-byte one neither.
func TestBindingsCheckShortValueAsAvpdRefusesIt(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	secrets := mustRead(t, e.secrets)
	for _, n := range []int{inject.MinValueLen - 1, inject.MinValueLen} {
		value := strings.Repeat("k", n)
		writeFile(t, e.secrets, []byte(strings.Replace(secrets, "OPENAI: "+realOpenAI, "OPENAI: "+value, 1)), 0o600)
		e.avpctl("cache", "flush", "OPENAI")
		out, err := e.avpctlErr("bindings", "check", e.config)
		warned := strings.Contains(string(out), "the value of OPENAI is")
		code, body, cerr := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI)
		if cerr != nil {
			t.Fatal(cerr)
		}
		refused := code == 503 && strings.Contains(body, "secret_too_short")
		if err != nil || warned != refused || warned != (n < inject.MinValueLen) {
			t.Errorf("a %d-byte value: bindings check (%v) warned %v, avpd answered %d %q", n, err, warned, code, strings.TrimSpace(body))
		}
	}
}
