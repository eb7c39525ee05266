package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const checkPH = "sk-avp-PLACEHOLDER-openai-0000000000000000"

// oneSecretConfig writes a bindings file with one secret, OPENAI_API_KEY, and its secrets
// file holding secretsContent; both root's, as avpd accepts them.
func oneSecretConfig(t *testing.T, secretsContent string) (cfg, secrets string) {
	t.Helper()
	needRootOwner(t)
	dir := t.TempDir()
	secrets = filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secrets, []byte(secretsContent), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg = filepath.Join(dir, "bindings.yaml")
	body := "version: 1\nbackend: {type: file, file: {path: " + secrets + "}}\n" +
		"audit: {path: " + filepath.Join(dir, "audit.jsonl") + "}\n" +
		"secrets:\n  OPENAI_API_KEY:\n    placeholder: " + checkPH + "\n" +
		"    inject: {header: Authorization, format: \"Bearer {secret}\"}\n" +
		"    bindings:\n      - host: api.openai.com\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg, secrets
}

// TestBindingsCheckWarnsAboutValuesAvpdRefuses: a value avpd refuses at every request (503
// secret_too_short or template_render_failed) passed bindings check without a word: the
// README's own hand-run example value "sk-..." is 6 bytes. Each is now a warning naming the
// secret, never the value.
func TestBindingsCheckWarnsAboutValuesAvpdRefuses(t *testing.T) {
	for _, tc := range []struct{ name, content, want string }{
		{"short", "OPENAI_API_KEY: sk-...\n", "OPENAI_API_KEY is 6 bytes, shorter than 8"},
		{"empty", "OPENAI_API_KEY: \"\"\n", "OPENAI_API_KEY is empty"},
		{"an anchor took it", "OPENAI_API_KEY: &sk-proj-abcdefgh\n", "OPENAI_API_KEY is empty"},
		{"non-ASCII", "OPENAI_API_KEY: sk-proj-ünicode-0123456789\n", "OPENAI_API_KEY holds a byte that is not ASCII"},
		{"line break", "OPENAI_API_KEY: \"sk-proj-0123456789\\r\\nX-Evil: 1\"\n", "OPENAI_API_KEY holds a control character"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := oneSecretConfig(t, tc.content)
			code, out, errs := avpctl("bindings", "check", cfg)
			if code != 0 || !strings.Contains(out, ": ok") || !strings.Contains(errs, "warning: ") || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, stdout %q, stderr %q: want ok with a warning %q", code, out, errs, tc.want)
			}
			for _, v := range []string{"sk-...", "sk-proj"} {
				if strings.Contains(errs, v) {
					t.Fatalf("the value reached the output: %q", errs)
				}
			}
		})
	}
	cfg, _ := oneSecretConfig(t, "OPENAI_API_KEY: sk-proj-0123456789abcdef\n")
	if code, _, errs := avpctl("bindings", "check", cfg); code != 0 || errs != "" {
		t.Fatalf("a good value: exit %d, stderr %q", code, errs)
	}
}

// TestBindingsCheckRefusesPlaceholderEqualToValue: the real key pasted as the placeholder
// (so the agent holds the real key) was accepted silently.
func TestBindingsCheckRefusesPlaceholderEqualToValue(t *testing.T) {
	cfg, _ := oneSecretConfig(t, "OPENAI_API_KEY: "+checkPH+"\n")
	code, out, errs := avpctl("bindings", "check", cfg)
	if code != 1 || out != "" || !strings.Contains(errs, "OPENAI_API_KEY") || !strings.Contains(errs, "placeholder") {
		t.Fatalf("exit %d, stdout %q, stderr %q: want exit 1 naming the secret whose value is its placeholder", code, out, errs)
	}
}

