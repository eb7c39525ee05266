package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/intercept"
)

// notifySocket stands in for systemd's NOTIFY_SOCKET: it collects every sd_notify datagram.
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []string
}

func newNotifySocket(t *testing.T, dir string) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(dir, "notify.sock")}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	return n
}

func (n *notifySocket) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.msgs...)
}

// wait returns the index of the first message at or after from that contains every one of
// the lines given, failing the test after d.
func (n *notifySocket) wait(t *testing.T, from int, d time.Duration, lines ...string) int {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		msgs := n.all()
	next:
		for i := from; i < len(msgs); i++ {
			for _, l := range lines {
				if !strings.Contains("\n"+msgs[i]+"\n", "\n"+l) {
					continue next
				}
			}
			return i
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no sd_notify message with %q within %v; got %q", lines, d, n.all())
	return -1
}

// startActivated runs command under systemd-socket-activate in the namespace (ns "" for the
// host's) and returns it with a channel closed when it exits; the cleanup stops it with
// SIGTERM.
func startActivated(t *testing.T, ns string, out *syncBuffer, args ...string) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	ssa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Fatal("systemd-socket-activate is missing: apt-get install systemd (.ci/run installs it)")
	}
	argv := append([]string{ssa}, args...)
	if ns != "" {
		argv = append([]string{"ip", "netns", "exec", ns}, argv...)
	}
	return startProcess(t, out, argv...)
}

// startProcess starts argv with its output in out and returns it with a channel closed when
// it exits; the test's cleanup stops it with SIGTERM (SIGKILL after 15 s) and, when the test
// failed, logs its output.
func startProcess(t *testing.T, out *syncBuffer, argv ...string) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("output of %v:\n%s", argv, out.String())
		}
	})
	return cmd, done
}

// waitOutput waits until out holds want, failing the test if the process ends first or d
// passes.
func waitOutput(t *testing.T, out *syncBuffer, done <-chan struct{}, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(out.String(), want) {
		select {
		case <-done:
			t.Fatalf("the process exited before printing %q:\n%s", want, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %v:\n%s", want, d, out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type doctorEntry struct {
	Name, Status, Detail, Fix string
}

// doctorCheck runs avpctl doctor --json in the namespace and returns the named check.
func doctorCheck(t *testing.T, e *env, name string, args ...string) doctorEntry {
	t.Helper()
	out, _ := exec.Command("ip", append([]string{"netns", "exec", e.ns, filepath.Join(binDir, "avpctl"), "--runtime-dir", e.runtime, "doctor", "--json"}, args...)...).Output()
	var r struct{ Checks []doctorEntry }
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, out)
	}
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("doctor has no %s check:\n%s", name, out)
	return doctorEntry{}
}

func procComm(pid int) string {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(data))
}

