package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store/bwsfake"
)

// container is a Debian booted by systemd-nspawn with systemd as its PID 1: the host's root
// file system as the read-only lower layer of an overlay, so whatever the test installs lands
// in a throwaway upper layer that survives a reboot of the container, and a private network
// namespace (attached as ns for the harness) that does not.
type container struct {
	t      *testing.T
	nspawn string
	root   string // the overlay, seen from the host
	pid    int    // the container's init, seen from the host
	ns     string
	out    *syncBuffer
	cmd    *exec.Cmd
	done   chan struct{}
}

// bootContainer makes the overlay and boots it to basic.target; the test's cleanup stops
// the container and removes everything.
func bootContainer(t *testing.T) *container {
	t.Helper()
	nspawn, err := exec.LookPath("systemd-nspawn")
	if err != nil {
		t.Fatalf("systemd-nspawn is missing (apt-get install systemd-container): %v", err)
	}
	base, err := os.MkdirTemp("", "avp-boot-")
	if err != nil {
		t.Fatal(err)
	}
	c := &container{t: t, nspawn: nspawn, root: filepath.Join(base, "root"), out: &syncBuffer{},
		ns: fmt.Sprintf("avpboot-%d", os.Getpid())}
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=/,upperdir=%s,workdir=%s", filepath.Join(base, "upper"), filepath.Join(base, "work"))
	if err := unix.Mount("overlay", c.root, "overlay", 0, opts); err != nil {
		os.RemoveAll(base)
		t.Fatalf("overlay over /: %v", err)
	}
	t.Cleanup(func() {
		c.stop()
		if err := unix.Unmount(c.root, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount the overlay %s: %v", c.root, err)
		}
		os.RemoveAll(base)
		if t.Failed() {
			t.Logf("container console:\n%s", c.out.String())
		}
	})
	// A machine ID of its own, or journald refuses to run beside the host's.
	os.Remove(filepath.Join(c.root, "etc/machine-id"))
	// The container's network is loopback only: waiting for it to be "online" would hold
	// multi-user.target (and whatever of the host's services wants it) for two minutes.
	os.Symlink("/dev/null", filepath.Join(c.root, "etc/systemd/system/systemd-networkd-wait-online.service"))
	c.boot("basic.target")
	return c
}

// boot starts the container's systemd with the given target and waits until it has booted.
func (c *container) boot(target string) {
	t := c.t
	t.Helper()
	c.pid = 0
	c.done = make(chan struct{})
	c.cmd = exec.Command(c.nspawn, "-D", c.root, "--boot", "--private-network", "--register=no",
		"--keep-unit", "-M", c.ns, "--", "systemd.unit="+target)
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	c.cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(c.cmd, c.done)

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-c.done:
			t.Fatalf("systemd-nspawn exited:\n%s", c.out.String())
		default:
		}
		if time.Now().After(deadline) {
			jobs, _ := exec.Command("nsenter", "--target", strconv.Itoa(c.pid), "--all", "systemctl", "list-jobs", "--no-pager").CombinedOutput()
			t.Fatalf("the container did not finish booting in 30 s; jobs:\n%s", jobs)
		}
		time.Sleep(200 * time.Millisecond)
		if c.pid == 0 {
			kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", c.cmd.Process.Pid, c.cmd.Process.Pid))
			if f := strings.Fields(string(kids)); len(f) > 0 {
				c.pid, _ = strconv.Atoi(f[0])
			}
			continue
		}
		out, _ := exec.Command("nsenter", "--target", strconv.Itoa(c.pid), "--all", "systemctl", "is-system-running").Output()
		state := strings.TrimSpace(string(out))
		if state == "running" || state == "degraded" {
			break
		}
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c.pid)); strings.TrimSpace(string(comm)) != "systemd" {
		t.Fatalf("the container's init is %q, not systemd", comm)
	}
	// The harness reaches network namespaces by name.
	run(t, "ip", "netns", "attach", c.ns, strconv.Itoa(c.pid))
}

