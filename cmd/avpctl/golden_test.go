package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// golden compares got with testdata/NAME.golden; -update rewrites it. Golden files are
// reviewed text: the file:line:column and the suggested fix are part of what is tested.
func golden(t *testing.T, name, got string) {
	t.Helper()
	p := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test ./cmd/avpctl -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file.\n--- got ---\n%s\n--- want ---\n%s", name, got, want)
	}
}

func avpctl(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestGoldenBadConfigs(t *testing.T) {
	files, _ := filepath.Glob("testdata/bad/*.yaml")
	if len(files) < 15 {
		t.Fatalf("only %d bad configs", len(files))
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			code, out, errs := avpctl("bindings", "check", f)
			if code != 1 || out != "" {
				t.Fatalf("exit %d, stdout %q: a bad config must exit 1", code, out)
			}
			golden(t, "bad/"+name, errs)
		})
	}
}

func TestBindingsCheckExample(t *testing.T) {
	code, out, errs := avpctl("bindings", "check", "../../bindings.example.yaml")
	if code != 0 {
		t.Fatalf("bindings.example.yaml does not pass: %s", errs)
	}
	golden(t, "check-example", out)
}

func TestGoldenDiff(t *testing.T) {
	code, out, _ := avpctl("bindings", "diff", "testdata/diff/old.yaml", "testdata/diff/new.yaml")
	if code != 3 {
		t.Fatalf("a widening diff exited %d, want 3", code)
	}
	golden(t, "diff/widen", out)
	code, out, _ = avpctl("bindings", "diff", "testdata/diff/old.yaml", "testdata/diff/narrower.yaml")
	if code != 0 {
		t.Fatalf("a narrowing diff exited %d, want 0", code)
	}
	golden(t, "diff/narrow", out)
	code, out, _ = avpctl("bindings", "diff", "testdata/diff/old.yaml", "testdata/diff/old.yaml")
	if code != 0 || out != "no change in what any secret may reach\n" {
		t.Fatalf("identical diff: %d %q", code, out)
	}
}

func TestGoldenExplain(t *testing.T) {
	const ph = "Authorization: Bearer sk-avp-PLACEHOLDER-openai-000000000"
	cases := []struct {
		name string
		args []string
	}{
		{"inject", []string{"--uid", "1000", "POST", "https://api.openai.com/v1/chat/completions", "-H", ph}},
		{"method", []string{"DELETE", "https://api.openai.com/v1/files/1", "-H", ph}},
		{"dotdot", []string{"GET", "https://api.openai.com/v1/%2e%2e/admin?x=1", "-H", ph}},
		{"wrong-header", []string{"GET", "https://api.openai.com/v1/models", "-H", "X-Other: Bearer sk-avp-PLACEHOLDER-openai-000000000"}},
		{"mismatch", []string{"GET", "https://api.openai.com/v1/models", "-H", "Host: evil.example.com", "-H", ph}},
		{"passthrough", []string{"GET", "https://example.org/", "-H", ph}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"explain", "--config", "testdata/diff/old.yaml"}, tc.args...)
			code, out, errs := avpctl(args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errs)
			}
			if strings.Contains(out, "sk-avp-PLACEHOLDER") {
				t.Fatal("explain printed a placeholder")
			}
			golden(t, "explain/"+tc.name, out)
		})
	}
}

func TestHelpEverywhere(t *testing.T) {
	for name := range commands() {
		code, out, _ := avpctl(name, "--help")
		if code != 0 || !strings.Contains(out, "usage: avpctl") {
			t.Errorf("%s --help: exit %d %q", name, code, out)
		}
	}
	if code, out, _ := avpctl("--help"); code != 0 || !strings.Contains(out, "Commands:") {
		t.Errorf("--help: %d %q", code, out)
	}
	if code, _, _ := avpctl("no-such-command"); code != 2 {
		t.Errorf("unknown command exit %d, want 2", code)
	}
}
