package e2e

// Lifecycle and crash safety: each test failed on the code before its fix and says what
// went wrong; each is bounded in time.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// stopAvpd sends SIGTERM to the running avpd and waits for it (bounded).
func (e *env) stopAvpd() {
	e.t.Helper()
	e.avpd.Process.Signal(unix.SIGTERM)
	done := make(chan struct{})
	go func() { e.avpd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		e.avpd.Process.Kill()
		<-done
	}
	// The admin socket is unlinked on a clean stop; a later startAvpd waits for a new one.
	os.Remove(filepath.Join(e.runtime, "admin.sock"))
}

// kernelSet lists the enrolled set as the kernel holds it in the test's namespace.
func (e *env) kernelSet() string {
	out, _ := exec.Command("ip", "netns", "exec", e.ns, "nft", "list", "set", "inet", "agent_vault_proxy", "agents").CombinedOutput()
	return string(out)
}

// TestLifecycleUnenrollStopsInjectionOnOpenConnection: after `avpctl unenroll-uid` returns, avpd
// must not inject a real secret for that UID any more. avpd checks enrollment only when it
// accepts a connection, so an agent's keep-alive connection opened before the unenroll
// keeps getting the real key injected for as long as the agent keeps it open.
func TestLifecycleUnenrollStopsInjectionOnOpenConnection(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))

	script := filepath.Join(e.dir, "keepalive.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=%q)
c = http.client.HTTPSConnection(%q, 443, context=ctx, timeout=15)
h = {"Authorization": "Bearer %s"}
c.request("GET", "/v1/before-unenroll", headers=h); r = c.getresponse(); r.read()
print("first", r.status, flush=True)
sys.stdin.readline()
c.request("GET", "/v1/after-unenroll", headers=h); r = c.getresponse(); r.read()
print("second", r.status, flush=True)
`, e.bundle, hostOpenAI, phOpenAI)), 0o644)

	cmd := e.agentCmd(agentUID, "python3", script)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	kill := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
	defer func() { kill.Stop(); stdin.Close(); cmd.Process.Kill(); cmd.Wait() }()
	rd := bufio.NewReader(stdout)
	if line, err := readLine(rd, 15*time.Second); err != nil || !strings.HasPrefix(line, "first 200") {
		t.Fatalf("first request: %q %v\n%s", line, err, stderr.String())
	}

	// The operator takes the agent's user out of avpd.
	e.avpctl("unenroll-uid", strconv.Itoa(agentUID))

	stdin.Write([]byte("go\n"))
	if line, err := readLine(rd, 15*time.Second); err != nil || !strings.HasPrefix(line, "second") {
		t.Fatalf("second request: %q %v\n%s", line, err, stderr.String())
	}
	seen := false
	for _, r := range e.upstream.requests() {
		if r.Path == "/v1/after-unenroll" && strings.Contains(r.Header.Get("Authorization"), realOpenAI) {
			inj := e.findAudit("decision", "inject", "path", "/v1/after-unenroll")
			t.Fatalf("uid %d was unenrolled (avpctl unenroll-uid returned), yet its request on a connection opened before went upstream with the REAL key injected; audit: %v", agentUID, inj)
		}
		seen = seen || r.Path == "/v1/after-unenroll" && r.Header.Get("Authorization") == "Bearer "+phOpenAI
	}
	if !seen {
		t.Fatal("the request after the unenroll did not reach the upstream verbatim")
	}
	e.waitAudit("decision", "forward_verbatim", "reason", "uid_not_enrolled", "path", "/v1/after-unenroll")
}

// startFails runs one avpd start, as the unit would at boot, which the test expects to fail:
// its output and error (nil if it started after all; it is then stopped by the timeout).
func (e *env) startFails() ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpd"), "serve",
		"--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime).CombinedOutput()
}

// TestLifecycleRedirectBackAtBootWithInvalidConfig: the README promises that after a power cut
// "the enabled avpd.service puts the rules back at boot: the enrolled user's first request
// goes to avpd, never straight out", and that enrolled users fail closed while avpd is
// down. avpd installs its table only after the config parsed, so when bindings.yaml is
// invalid at boot (an edit whose reload was refused, left on disk) avpd never installs it
// and the enrolled user's HTTPS goes straight to the internet for as long as the config
// stays broken (systemd restarts avpd every second, and every start fails the same way).
func TestLifecycleRedirectBackAtBootWithInvalidConfig(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))

	// The operator edits the config; the reload is refused and the file stays as written.
	e.writeConfig(strings.Replace(defaultBindings, "methods: [GET, POST]", "methods: [GET, post]", 1))
	if out, err := e.avpctlErr("reload"); err == nil {
		t.Fatalf("reload of an invalid config succeeded:\n%s", out)
	}

	// Power cut: avpd is gone and the kernel has forgotten the table.
	e.stopAvpd()
	run(t, "ip", "netns", "exec", e.ns, "nft", "delete", "table", "inet", "agent_vault_proxy")

	// Boot: avpd.service starts avpd (and would keep restarting it).
	out, err := e.startFails()
	if err == nil {
		t.Fatalf("avpd started with an invalid config:\n%s", out)
	}
	t.Logf("avpd at boot: %v: %s", err, strings.TrimSpace(string(out)))

	// The enrolled agent's first HTTPS request after boot.
	code, _, cerr := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/boot-bypass", "Authorization: Bearer "+phOpenAI)
	for _, r := range e.upstream.requests() {
		if r.Path == "/v1/boot-bypass" {
			t.Fatalf("avpd refused to start (invalid config) and left no redirect: enrolled uid %d reached the upstream directly (HTTP %d, curl err %v); kernel ruleset:\n%s",
				agentUID, code, cerr, e.kernelSet())
		}
	}
}

// TestLifecycleRedirectBackAtBootWhenAuditLogCannotOpen: an in-process audit log avpd cannot
// open at boot (under the unit, ProtectSystem=strict and a directory of another user do
// that) made start panic while it cleaned up, before it put the redirect back: the enrolled
// user's HTTPS went straight out.
func TestLifecycleRedirectBackAtBootWhenAuditLogCannotOpen(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.stopAvpd()
	run(t, "ip", "netns", "exec", e.ns, "nft", "delete", "table", "inet", "agent_vault_proxy") // a reboot
	// An audit.path avpd cannot open: its parent is a regular file (root opens anything else).
	notDir := filepath.Join(e.private, "not-a-dir")
	writeFile(t, notDir, []byte("x"), 0o600)
	cfg := strings.Replace(mustRead(t, e.config), "audit: {path: "+e.audit+"}", "audit: {path: "+filepath.Join(notDir, "audit.jsonl")+"}", 1)
	if cfg == mustRead(t, e.config) {
		t.Fatal("setup: the config has no audit.path to replace")
	}
	writeFile(t, e.config, []byte(cfg), 0o600)
	out, err := e.startFails()
	if err == nil {
		t.Fatalf("avpd started with an audit log it cannot open:\n%s", out)
	}
	if strings.Contains(string(out), "panic:") || !strings.Contains(string(out), "not-a-dir") {
		t.Errorf("avpd did not name the audit log it cannot open:\n%.1500s", out)
	}
	if err := exec.Command("ip", "netns", "exec", e.ns, "nft", "list", "table", "inet", "agent_vault_proxy").Run(); err != nil {
		t.Errorf("after the failed start the redirect is not back (nft list table: %v): enrolled uid %d's HTTPS goes out directly", err, agentUID)
	}
}

// TestLifecycleStateDirWritableByAgent: avpd refuses a CA key readable by others, but not a state
// directory writable by them (an operator's `mkdir` under umask 000, or a --state-dir that
// already existed). avpd then trusts enrolled.json as "the truth" for what the kernel must
// hold, so the enrolled agent itself replaces it and is dropped from the redirect by the
// firewall reconcile within a second of the operator's next enroll-uid of anyone.
func TestLifecycleStateDirWritableByAgent(t *testing.T) {
	e := newEnv(t)
	if err := os.Mkdir(e.state, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(e.state, 0o777) // as mkdir leaves it under umask 000
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	fi, _ := os.Stat(e.state)
	t.Logf("state dir %s mode %04o after avpd started", e.state, fi.Mode().Perm())

	// The agent (uid 4242, enrolled) rewrites the enrollment file.
	enrolled := filepath.Join(e.state, "enrolled.json")
	if out, err := e.agent(agentUID, "sh", "-c",
		fmt.Sprintf(`printf '{"uids":[]}\n' > %[1]s/.x && mv -f %[1]s/.x %[2]s`, e.state, enrolled)); err != nil {
		t.Logf("agent could not replace %s: %v %s", enrolled, err, out)
	}
	// The operator enrolls another user later; the reconcile then makes the kernel match.
	e.avpctl("enroll-uid", strconv.Itoa(otherAgentUID))
	time.Sleep(2500 * time.Millisecond)
	set := e.kernelSet()
	if !strings.Contains(set, strconv.Itoa(agentUID)) {
		t.Fatalf("avpd ran with a state directory of mode %04o; the enrolled agent replaced %s and is no longer redirected (kernel set:\n%s)",
			fi.Mode().Perm(), enrolled, set)
	}
}

// TestLifecycleSIGHUPDuringStartup: SIGHUP is avpd's reload signal, but avpd installs its handler
// only once start-up is done; a SIGHUP before then (a reload script, a config-management
// run right after a restart) kills avpd with no log line and no proxy_stop event.
var startupSignalDelay = 25 * time.Millisecond

func TestLifecycleSIGHUPDuringStartup(t *testing.T) {
	e := newEnv(t)
	os.MkdirAll(filepath.Dir(e.audit), 0o700)
	var log syncBuffer
	cmd := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpd"), "serve",
		"--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime)
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
		}
	})
	// As soon as ip netns exec has exec'd avpd (a signal to ip itself would prove nothing):
	// avpd is starting.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid)); strings.HasSuffix(exe, "/avpd") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("avpd never started")
		}
		time.Sleep(100 * time.Microsecond)
	}
	// Before main (the dynamic loader, the runtime, package initialization: about 10 ms
	// here) a SIGHUP ends any program; from main on avpd must survive one. Before its fix
	// avpd took its handler only once start-up was done, about 100 ms later.
	time.Sleep(startupSignalDelay)
	cmd.Process.Signal(unix.SIGHUP)
	select {
	case err := <-done:
		done <- err
		t.Fatalf("a SIGHUP during start-up killed avpd (%v); its log: %q", err, log.String())
	case <-time.After(3 * time.Second):
	}
}

// TestLifecycleJournalKeyCrashAtCreation: the journal created its MAC key with
// O_CREAT|O_EXCL and then wrote it. A SIGKILL (or power cut) between the two left an empty
// journal.key, which every later start refused, so the journal never came back and every
// avpd request got 503 audit_unavailable until an operator deleted the file. The key is now
// written to a temporary file and linked into place. The crashes are real: strace delivers
// SIGKILL at the journal's first write and fsync (the key's) and at the link.
func TestLifecycleJournalKeyCrashAtCreation(t *testing.T) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("strace is not installed (.ci/run installs it)")
		}
		t.Skip("strace is not installed")
	}
	for _, at := range []string{"write", "fsync", "link,linkat"} {
		t.Run(at, func(t *testing.T) {
			dir := t.TempDir()
			log := filepath.Join(dir, "log", "audit.jsonl")
			key := filepath.Join(dir, "log", "journal.key")
			sock := filepath.Join(dir, "journal.sock")
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			first := exec.CommandContext(ctx, strace, "-f", "-qq", "-o", "/dev/null",
				"-e", "trace="+at, "-e", "inject="+at+":signal=KILL:when=1",
				filepath.Join(binDir, "avpd"), "journal", "--log", log, "--socket", sock, "--journald", "off")
			first.WaitDelay = time.Second
			out, err := first.CombinedOutput()
			t.Logf("first start, killed at its first %s: %v %s", at, err, out)
			if st, serr := os.Stat(key); serr == nil && st.Size() == 0 {
				t.Fatalf("a crash at the first %s left an empty key", at)
			}
			if _, serr := os.Stat(log); serr == nil {
				t.Fatalf("the kill at the first %s came after the log was created: not a crash during the key's creation", at)
			}

			// The service manager starts it again.
			j := exec.CommandContext(ctx, filepath.Join(binDir, "avpd"), "journal", "--log", log, "--socket", sock, "--journald", "off")
			var jl syncBuffer
			j.Stdout, j.Stderr = &jl, &jl
			if err := j.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- j.Wait() }()
			defer func() { j.Process.Signal(unix.SIGTERM); <-done }()
			select {
			case err := <-done:
				done <- err
				t.Fatalf("after a crash at the first %s of its first start, the journal refuses to start: %v: %s", at, err, jl.String())
			case <-time.After(2 * time.Second):
			}
		})
	}
}

// TestLifecycleInProcessAuditTornTail: the in-process audit writer (audit.path, the default)
// appends after whatever the file ends with. A crash that leaves a torn last line (a power
// cut before the unacknowledged write reached the disk, or a short write on a full disk)
// makes the next acknowledged event, proxy_start after a restart, part of an unparseable
// line. avpctl audit tail then skips it without a word: the restart is invisible.
func TestLifecycleInProcessAuditTornTail(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	if code, _, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/before-crash", "Authorization: Bearer "+phOpenAI); err != nil || code != 200 {
		t.Fatalf("request before the crash: %d %v", code, err)
	}
	e.stopAvpd()
	// What a crash mid-append leaves: part of a line, no newline.
	f, err := os.OpenFile(e.audit, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"ts":"2026-11-29T10:00:00Z","type":"decision","decision":"inj`)
	f.Close()

	e.startAvpd()
	if code, _, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/after-restart", "Authorization: Bearer "+phOpenAI); err != nil || code != 200 {
		t.Fatalf("request after the restart: %d %v", code, err)
	}
	out, _ := exec.Command(filepath.Join(binDir, "avpctl"), "audit", "tail", "-n", "100", e.audit).CombinedOutput()
	if n := strings.Count(string(out), "proxy_start"); n != 2 {
		t.Fatalf("two avpd starts were acknowledged, avpctl audit tail shows %d and no warning:\n%s\nthe file:\n%s", n, out, mustRead(t, e.audit))
	}
}