// stop ends the container at once, as a power cut would: killing a PID namespace's init
// ends every process in it, and nspawn then exits. Its network namespace goes with it.
func (c *container) stop() {
	if c.pid > 0 {
		unix.Kill(c.pid, unix.SIGKILL)
	}
	if c.cmd != nil && c.cmd.Process != nil {
		select {
		case <-c.done:
		case <-time.After(15 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	}
	exec.Command("ip", "netns", "delete", c.ns).Run()
	c.pid, c.cmd = 0, nil
}

// sh runs a shell script inside the container, as root in all its namespaces, and returns
// its output; a failure ends the test with that output.
func (c *container) sh(script string) string {
	c.t.Helper()
	out, err := c.shErr(script)
	if err != nil {
		c.t.Fatalf("in the container: %v\n--- script\n%s\n--- output\n%s", err, script, out)
	}
	return out
}

func (c *container) shErr(script string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", "--target", strconv.Itoa(c.pid), "--all", "sh", "-ec", script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// installAsReadme runs make install into the container and the README's production steps
// inside it, with the given backend section and a setup script that runs before the config
// is checked (to put the backend's files in place). It ends with avpctl doctor, which must
// pass.
func (c *container) installAsReadme(up *upstream, backend, setup string) {
	t := c.t
	t.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("make", "-C", repo, "--no-print-directory", "install", "DESTDIR="+c.root, "BIN="+binDir).CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	hosts, err := os.ReadFile(filepath.Join(c.root, "etc/hosts"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(c.root, "etc/hosts"), append(hosts, []byte("\n127.0.0.2 "+hostOpenAI+"\n")...), 0o644)
	writeFile(t, filepath.Join(c.root, "root/upstream-ca.pem"), up.caPEM, 0o644)

	c.sh(`systemctl daemon-reload
systemd-sysusers agent-vault-proxy.conf
systemd-tmpfiles --create agent-vault-proxy.conf
id agent >/dev/null 2>&1 || useradd --create-home agent
install -m 0644 /root/upstream-ca.pem /etc/agent-vault-proxy/upstream-ca.pem
` + setup + `
cat >/etc/agent-vault-proxy/bindings.yaml <<'END'
version: 1
` + backend + `
proxy: {upstream_ca_file: /etc/agent-vault-proxy/upstream-ca.pem}
audit: {socket: /run/avp-journal/journal.sock}
secrets:
  OPENAI:
    placeholder: ` + phOpenAI + `
    inject: {header: Authorization, format: "Bearer {secret}"}
    bindings:
      - host: ` + hostOpenAI + `
        methods: [GET, POST]
        paths: ["/v1/**"]
END
systemd-tmpfiles --create agent-vault-proxy.conf
avpctl bindings check
systemctl enable --now avp-journal.socket avpd.socket avpd.service
avpctl enroll-uid agent
avpctl ca install
`)
	if out, err := c.shErr("avpctl doctor --uid agent"); err != nil {
		t.Fatalf("avpctl doctor --uid agent: %v\n%s", err, out)
	}
}

// agentCurl makes one request as the agent user (who trusts avpd's CA through the system
// store) and returns the HTTP status curl printed.
func (c *container) agentCurl() (string, error) {
	return c.shErr(`runuser -u agent -- curl -sS --max-time 20 -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer ` + phOpenAI + `' https://` + hostOpenAI + `/v1/models`)
}

// agentRequest makes one request as the agent user and checks that exactly one request
// reached the upstream, with the real key.
func (c *container) agentRequest(up *upstream, label string) {
	t := c.t
	t.Helper()
	n := len(up.requests())
	out, err := c.agentCurl()
	if err != nil || out != "200" {
		t.Fatalf("%s: the agent's curl: %v %q\n%s", label, err, out, c.sh("journalctl -u avpd.service --no-pager | tail -20"))
	}
	reqs := up.requests()
	if len(reqs) != n+1 || reqs[n].Header.Get("Authorization") != "Bearer "+realOpenAI {
		t.Fatalf("%s: the upstream saw %d new request(s), last %+v; want one with the real key", label, len(reqs)-n, up.last(t))
	}
}

// TestProductionInstallUnderSystemd follows the README's production install on a machine
// where systemd is PID 1: make install, sysusers, tmpfiles, the units enabled with
// --now, enroll, CA install, doctor. Then an agent user's request is injected, avpd and the
// journal run as their own users, a killed avpd is restarted by systemd and injects again,
// and a request to a stopped avpd starts it through its socket.
func TestProductionInstallUnderSystemd(t *testing.T) {
	c := bootContainer(t)
	up := startUpstream(t, c.ns, t.TempDir())
	c.installAsReadme(up, "backend: {type: file, file: {path: /etc/agent-vault-proxy/secrets.yaml}}",
		"(umask 077; printf 'OPENAI: "+realOpenAI+"\\n' >/etc/agent-vault-proxy/secrets.yaml)")

	owners := c.sh(`ps -o user= -p "$(systemctl show -P MainPID avpd.service)"
ps -o user= -p "$(systemctl show -P MainPID avp-journal.service)"`)
	if f := strings.Fields(owners); len(f) != 2 || f[0] != "avp" || f[1] != "avp-audit" {
		t.Fatalf("avpd and the journal run as %q, want avp and avp-audit", owners)
	}

	c.agentRequest(up, "first request")
	audit := mustRead(t, filepath.Join(c.root, "var/log/agent-vault-proxy/audit.jsonl"))
	if !strings.Contains(audit, `"decision":"inject"`) || strings.Contains(audit, realOpenAI) {
		t.Fatalf("the journal's log:\n%s", audit)
	}

	// The admin socket is for root and avp-admin only.
	if out, err := c.shErr("runuser -u agent -- avpctl status"); err == nil {
		t.Fatalf("the agent user could use the admin socket:\n%s", out)
	}

	c.sh("systemctl reload avpd.service")
	c.agentRequest(up, "after systemctl reload")

	// A crash: systemd restarts avpd (Restart=on-failure), which puts its rules back.
	before := strings.TrimSpace(c.sh("systemctl show -P MainPID avpd.service"))
	c.sh("systemctl kill --signal=SIGKILL avpd.service")
	deadline := time.Now().Add(30 * time.Second)
	for {
		state := strings.TrimSpace(c.sh("systemctl show -P ActiveState avpd.service; systemctl show -P MainPID avpd.service"))
		if f := strings.Fields(state); len(f) == 2 && f[0] == "active" && f[1] != before && f[1] != "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("avpd was not restarted after SIGKILL: %q\n%s", state, c.sh("journalctl -u avpd.service --no-pager | tail -20"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.agentRequest(up, "after a crash and restart")

	// Stopped: the rules stay and the socket unit keeps listening, so an agent's request
	// starts avpd again instead of going anywhere else.
	c.sh("systemctl stop avpd.service")
	if state := strings.TrimSpace(c.sh("systemctl show -P ActiveState avpd.service")); state != "inactive" {
		t.Fatalf("avpd.service is %q after stop", state)
	}
	c.agentRequest(up, "a request to a stopped avpd")
	if state := strings.TrimSpace(c.sh("systemctl show -P ActiveState avpd.service")); state != "active" {
		t.Fatalf("avpd.service is %q after a request woke it", state)
	}

	// The journal restarted: avpd dials it again on the next event. The journal gone
	// (socket and service stopped): the agent gets 503 and the upstream nothing.
	c.sh("systemctl restart avp-journal.service")
	c.agentRequest(up, "after the journal restarted")
	c.sh("systemctl stop avp-journal.socket avp-journal.service")
	n := len(up.requests())
	out, _ := c.agentCurl()
	if out != "503" || len(up.requests()) != n {
		t.Fatalf("with the journal down: curl %q and %d request(s) upstream; want 503 and none", out, len(up.requests())-n)
	}
	c.sh("systemctl start avp-journal.socket")
	c.agentRequest(up, "after the journal's socket came back")
	// The refused request's line reaches the log once the journal answers again, and the
	// chain still verifies.
	deadline = time.Now().Add(40 * time.Second)
	for !strings.Contains(c.sh("avpctl audit tail -n 50 --decision refuse --json"), `"reason":"audit_unavailable"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no late audit_unavailable refusal in the log:\n%s", c.sh("avpctl audit tail -n 20"))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if out, err := c.shErr("avpctl audit verify"); err != nil {
		t.Fatalf("avpctl audit verify after the journal's outage: %v\n%s", err, out)
	}
	if logs := c.sh("journalctl -u avpd.service -u avp-journal.service --no-pager"); strings.Contains(logs, realOpenAI) {
		t.Fatalf("a real secret reached the system journal:\n%s", logs)
	}

	// A power cut and a boot to multi-user.target: the kernel forgot the rules (a new
	// network namespace), and the enabled avpd.service puts them back, with the enrolled
	// user, before anything else. The agent is redirected at once: with the upstream's new
	// certificate not yet trusted its request fails at avpd (502), and nothing reaches the
	// upstream directly.
	c.stop()
	c.boot("multi-user.target")
	if state := strings.TrimSpace(c.sh("systemctl show -P ActiveState avpd.service")); state != "active" {
		t.Fatalf("avpd.service is %q after boot, want active (enabled for multi-user.target)", state)
	}
	if rules := c.sh("nft list table inet agent_vault_proxy"); !strings.Contains(rules, "elements = { "+c.sh("id -u agent | tr -d '\\n'")) {
		t.Fatalf("the rules after boot do not hold the enrolled user:\n%s", rules)
	}
	up2 := startUpstream(t, c.ns, t.TempDir())
	out, _ = c.agentCurl()
	if out != "502" || len(up2.requests()) != 0 {
		t.Fatalf("after boot, before the new upstream CA: curl %q, upstream saw %d request(s); want 502 and none", out, len(up2.requests()))
	}
	writeFile(t, filepath.Join(c.root, "etc/agent-vault-proxy/upstream-ca.pem"), up2.caPEM, 0o644)
	c.sh("systemctl restart avpd.service")
	c.agentRequest(up2, "after a reboot")
}

// TestBWSUnderSystemd is the production install with the Bitwarden backend: the SDK's helper
// process runs under avpd.service's sandbox as avp, reads the token that tmpfiles made
// avp's, logs in to a protocol-faithful fake BWS and fetches the secret; nothing of the
// token or the secret reaches the system journal or avpctl status.
func TestBWSUnderSystemd(t *testing.T) {
	c := bootContainer(t)
	up := startUpstream(t, c.ns, t.TempDir())
	fake := bwsfake.New()
	fake.Put("OPENAI", realOpenAI)
	tl, err := bwsfake.NewTLS()
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	inNetns(t, c.ns, func() { ln, err = net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	fake.ServeTLS(ln, tl)
	t.Cleanup(fake.Close)
	token := fake.NewToken()
	api, idp := bwsfake.URLs(bwsfake.BaseURL("https", ln.Addr()))
	writeFile(t, filepath.Join(c.root, "root/bws-ca.pem"), tl.CAPEM, 0o644)
	// Test scaffolding, not the README's: the SDK must trust the fake's CA.
	os.MkdirAll(filepath.Join(c.root, "etc/systemd/system/avpd.service.d"), 0o755)
	writeFile(t, filepath.Join(c.root, "etc/systemd/system/avpd.service.d/bws-ca.conf"),
		[]byte("[Service]\nEnvironment=SSL_CERT_FILE=/etc/agent-vault-proxy/bws-ca.pem NO_PROXY=127.0.0.1\n"), 0o644)

	c.installAsReadme(up, fmt.Sprintf(`backend:
  type: bws
  bws:
    organization_id: %s
    access_token_file: /etc/agent-vault-proxy/bws-token
    api_url: %s
    identity_url: %s`, fake.OrgID, api, idp),
		`install -m 0644 /root/bws-ca.pem /etc/agent-vault-proxy/bws-ca.pem
(umask 077; printf '%s\n' '`+token+`' >/etc/agent-vault-proxy/bws-token)`)
	if owner := strings.TrimSpace(c.sh("stat -c '%U %a' /etc/agent-vault-proxy/bws-token")); owner != "avp 600" {
		t.Fatalf("the token file is %q after tmpfiles, want avp 600", owner)
	}
	c.agentRequest(up, "first request through BWS")
	helpers := c.sh(`ps -o user=,args= --ppid "$(systemctl show -P MainPID avpd.service)"`)
	if !strings.Contains(helpers, "avp ") || !strings.Contains(helpers, "bws-helper") {
		t.Fatalf("no BWS helper running as avp under avpd: %q", helpers)
	}
	c.sh("avpctl cache flush")
	c.agentRequest(up, "after a cache flush (fetched again)")

	id, clientSecret, _, _ := bwsfake.ParseToken(token)
	texts := c.sh("journalctl --no-pager -o cat -u avpd.service -u avp-journal.service; avpctl status; avpctl status --json; cat /var/log/agent-vault-proxy/audit.jsonl")
	for what, needle := range map[string]string{"the access token": token, "its client secret": clientSecret, "its id": id, "a JWT": "eyJ", "the secret": realOpenAI} {
		if strings.Contains(texts, needle) {
			t.Errorf("the journal, status or audit log contains %s", what)
		}
	}
}