// TestSocketActivation: systemd-socket-activate holds avpd's two listening sockets and the
// journal's seqpacket socket, as avpd.socket and avp-journal.socket do. The redirect is in
// place from an earlier run (loaded here from nft/agent-vault-proxy.nft, the reference
// ruleset) while avpd is not running; an enrolled agent's request wakes avpd, which takes the
// passed sockets, wakes the journal with proxy_start, tells "systemd" READY=1, and injects.
// Then the sd_notify protocol: STATUS=, WATCHDOG=1 at half of WATCHDOG_USEC,
// RELOADING=1/READY=1 around SIGHUP, STOPPING=1 and proxy_stop on SIGTERM.
func TestSocketActivation(t *testing.T) {
	e := newEnv(t)
	jsock := filepath.Join(e.private, "journal.sock")
	e.audit = filepath.Join(e.private, "journal", "audit.jsonl")
	writeFile(t, e.config, []byte(fmt.Sprintf(`version: 1
backend:
  type: file
  file: {path: %s}
proxy:
  listen: 127.0.0.1:14322
  upstream_ca_file: %s
audit: {socket: %s, timeout: 5s}
secrets:
%s`, e.secrets, filepath.Join(e.private, "upstream-ca.pem"), jsock, defaultBindings)), 0o600)

	// State an earlier run left: the CA the agents trust, and the enrolled UID.
	if err := os.MkdirAll(e.state, 0o700); err != nil {
		t.Fatal(err)
	}
	ca, err := intercept.LoadOrCreateCA(e.state)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.state, "enrolled.json"), []byte(`{"uids":[4242]}`+"\n"), 0o600)
	e.bundle = filepath.Join(e.dir, "ca-bundle.pem")
	writeFile(t, e.bundle, append(append([]byte{}, e.upCAPEM...), ca.CertPEM()...), 0o644)
	run(t, "ip", "netns", "exec", e.ns, "nft", "-f", "../../nft/agent-vault-proxy.nft")

	var jout syncBuffer
	journal, journalDone := startActivated(t, "", &jout, "--seqpacket", "-l", jsock, "--",
		filepath.Join(binDir, "avpd"), "journal", "--log", e.audit, "--journald", "off",
		"--socket", filepath.Join(e.private, "unused.sock"))
	notify := newNotifySocket(t, e.private)
	e.avpdLog = &syncBuffer{}
	ssa, ssaDone := startActivated(t, e.ns, e.avpdLog, "-l", "127.0.0.1:14322", "-l", "[::1]:14322",
		"-E", "NOTIFY_SOCKET="+notify.path, "-E", "WATCHDOG_USEC=2000000", "--",
		filepath.Join(binDir, "avpd"), "serve", "--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime)

	// Wait until both listening sockets exist, without connecting (that would wake avpd).
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := exec.Command("ip", "netns", "exec", e.ns, "ss", "-Hltn", "sport", "=", ":14322").Output()
		_, jerr := os.Stat(jsock)
		if strings.Count(string(out), "14322") == 2 && jerr == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sockets did not appear: %q %v\n%s", out, jerr, e.avpdLog.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if c := procComm(ssa.Process.Pid); c != "systemd-socket-" {
		t.Fatalf("before any connection the listener's process is %q, want systemd-socket-activate (avpd not started yet)", c)
	}
	if _, err := os.Stat(filepath.Join(e.runtime, "admin.sock")); err == nil {
		t.Fatal("avpd runs before any connection")
	}

	bearer := "Authorization: Bearer " + phOpenAI
	code, body, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", bearer)
	if err != nil || code != 200 {
		t.Fatalf("the redirected request that wakes avpd: %d %q %v\n%s", code, body, err, e.avpdLog.String())
	}
	if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
		t.Fatalf("upstream got Authorization %q, want the real key", got.Header.Get("Authorization"))
	}
	if c := procComm(ssa.Process.Pid); c != "avpd" {
		t.Fatalf("the process is %q after the request, want avpd", c)
	}
	if !strings.Contains(e.avpdLog.String(), "using 2 socket(s) from systemd") {
		t.Fatalf("avpd did not take the passed sockets:\n%s", e.avpdLog.String())
	}
	if !strings.Contains(jout.String(), "ready on the socket from systemd") {
		t.Fatalf("the journal did not take the passed socket:\n%s", jout.String())
	}
	if _, err := os.Stat(filepath.Join(e.private, "unused.sock")); err == nil {
		t.Fatal("the journal bound its own socket although one was passed")
	}
	e.waitAudit("type", "decision", "decision", "inject", "secret", "OPENAI", "path", "/v1/models")

	// READY=1 came once proxy_start was in the journal's log, with a STATUS= of counts.
	ready := notify.wait(t, 0, 5*time.Second, "READY=1", "STATUS=")
	if len(e.findAudit("type", "proxy_start")) != 1 {
		t.Fatalf("READY=1 without proxy_start in the journal's log")
	}
	if m := notify.all()[ready]; !strings.Contains(m, "1 enrolled uid(s)") || !strings.Contains(m, "secret(s)") || !strings.Contains(m, "request(s)") {
		t.Fatalf("STATUS= does not count: %q", m)
	}
	// WATCHDOG_USEC=2s: a ping every second, so two within three seconds.
	w := notify.wait(t, ready, 3*time.Second, "WATCHDOG=1")
	notify.wait(t, w+1, 3*time.Second, "WATCHDOG=1")

	// doctor sees the journal answer (the other checks are TestDoctor's).
	if c := doctorCheck(t, e, "journal"); c.Status != "ok" {
		t.Fatalf("doctor's journal check: %+v", c)
	}

	ssa.Process.Signal(unix.SIGHUP)
	r := notify.wait(t, 0, 5*time.Second, "RELOADING=1", "MONOTONIC_USEC=")
	notify.wait(t, r+1, 5*time.Second, "READY=1")
	e.waitAudit("type", "config_loaded")

	code, _, err = e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", bearer)
	if err != nil || code != 200 {
		t.Fatalf("after the reload: %d %v", code, err)
	}

	ssa.Process.Signal(unix.SIGTERM)
	select {
	case <-ssaDone:
	case <-time.After(15 * time.Second):
		t.Fatal("avpd did not stop within 15 s of SIGTERM")
	}
	notify.wait(t, 0, time.Second, "STOPPING=1")
	e.waitAudit("type", "proxy_stop")
	// With the journal gone too, doctor names the journal's units.
	journal.Process.Signal(unix.SIGTERM)
	<-journalDone
	if c := doctorCheck(t, e, "journal", "--config", e.config, "--state-dir", e.state); c.Status != "fail" || !strings.Contains(c.Fix, "systemctl start avp-journal.socket") {
		t.Fatalf("doctor's journal check with the journal stopped: %+v", c)
	}
	// The rules stay: enrolled users fail closed until avpd is back.
	if out, err := exec.Command("ip", "netns", "exec", e.ns, "nft", "list", "set", "inet", "agent_vault_proxy", "agents").CombinedOutput(); err != nil || !strings.Contains(string(out), "4242") {
		t.Fatalf("the redirect did not outlive avpd: %v\n%s", err, out)
	}
}