// TestLifecycleStartDropsKernelEnrollmentSilently: avpd's start replaces the kernel's enrolled set
// with enrolled.json. When that file is missing (a state directory restored from a backup
// of the CA, `systemctl clean --what=state`, a typo in --state-dir that still finds a CA),
// every UID the kernel was redirecting is dropped, and nothing says so: no log line, no
// unenroll or rules_restored event; the audit trail still ends with "enroll uid 4242".
// The every-second reconcile audits the same change as rules_restored; start does not.
func TestLifecycleStartDropsKernelEnrollmentSilently(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	e.stopAvpd()
	if !strings.Contains(e.kernelSet(), strconv.Itoa(agentUID)) {
		t.Fatalf("the set lost uid %d at stop:\n%s", agentUID, e.kernelSet())
	}
	os.Remove(filepath.Join(e.state, "enrolled.json"))
	before := len(e.auditEvents())
	e.startAvpd()
	time.Sleep(1500 * time.Millisecond) // a reconcile pass, too
	if strings.Contains(e.kernelSet(), strconv.Itoa(agentUID)) {
		return // kept: fine
	}
	said := strings.Contains(e.avpdLog.String(), strconv.Itoa(agentUID))
	for _, ev := range e.auditEvents()[before:] {
		if fmt.Sprint(ev["uid"]) == strconv.Itoa(agentUID) || strings.Contains(fmt.Sprint(ev["detail"]), strconv.Itoa(agentUID)) {
			said = true
		}
	}
	if !said {
		t.Fatalf("avpd started without enrolled.json and removed uid %d from the kernel's set (now:\n%s) with no log line and no audit event; the audit log since the restart:\n%v",
			agentUID, e.kernelSet(), e.auditEvents()[before:])
	}
}