// TestBindingsCheckSecretsFileSyntaxErrorHasLine: a secrets file with a YAML syntax error
// said "(line numbers only; values are never shown)" and gave no line number at all.
func TestBindingsCheckSecretsFileSyntaxErrorHasLine(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		line          string
	}{
		{"unclosed quote", "# comment\nOPENAI_API_KEY: \"sk-proj-REAL0123456789abcdef\n", ":2: "},
		{"mis-indented", "A: sk-proj-REAL0123456789abcdef\nB:\n  - sk-proj-REAL0123456789abcdef\n - x\n", ":4: "},
		{"unknown alias", "OPENAI_API_KEY: *sk-proj-REAL0123456789abcdef\n", ":1: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, secrets := oneSecretConfig(t, tc.content)
			code, _, errs := avpctl("bindings", "check", cfg)
			if code != 1 || !strings.Contains(errs, secrets+tc.line) || strings.Count(errs, secrets) != 1 {
				t.Fatalf("want exit 1 and %s%s once; got exit %d: %q", secrets, tc.line, code, errs)
			}
			if strings.Contains(errs, "sk-proj-REAL") || strings.Contains(errs, "REAL0123") {
				t.Fatalf("value leaked: %q", errs)
			}
		})
	}
}

// TestBindingsCheckTokenShape: avpd refuses to start with a BWS token file that does not
// have the token's shape, but bindings check, which checks the token file "as avpd checks
// it at start", said ok: the operator learnt it only when the service failed.
func TestBindingsCheckTokenShape(t *testing.T) {
	needRootOwner(t)
	for _, tc := range []struct {
		name, token string
		code        int
	}{
		{"env-file form", "BWS_ACCESS_TOKEN=0.11111111-2222-3333-4444-555555555555.clientsecretabcdefghijklmnopqrstuv:YWJjZGVmZ2hpamtsbW5vcA==\n", 1},
		{"no key", "0.11111111-2222-3333-4444-555555555555.clientsecretabcdefghijklmnopqrstuv\n", 1},
		{"good", "0.11111111-2222-3333-4444-555555555555.clientsecretabcdefghijklmnopqrstuv:YWJjZGVmZ2hpamtsbW5vcA==\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tok := filepath.Join(dir, "bws-token")
			if err := os.WriteFile(tok, []byte(tc.token), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := filepath.Join(dir, "bindings.yaml")
			body := "version: 1\nbackend:\n  type: bws\n  bws:\n    organization_id: 00000000-0000-0000-0000-000000000000\n" +
				"    access_token_file: " + tok + "\naudit: {path: " + filepath.Join(dir, "a.jsonl") + "}\n" +
				"secrets:\n  OPENAI_API_KEY:\n    placeholder: " + checkPH + "\n    bindings: [{host: api.openai.com}]\n"
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			code, out, errs := avpctl("bindings", "check", cfg)
			if code != tc.code {
				t.Fatalf("exit %d (stdout %q, stderr %q), want %d: avpd serve checks the token's shape at start", code, out, errs, tc.code)
			}
			if tc.code != 0 && (!strings.Contains(errs, tok+":") || strings.Contains(errs, "/proc/")) {
				t.Fatalf("the error does not name %s: %q", tok, errs)
			}
			if strings.Contains(errs, "clientsecret") || strings.Contains(errs, "YWJj") {
				t.Fatalf("token leaked: %q", errs)
			}
		})
	}
}

// TestBindingsCheckReadsTheUpstreamCAFile: a proxy.upstream_ca_file that does not exist (the
// README's own sample path) passed bindings check, and avpd then refused to start.
func TestBindingsCheckReadsTheUpstreamCAFile(t *testing.T) {
	cfg, _ := oneSecretConfig(t, "OPENAI_API_KEY: sk-proj-0123456789abcdef\n")
	data, _ := os.ReadFile(cfg)
	missing := filepath.Join(t.TempDir(), "extra-roots.pem")
	os.WriteFile(cfg, append(data, []byte("proxy: {upstream_ca_file: "+missing+"}\n")...), 0o600)
	code, out, errs := avpctl("bindings", "check", cfg)
	if code != 1 || !strings.Contains(errs, "proxy.upstream_ca_file "+missing) || !strings.Contains(errs, "remove the key") {
		t.Fatalf("exit %d, stdout %q, stderr %q: want exit 1 naming the missing upstream CA file and the fix", code, out, errs)
	}
}
