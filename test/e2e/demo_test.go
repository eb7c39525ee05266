package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDemo runs the README's first command, make demo, as an operator would, and checks
// what it promises to show: the agent's answer, the real key arriving upstream (masked,
// ending as the real one does), the request outside the binding arriving with the
// placeholder, the audit lines, and nothing left behind.
func TestDemo(t *testing.T) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute) // a cold build of avpd (cgo) comes first
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", "-C", repo, "--no-print-directory", "demo")
	outb, err := cmd.CombinedOutput()
	out := string(outb)
	if err != nil {
		t.Fatalf("make demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"agent env:     no proxy variables",
		`agent got:     {"id":"chatcmpl-demo"`,
		`"decision":"inject","reason":"binding_matched","secret":"OPENAI_API_KEY"`,
		`"decision":"forward_verbatim","reason":"method_not_allowed"`,
		"== Done: the agent never held the real key",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the demo's output lacks %q", want)
		}
	}
	realEnd := regexp.MustCompile(`the real key ends in (\S{4})\)`).FindStringSubmatch(out)
	injected := regexp.MustCompile(`received: POST /v1/chat/completions  Authorization: Bearer \*+(\S{4})\n`).FindStringSubmatch(out)
	verbatim := regexp.MustCompile(`received: GET /v1/models  Authorization: Bearer \*+(\S{4})\n`).FindStringSubmatch(out)
	switch {
	case realEnd == nil || injected == nil || verbatim == nil:
		t.Errorf("the demo's output lacks the upstream's lines or the real key's end")
	case injected[1] != realEnd[1]:
		t.Errorf("the upstream got a key ending in %s, the real one ends in %s", injected[1], realEnd[1])
	case verbatim[1] != "0000":
		t.Errorf("the request outside the binding arrived with a key ending in %s, not the placeholder's 0000", verbatim[1])
	}
	if strings.Contains(out, "FAILED") {
		t.Errorf("the demo reported a failure")
	}
	// Nothing left behind: its namespace and its directory are gone.
	if dir := regexp.MustCompile(`\((/tmp/avp-demo-[^/]+)/avp-ca.pem\)`).FindStringSubmatch(out); dir == nil {
		t.Errorf("the demo's output does not name its directory")
	} else if _, err := os.Stat(dir[1]); err == nil {
		t.Errorf("the demo left %s behind", dir[1])
	}
	if ns, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(ns), "avp-demo-") {
		t.Errorf("the demo left a namespace behind:\n%s", ns)
	}
	if t.Failed() {
		t.Logf("make demo printed:\n%s", out)
	}
}