// TestLifecycleReconcileSeesEditedRules: the README says avpd "checks its table, chains, rules and
// enrolled set every second, restores them ... when they differ". The check counts the
// rules of each chain but never looks at what they do: another tool that replaces the
// redirect with a rule that does not redirect (and the filter rules with no-ops), keeping
// the counts, leaves avpd's status at "firewall: ok" and the enrolled user going straight
// out for as long as avpd runs.
func TestLifecycleReconcileSeesEditedRules(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	nft := func(args ...string) { run(t, "ip", append([]string{"netns", "exec", e.ns, "nft"}, args...)...) }
	nft("flush", "chain", "inet", "agent_vault_proxy", "nat_output")
	nft("add", "rule", "inet", "agent_vault_proxy", "nat_output", "meta", "skuid", "@agents", "tcp", "dport", "443", "counter")
	nft("flush", "chain", "inet", "agent_vault_proxy", "filter_output")
	nft("add", "rule", "inet", "agent_vault_proxy", "filter_output", "counter")
	nft("add", "rule", "inet", "agent_vault_proxy", "filter_output", "counter")
	time.Sleep(2500 * time.Millisecond) // README: restored within 2 s
	e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/after-rule-edit", "Authorization: Bearer "+phOpenAI)
	for _, r := range e.upstream.requests() {
		if r.Path == "/v1/after-rule-edit" && strings.Contains(r.Header.Get("Authorization"), phOpenAI) {
			status := e.avpctl("status")
			t.Fatalf("2.5 s after another tool replaced avpd's rules (same rule counts), enrolled uid %d reached the upstream directly; avpctl status:\n%s\nkernel:\n%s",
				agentUID, status, mustOut(exec.Command("ip", "netns", "exec", e.ns, "nft", "list", "table", "inet", "agent_vault_proxy")))
		}
	}
}

