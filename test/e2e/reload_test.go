package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestReloadUnderLoad: a reload to a narrower binding under concurrent requests. Nothing the
// new config forbids is injected after the reload returns, no request fails because of the
// reload, and an invalid reload changes nothing.
func TestReloadUnderLoad(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))

	script := filepath.Join(e.dir, "load.py")
	writeFile(t, script, []byte(fmt.Sprintf(`import sys, threading, time, urllib.request, urllib.error
stop = time.time() + float(sys.argv[1])
lock = threading.Lock()
def worker():
    while time.time() < stop:
        req = urllib.request.Request("https://%s/v1/models", headers={"Authorization": "Bearer %s"})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                r.read()
                code = r.status
        except urllib.error.HTTPError as err:
            code = err.code
        except Exception as err:
            code = "error:" + type(err).__name__
        with lock:
            print(code, flush=True)
threads = [threading.Thread(target=worker) for _ in range(8)]
for th in threads: th.start()
for th in threads: th.join()
print("end", flush=True)
`, hostOpenAI, phOpenAI)), 0o644)

	cmd := e.agentCmd(agentUID, "python3", script, "4")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	results := make(chan []string, 1)
	go func() {
		var lines []string
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines = append(lines, sc.Text())
		}
		results <- lines
	}()

	time.Sleep(1200 * time.Millisecond)
	narrow := strings.Replace(defaultBindings, `paths: ["/v1/**"]`, `paths: ["/v1/chat/**"]`, 1)
	e.writeConfig(narrow)
	if out := e.avpctl("reload"); !strings.Contains(string(out), "reloaded config sha256") {
		t.Fatalf("reload: %s", out)
	}
	reloaded := time.Now()

	time.Sleep(800 * time.Millisecond)
	e.writeConfig(narrow + "    bogus: key\n")
	out, err := e.avpctlErr("reload")
	if err == nil || !strings.Contains(string(out), "bindings.yaml:") || !strings.Contains(string(out), `unknown key "bogus"`) {
		t.Fatalf("invalid reload: err=%v out=%s", err, out)
	}
	rejected := time.Now()

	var lines []string
	select {
	case lines = <-results:
	case <-time.After(30 * time.Second):
		t.Fatal("load did not finish")
	}
	cmd.Wait()
	if len(lines) < 10 || lines[len(lines)-1] != "end" {
		t.Fatalf("load produced %d lines: %v", len(lines), lines)
	}
	for _, l := range lines[:len(lines)-1] {
		if l != "200" {
			t.Fatalf("a request failed during the reloads: %q", l)
		}
	}

	var before, verbatimAfter, afterRejected int
	for _, ev := range e.findAudit("type", "decision", "secret", "OPENAI", "path", "/v1/models") {
		ts, err := time.Parse(time.RFC3339Nano, ev["ts"].(string))
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case ev["decision"] == "inject" && ts.After(reloaded):
			t.Fatalf("injected at %v, after the narrowing reload returned at %v", ts, reloaded)
		case ev["decision"] == "inject":
			before++
		case ev["decision"] == "forward_verbatim" && ev["reason"] == "path_not_allowed":
			verbatimAfter++
			if ts.After(rejected) {
				afterRejected++
			}
		}
	}
	if before == 0 || verbatimAfter == 0 || afterRejected == 0 {
		t.Fatalf("load did not span the reloads: %d injected before, %d verbatim after, %d after the rejected reload", before, verbatimAfter, afterRejected)
	}
	if len(e.findAudit("type", "config_loaded")) != 1 || len(e.findAudit("type", "config_rejected")) != 1 {
		t.Fatalf("want one config_loaded and one config_rejected event")
	}
	t.Logf("%d requests: %d injected before the reload, %d verbatim after (%d after the rejected reload)", len(lines)-1, before, verbatimAfter, afterRejected)
}

// TestReloadRefusesWritableConfig: avpd refused a secrets file others can read, yet reloaded
// (and started with) a bindings.yaml every local user could write, even one another user
// owned: whoever can write it chooses which hosts get the real secrets. Both are refused
// now, the running config stays, and the error says how to fix the file.
func TestReloadRefusesWritableConfig(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	if err := os.Chmod(e.config, 0o640); err != nil { // the documented mode passes
		t.Fatal(err)
	}
	e.avpctl("reload")
	// A section that changes only on restart: the reload names it and says to restart.
	cfg := mustRead(t, e.config)
	writeFile(t, e.config, []byte(strings.Replace(cfg, "cache: {ttl: 5m}", "cache: {ttl: 6m}", 1)), 0o640)
	if out, err := e.avpctlErr("reload"); err == nil || !strings.Contains(string(out), "the cache section changed") || !strings.Contains(string(out), "restart avpd") {
		t.Fatalf("reload of a changed cache section: err %v, %q", err, strings.TrimSpace(string(out)))
	}
	writeFile(t, e.config, []byte(cfg), 0o640)
	for _, tc := range []struct {
		mode  os.FileMode
		owner int
		want  string
	}{
		{0o666, 0, "has mode 0666"},
		{0o620, 0, "has mode 0620"},
		{0o640, 65534, "is owned by uid 65534"}, // nobody
	} {
		if err := os.Chmod(e.config, tc.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(e.config, tc.owner, 0); err != nil {
			t.Fatal(err)
		}
		out, err := e.avpctlErr("reload")
		if err == nil || !strings.Contains(string(out), e.config+" "+tc.want) || !strings.Contains(string(out), "chmod 640 "+e.config) {
			t.Fatalf("reload of a bindings file of mode %04o owned by uid %d: err %v, %q", tc.mode, tc.owner, err, strings.TrimSpace(string(out)))
		}
	}
	// The running config is unchanged: the agent still gets the secret.
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	if code, body, err := e.curl(agentUID, "GET", "https://"+hostOpenAI+"/v1/models", "Authorization: Bearer "+phOpenAI); err != nil || code != 200 {
		t.Fatalf("after the refused reloads: %d %q %v", code, body, err)
	}
	if got := e.upstream.last(t).Header.Get("Authorization"); got != "Bearer "+realOpenAI {
		t.Fatalf("after the refused reloads the upstream got Authorization %q, want the real key", got)
	}
	// A start with that file fails, naming it.
	e.stopAvpd()
	out, err := exec.Command("ip", "netns", "exec", e.ns, filepath.Join(binDir, "avpd"), "serve",
		"--config", e.config, "--state-dir", e.state, "--runtime-dir", e.runtime).CombinedOutput()
	if err == nil || !strings.Contains(string(out), e.config+" is owned by uid 65534") {
		t.Fatalf("avpd started with a bindings file uid 65534 owns: %v\n%s", err, out)
	}
}
