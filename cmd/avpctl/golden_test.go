package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
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
	needRootOwner(t) // bindings check refuses a config its checkout user owns, as avpd does
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

// exampleWithSecrets is bindings.example.yaml with its secrets file at secrets, in a
// temporary directory; it returns the config's path.
func exampleWithSecrets(t *testing.T, secrets string) string {
	t.Helper()
	data, err := os.ReadFile("../../bindings.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const orig = "path: /etc/agent-vault-proxy/secrets.yaml"
	if !bytes.Contains(data, []byte(orig)) {
		t.Fatalf("bindings.example.yaml no longer has %q", orig)
	}
	cfg := filepath.Join(t.TempDir(), "bindings.yaml")
	if err := os.WriteFile(cfg, bytes.Replace(data, []byte(orig), []byte("path: "+secrets), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// needRootOwner skips a test whose bindings or secrets file must be root's (avpd accepts
// only root's or avp's), outside CI, where tests may run as another user.
func needRootOwner(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI runs the tests as root")
		}
		t.Skip("not root: the secrets file this test writes would be this user's, which bindings check refuses as avpd does")
	}
}

func TestBindingsCheckExample(t *testing.T) {
	needRootOwner(t)
	secrets := filepath.Join(t.TempDir(), "secrets.yaml")
	cfg := exampleWithSecrets(t, secrets)
	parsed, err := config.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var all strings.Builder
	seen := map[string]bool{}
	for _, s := range parsed.Secrets {
		for _, n := range s.FetchNames() {
			if !seen[n] {
				seen[n] = true
				fmt.Fprintf(&all, "%s: value-of-%s-0123456789\n", n, strings.ToLower(n))
			}
		}
	}
	if err := os.WriteFile(secrets, []byte(all.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errs := avpctl("bindings", "check", cfg)
	if code != 0 || errs != "" {
		t.Fatalf("bindings.example.yaml does not pass: exit %d: %s", code, errs)
	}
	golden(t, "check-example", strings.ReplaceAll(out, cfg, "../../bindings.example.yaml"))
}

// TestBindingsCheckSecretsFile: check refuses a secrets file avpd would refuse to start with
// (it said ok to each of these, and the install's next step failed), and warns about names
// the file lacks.
func TestBindingsCheckSecretsFile(t *testing.T) {
	needRootOwner(t)
	secrets := filepath.Join(t.TempDir(), "secrets.yaml")
	cfg := exampleWithSecrets(t, secrets)
	for _, tc := range []struct {
		name, content string
		mode          os.FileMode
		code          int
		want          string
	}{
		{"missing", "", 0, 1, "no such file or directory"},
		{"readable by others", "OPENAI_API_KEY: sk-0123456789abcdef\n", 0o644, 1, "chmod 600"},
		{"env syntax", "OPENAI_API_KEY=sk-0123456789abcdef\n", 0o600, 1, "must be a map of NAME: value"},
		{"names missing", "OPENAI_API_KEY: sk-0123456789abcdef\n", 0o600, 0, "has no value for ANTHROPIC_API_KEY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(secrets)
			if tc.mode != 0 {
				if err := os.WriteFile(secrets, []byte(tc.content), tc.mode); err != nil {
					t.Fatal(err)
				}
				os.Chmod(secrets, tc.mode)
			}
			code, _, errs := avpctl("bindings", "check", cfg)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, errs, tc.code, tc.want)
			}
			if strings.Contains(errs, "sk-0123456789abcdef") {
				t.Fatalf("a value reached the output: %q", errs)
			}
		})
	}
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

// TestBindingsDiffNarrowingShowsWhatRemains: narrowing a binding from [GET, POST] to [POST]
// was shown as the whole binding removed, with nothing saying POST is still allowed; a
// reviewer read it as "this host no longer gets the secret".
func TestBindingsDiffNarrowingShowsWhatRemains(t *testing.T) {
	dir := t.TempDir()
	write := func(name, methods string) string {
		p := filepath.Join(dir, name)
		body := "version: 1\nbackend: {type: file, file: {path: /nonexistent/secrets.yaml}}\n" +
			"secrets:\n  OPENAI_API_KEY:\n    placeholder: sk-avp-PLACEHOLDER-openai-0000000000000000\n" +
			"    bindings:\n      - host: api.openai.com\n        methods: " + methods + "\n"
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	old, nw := write("old.yaml", "[GET, POST]"), write("new.yaml", "[POST]")
	code, out, errs := avpctl("bindings", "diff", old, nw)
	if code != 0 {
		t.Fatalf("exit %d: %s%s", code, out, errs)
	}
	want := "secret OPENAI_API_KEY:\n" +
		"  - host api.openai.com  methods GET,POST  paths any path  any uid\n" +
		"      still allowed: host api.openai.com  methods POST  paths any path  any uid\n"
	if out != want {
		t.Fatalf("the diff does not show that POST remains allowed:\n%s\nwant:\n%s", out, want)
	}
}

// TestBindingsCheckRefusesWritableConfig: a bindings file that group or others may write,
// or that another user owns, decides which hosts get the real secrets; bindings check said
// ok (and avpd started with it and reloaded it) while doctor failed it. Group may read it:
// root:avp 0640 is the documented mode.
func TestBindingsCheckRefusesWritableConfig(t *testing.T) {
	needRootOwner(t)
	secrets := filepath.Join(t.TempDir(), "secrets.yaml")
	cfg := exampleWithSecrets(t, secrets)
	parsed, err := config.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var all strings.Builder
	for _, n := range parsed.MissingNames(nil) {
		fmt.Fprintf(&all, "%s: value-of-%s-0123456789\n", n, strings.ToLower(n))
	}
	if err := os.WriteFile(secrets, []byte(all.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		mode  os.FileMode
		owner int
		want  string // "" for ok
	}{
		{"root 0640", 0o640, 0, ""},
		{"root 0600", 0o600, 0, ""},
		{"world-writable", 0o666, 0, "has mode 0666: group and others must not write it"},
		{"group-writable", 0o660, 0, "has mode 0660"},
		{"owned by nobody", 0o640, 65534, "is owned by uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.Chmod(cfg, tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(cfg, tc.owner, 0); err != nil {
				t.Fatal(err)
			}
			code, out, errs := avpctl("bindings", "check", cfg)
			if tc.want == "" {
				if code != 0 || errs != "" {
					t.Fatalf("exit %d, stderr %q: mode %04o owned by %d must pass", code, errs, tc.mode, tc.owner)
				}
				return
			}
			if code != 1 || out != "" || !strings.Contains(errs, cfg+" "+tc.want) || !strings.Contains(errs, "chmod 640 "+cfg) || !strings.Contains(errs, "chown root:") {
				t.Fatalf("exit %d, stdout %q, stderr %q: want exit 1 naming the file, %q and the chown/chmod", code, out, errs, tc.want)
			}
		})
	}
}