func mustOut(c *exec.Cmd) string {
	out, _ := c.CombinedOutput()
	return string(out)
}

// TestLifecycleReloadStallsProxyAndWatchdog: a reload waits (gate.Lock) for every request decided
// under the old policy to write its headers upstream, holding d.mu meanwhile. One injecting
// request whose upstream does not answer its SYN (10 s dial timeout) then (1) stalls every
// other agent's request, since a pending writer blocks new readers of the RWMutex gate,
// (2) blocks avpctl status, and (3) blocks the serving loop at its next STATUS= update
// (statusLine takes d.mu), so no WATCHDOG=1 is sent for longer than WatchdogSec=10s:
// systemd would kill avpd mid-traffic because of one `systemctl reload`.
func TestLifecycleReloadStallsProxyAndWatchdog(t *testing.T) {
	e := newEnv(t)
	// A fake sd_notify socket that records the watchdog pings.
	nsock := filepath.Join(e.dir, "notify.sock")
	na, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: nsock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer na.Close()
	var pmu sync.Mutex
	var pings []time.Time
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := na.ReadFromUnix(buf)
			if err != nil {
				return
			}
			if strings.Contains(string(buf[:n]), "WATCHDOG=1") {
				pmu.Lock()
				pings = append(pings, time.Now())
				pmu.Unlock()
			}
		}
	}()
	e.avpdEnv = append(os.Environ(), "NOTIFY_SOCKET="+nsock, "WATCHDOG_USEC=10000000") // WatchdogSec=10s, as avpd.service
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	// An upstream address that drops avpd's SYNs (a dead host, a blackholed route).
	nft := func(args ...string) { run(t, "ip", append([]string{"netns", "exec", e.ns, "nft"}, args...)...) }
	nft("add", "table", "inet", "rtblk")
	nft("add", "chain", "inet", "rtblk", "out", "{ type filter hook output priority 0; }")
	nft("add", "rule", "inet", "rtblk", "out", "ip", "daddr", "127.0.0.3", "tcp", "dport", "443", "meta", "skuid", "0", "drop")
	time.Sleep(5500 * time.Millisecond) // a first watchdog ping

	slow := make(chan struct{})
	go func() {
		defer close(slow)
		e.agent(agentUID, "curl", "-sS", "-o", "/dev/null", "--max-time", "25", "--resolve", hostOpenAI+":443:127.0.0.3",
			"-H", "Authorization: Bearer "+phOpenAI, "https://"+hostOpenAI+"/v1/slow-upstream")
	}()
	time.Sleep(300 * time.Millisecond)
	reloaded := make(chan time.Duration, 1)
	go func() { s := time.Now(); e.avpctlErr("reload"); reloaded <- time.Since(s) }()
	time.Sleep(300 * time.Millisecond)

	// Another agent request, to a healthy upstream.
	s := time.Now()
	code, _, _ := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/healthy", "Authorization: Bearer "+phOpenAI)
	healthy := time.Since(s)
	rl := <-reloaded
	<-slow
	time.Sleep(1 * time.Second)
	pmu.Lock()
	var maxGap time.Duration
	for i := 1; i < len(pings); i++ {
		maxGap = max(maxGap, pings[i].Sub(pings[i-1]))
	}
	pmu.Unlock()
	t.Logf("reload took %v; a request to a healthy upstream took %v (HTTP %d); longest gap between WATCHDOG=1 pings %v", rl, healthy, code, maxGap)
	var bad []string
	if healthy > 3*time.Second {
		bad = append(bad, fmt.Sprintf("a request to a healthy upstream waited %v behind the reload", healthy))
	}
	if maxGap >= 10*time.Second {
		bad = append(bad, fmt.Sprintf("no WATCHDOG=1 for %v (WatchdogSec=10s): systemd would have killed avpd", maxGap))
	}
	if len(bad) > 0 {
		t.Fatalf("one injecting request to an unresponsive upstream during a reload: %s", strings.Join(bad, "; "))
	}
}