// TestFirewallReconcile: another tool's "nft flush ruleset", "nft delete table" and an
// edited enrolled set are each undone within 2 s; the agent's next request is redirected and
// injected again; every restore is a rules_restored audit event and shows in avpctl status.
func TestFirewallReconcile(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	bearer := "Authorization: Bearer " + phOpenAI
	injected := func(when string) {
		t.Helper()
		code, body, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", bearer)
		if err != nil || code != 200 {
			t.Fatalf("%s: %d %q %v", when, code, body, err)
		}
		if got := e.upstream.last(t); got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("%s: upstream got %q, want the real key (not redirected?)", when, got.Header.Get("Authorization"))
		}
	}
	injected("before")

	nft := func(args ...string) string {
		out, _ := exec.Command("ip", append([]string{"netns", "exec", e.ns, "nft"}, args...)...).CombinedOutput()
		return string(out)
	}
	restoredWithin := func(what string, broken func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for broken() {
			if time.Since(start) > 2*time.Second {
				t.Fatalf("%s: not restored within 2 s:\n%s", what, nft("list", "ruleset"))
			}
			time.Sleep(10 * time.Millisecond)
		}
		return time.Since(start)
	}
	tableGone := func() bool {
		return !strings.Contains(nft("list", "set", "inet", "agent_vault_proxy", "agents"), "4242")
	}

	for i, c := range []struct {
		name   string
		break_ []string
	}{
		{"nft flush ruleset", []string{"flush", "ruleset"}},
		{"nft delete table", []string{"delete", "table", "inet", "agent_vault_proxy"}},
		{"nft delete element", []string{"delete", "element", "inet", "agent_vault_proxy", "agents", "{ 4242 }"}},
	} {
		if out := nft(c.break_...); strings.Contains(out, "Error") {
			t.Fatalf("%s: %s", c.name, out)
		}
		took := restoredWithin(c.name, tableGone)
		t.Logf("%s: restored after %v", c.name, took.Round(time.Millisecond))
		injected("after " + c.name)
		evs := e.findAudit("type", "rules_restored")
		if len(evs) != i+1 {
			t.Fatalf("after %s: %d rules_restored events, want %d", c.name, len(evs), i+1)
		}
	}
	// The listing is the reference ruleset again (same rules, same set).
	if out := nft("list", "table", "inet", "agent_vault_proxy"); !strings.Contains(out, "redirect to :14322") || !strings.Contains(out, "udp dport 443 reject") {
		t.Fatalf("restored table:\n%s", out)
	}

	var st struct {
		Restores uint64     `json:"firewall_restores"`
		Last     *time.Time `json:"firewall_last_restored"`
		Why      string     `json:"firewall_last_restore_reason"`
		OK       bool       `json:"firewall_ok"`
	}
	if err := json.Unmarshal(e.avpctl("status", "--json"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Restores != 3 || st.Last == nil || time.Since(*st.Last) > time.Minute || !strings.Contains(st.Why, "enrolled set") || !st.OK {
		t.Fatalf("status: %+v", st)
	}
	if text := string(e.avpctl("status")); !strings.Contains(text, "restored 3 time(s)") {
		t.Fatalf("avpctl status does not show the restores:\n%s", text)
	}
}

// mountNS is a private mount namespace inside the test's network namespace, kept alive by a
// sleeping process, where the system trust store is a scratch one: avpctl ca install and the
// real update-ca-certificates run there without touching the host's store. The scratch store
// starts empty (an empty /etc/ca-certificates.conf selects none of the distribution's roots),
// which keeps update-ca-certificates fast; only local CAs, avpd's among them, end up in it.
type mountNS struct {
	t   *testing.T
	pid int
}

func newMountNS(t *testing.T, e *env) *mountNS {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", e.ns, "unshare", "--mount", "--propagation", "private", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	m := &mountNS{t: t, pid: cmd.Process.Pid}
	deadline := time.Now().Add(5 * time.Second)
	for procComm(m.pid) != "sleep" {
		if time.Now().After(deadline) {
			t.Fatal("the mount namespace holder did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	scratch := filepath.Join(e.private, "truststore")
	script := fmt.Sprintf(`set -e
mkdir -p %[1]s/certs %[1]s/local %[1]s/hooks
: > %[1]s/ca-certificates.conf
mount --bind %[1]s/certs /etc/ssl/certs
mount --bind %[1]s/local /usr/local/share/ca-certificates
mount --bind %[1]s/ca-certificates.conf /etc/ca-certificates.conf
if [ -d /etc/ca-certificates/update.d ]; then mount --bind %[1]s/hooks /etc/ca-certificates/update.d; fi
`, scratch)
	if out, err := m.cmd("sh", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("set up the scratch trust store: %v\n%s", err, out)
	}
	// One other root, as every real store has: the upstream's CA.
	writeFile(t, filepath.Join(scratch, "local", "e2e-upstream.crt"), e.upCAPEM, 0o644)
	if out, err := m.cmd("update-ca-certificates").CombinedOutput(); err != nil {
		t.Fatalf("update-ca-certificates: %v\n%s", err, out)
	}
	return m
}

func (m *mountNS) cmd(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"-t", strconv.Itoa(m.pid), "-m", "-n", "--", name}, args...)...)
}

// daemonUID stands for the avp user: avpd runs as it with CAP_NET_ADMIN as its only
// (ambient) capability, as avpd.service runs it.
const daemonUID = 4250

// startAvpdAsDaemonUser runs avpd as daemonUID with only CAP_NET_ADMIN, owning its state,
// runtime and private directories (and the config and secrets, as tmpfiles.d sets them up).
func (e *env) startAvpdAsDaemonUser() {
	t := e.t
	t.Helper()
	for _, d := range []string{e.state, e.runtime} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{e.private, e.state, e.runtime, e.config, e.secrets} {
		if err := os.Chown(p, daemonUID, daemonUID); err != nil {
			t.Fatal(err)
		}
	}
	e.avpdLog = &syncBuffer{}
	cmd := exec.Command("ip", "netns", "exec", e.ns, "setpriv",
		fmt.Sprintf("--reuid=%d", daemonUID), fmt.Sprintf("--regid=%d", daemonUID), "--clear-groups",
		"--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin", "--",
		filepath.Join(binDir, "avpd"), "serve", "--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime)
	cmd.Stdout, cmd.Stderr = e.avpdLog, e.avpdLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.avpd = cmd
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("avpd log:\n%s", e.avpdLog.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(e.runtime, "admin.sock")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("avpd did not start as uid %d:\n%s", daemonUID, e.avpdLog.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.bundle = filepath.Join(e.dir, "ca-bundle.pem")
	writeFile(t, e.bundle, append(append([]byte{}, e.upCAPEM...), e.avpctl("ca", "cert")...), 0o644)
}

// TestDoctor: avpctl doctor passes in the e2e setup once the CA is in the (scratch) system
// store, then fails, naming the fix, as each check in turn is broken and repaired. avpd runs
// as an unprivileged user with CAP_NET_ADMIN only, as under avpd.service.
func TestDoctor(t *testing.T) {
	e := newEnv(t)
	e.startAvpdAsDaemonUser()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	m := newMountNS(t, e)
	avpctl := filepath.Join(binDir, "avpctl")
	ctl := func(args ...string) (string, int) {
		t.Helper()
		cmd := m.cmd(avpctl, append([]string{"--runtime-dir", e.runtime}, args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	type report struct {
		OK     bool `json:"ok"`
		Checks []struct {
			Name, Status, Detail, Fix string
		} `json:"checks"`
	}
	doctor := func(args ...string) (report, string) {
		t.Helper()
		out, code := ctl(append([]string{"doctor", "--json"}, args...)...)
		var r report
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("doctor --json: %v\n%s", err, out)
		}
		if (code == 0) != r.OK || code > 1 {
			t.Fatalf("doctor exit %d with ok=%v:\n%s", code, r.OK, out)
		}
		return r, out
	}
	// expectFail runs doctor and wants exactly the named checks failed, each fix naming fix.
	expectFail := func(what string, fails map[string]string, args ...string) {
		t.Helper()
		r, out := doctor(args...)
		if r.OK {
			t.Fatalf("%s: doctor passed:\n%s", what, out)
		}
		got := map[string]bool{}
		for _, c := range r.Checks {
			if c.Status != "fail" {
				continue
			}
			got[c.Name] = true
			want, ok := fails[c.Name]
			if !ok {
				t.Fatalf("%s: unexpected failure of %s:\n%s", what, c.Name, out)
			}
			if !strings.Contains(c.Fix, want) {
				t.Fatalf("%s: the fix for %s is %q, want it to name %q", what, c.Name, c.Fix, want)
			}
		}
		for name := range fails {
			if !got[name] {
				t.Fatalf("%s: %s did not fail:\n%s", what, name, out)
			}
		}
	}
	expectPass := func(what string) {
		t.Helper()
		r, out := doctor("--uid", strconv.Itoa(agentUID))
		if !r.OK {
			t.Fatalf("%s: doctor failed:\n%s", what, out)
		}
	}

	// Before the CA is trusted, that is what doctor names (and the probe agrees).
	expectFail("CA not trusted", map[string]string{"ca-trust": "avpctl ca install", "agent-tls": "avpctl ca install"}, "--uid", strconv.Itoa(agentUID))
	if out, code := ctl("ca", "install"); code != 0 || !strings.Contains(out, "now trusts it") {
		t.Fatalf("ca install: %d\n%s", code, out)
	}
	expectPass("after ca install")
	text, code := ctl("doctor", "--uid", strconv.Itoa(agentUID))
	if code != 0 || !strings.Contains(text, "all checks passed") || !strings.Contains(text, "redirected to avpd, certificate verifies with the system store") {
		t.Fatalf("doctor text: %d\n%s", code, text)
	}
	t.Logf("doctor:\n%s", text)
	if !strings.Contains(text, fmt.Sprintf("user %d,", daemonUID)) {
		t.Fatalf("doctor does not see avpd's user:\n%s", text)
	}
	// The daemon's user owns the CA key; the agent cannot read it.
	if out, err := e.agent(agentUID, "cat", filepath.Join(e.state, "ca-key.pem")); err == nil {
		t.Fatalf("the agent read the CA key: %q", out)
	}

	// The Node/Python variables point at what ca install wrote.
	envOut, code := ctl("ca", "env", "--format", "systemd")
	if code != 0 || !strings.Contains(envOut, `Environment="NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/agent-vault-proxy.crt"`) ||
		!strings.Contains(envOut, `Environment="REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"`) {
		t.Fatalf("ca env: %d\n%s", code, envOut)
	}

	// Each check in turn.
	breakFile := func(path string, mode os.FileMode, fails map[string]string) {
		t.Helper()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		os.Chmod(path, mode)
		expectFail(fmt.Sprintf("chmod %o %s", mode, path), fails, "--uid", strconv.Itoa(agentUID))
		os.Chmod(path, fi.Mode().Perm())
		expectPass("restored " + path)
	}
	breakFile(e.config, 0o666, map[string]string{"config-permissions": "chmod 640 " + e.config})
	breakFile(e.secrets, 0o640, map[string]string{"secret-files": "chmod 600 " + e.secrets})
	breakFile(filepath.Join(e.state, "ca-key.pem"), 0o644, map[string]string{"ca": "chmod 600 " + filepath.Join(e.state, "ca-key.pem")})

	good, _ := os.ReadFile(e.config)
	os.WriteFile(e.config, append(append([]byte{}, good...), []byte("bogus: key\n")...), 0o600)
	expectFail("invalid config", map[string]string{"config": "avpctl bindings check " + e.config}, "--uid", strconv.Itoa(agentUID))
	os.WriteFile(e.config, good, 0o600)
	expectPass("config restored")

	if out, code := ctl("ca", "uninstall"); code != 0 {
		t.Fatalf("ca uninstall: %d\n%s", code, out)
	}
	expectFail("CA removed from the store", map[string]string{"ca-trust": "avpctl ca install", "agent-tls": "avpctl ca install"}, "--uid", strconv.Itoa(agentUID))
	ctl("ca", "install")
	expectPass("CA reinstalled")

	expectFail("user not enrolled", map[string]string{"agent-enrolled": "avpctl enroll-uid 4243", "agent-tls": "avpctl enroll-uid 4243"}, "--uid", "4243")

	// avpd stopped: the rules stay (fail closed), but nothing answers.
	e.avpd.Process.Signal(unix.SIGTERM)
	e.avpd.Wait()
	expectFail("avpd stopped", map[string]string{"avpd": "systemctl start avpd", "listener": "systemctl status avpd.socket", "agent-tls": "systemctl status avpd.socket"},
		"--uid", strconv.Itoa(agentUID), "--config", e.config, "--state-dir", e.state, "--daemon-user", strconv.Itoa(daemonUID))
	run(t, "ip", "netns", "exec", e.ns, "nft", "delete", "table", "inet", "agent_vault_proxy")
	expectFail("avpd stopped and table deleted", map[string]string{
		"avpd": "systemctl start avpd", "listener": "systemctl status avpd.socket", "firewall": "start it (systemctl start avpd)",
		"agent-tls": "avpctl enroll-uid 4242",
	}, "--uid", strconv.Itoa(agentUID), "--config", e.config, "--state-dir", e.state, "--daemon-user", strconv.Itoa(daemonUID))
}

// TestTmpfilesOwnsStateFiles: moving from "Running it by hand" (avpd as root) to the
// production install left root-owned ca-key.pem and enrolled.json in
// /var/lib/agent-vault-proxy: tmpfiles' d line and StateDirectory= chown only the directory
// (StateDirectory= recurses only when the directory's own owner is wrong, which tmpfiles had
// just fixed), so avp could not read them after a reboot and enrolled users went direct.
// systemd-tmpfiles --create (which also runs at every boot) now gives every file in it to avp.
// Found by the operator review (rt1).
func TestTmpfilesOwnsStateFiles(t *testing.T) {
	if _, err := exec.LookPath("systemd-tmpfiles"); err != nil {
		t.Fatalf("systemd-tmpfiles is missing (apt-get install systemd): %v", err)
	}
	root := t.TempDir()
	const avpUID = 4999
	state := filepath.Join(root, "var/lib/agent-vault-proxy")
	for _, d := range []string{filepath.Join(root, "etc"), state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(root, "etc/passwd"), []byte("avp:x:4999:4999::/:/usr/sbin/nologin\navp-audit:x:4998:4998::/:/usr/sbin/nologin\n"), 0o644)
	writeFile(t, filepath.Join(root, "etc/group"), []byte("avp:x:4999:\navp-audit:x:4998:\navp-admin:x:4997:\n"), 0o644)
	writeFile(t, filepath.Join(state, "ca-key.pem"), []byte("key"), 0o600)
	writeFile(t, filepath.Join(state, "enrolled.json"), []byte(`{"uids":[4242]}`), 0o600)
	// As installed, and as the README runs it.
	conf, err := os.ReadFile("../../systemd/tmpfiles.conf")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "etc/tmpfiles.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "etc/tmpfiles.d/agent-vault-proxy.conf"), conf, 0o644)
	out, err := exec.Command("systemd-tmpfiles", "--create", "--root="+root, "agent-vault-proxy.conf").CombinedOutput()
	t.Logf("systemd-tmpfiles: %v\n%s", err, out)
	for _, name := range []string{".", "ca-key.pem", "enrolled.json"} {
		fi, err := os.Stat(filepath.Join(state, name))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != avpUID || st.Gid != avpUID {
			t.Errorf("%s after systemd-tmpfiles --create: owner %d:%d, want avp (%d:%d)", name, st.Uid, st.Gid, avpUID, avpUID)
		}
		if name != "." && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s after systemd-tmpfiles --create: mode %04o, want 0600 kept", name, fi.Mode().Perm())
		}
	}
}
