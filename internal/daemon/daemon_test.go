package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

// An invalid config stops the daemon at start with the file, line, column and fix, before
// it touches the firewall or binds anything (I6).
func TestInvalidConfigRefusesToStart(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bindings.yaml")
	os.WriteFile(cfg, []byte(`version: 1
backend: {type: file, file: {path: /nonexistent/secrets.yaml}}
secrets:
  A:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa
    bindings:
      - host: api.example.com
        methods: [get]
`), 0o600)
	err := Run(context.Background(), Options{ConfigPath: cfg, StateDir: filepath.Join(dir, "state"), RuntimeDir: filepath.Join(dir, "run"), Logf: t.Logf})
	if err == nil {
		t.Fatal("started with an invalid config")
	}
	if !strings.Contains(err.Error(), cfg+":8:19:") || !strings.Contains(err.Error(), "upper-case HTTP method") {
		t.Fatalf("error does not name the position and fix: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); err == nil {
		t.Fatal("created state before validating the config")
	}
}

func TestMissingSecretsFileRefusesToStart(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bindings.yaml")
	os.WriteFile(cfg, []byte(`version: 1
backend: {type: file, file: {path: `+dir+`/secrets.yaml}}
audit: {path: `+dir+`/audit.jsonl}
secrets:
  A:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa
    bindings: [{host: api.example.com}]
`), 0o600)
	os.WriteFile(filepath.Join(dir, "secrets.yaml"), []byte("A: x\n"), 0o644)
	err := Run(context.Background(), Options{ConfigPath: cfg, StateDir: filepath.Join(dir, "state"), RuntimeDir: filepath.Join(dir, "run"), Logf: t.Logf})
	if err == nil || !strings.Contains(err.Error(), "chmod 600 "+dir+"/secrets.yaml") {
		t.Fatalf("err = %v", err)
	}
}

// The names the config fetches that the secrets file lacks are logged at start and at a
// reload, and a file that fails its check refuses the reload (a reload that flushed the
// cache and then could not read the file would fail every request).
func TestCheckFileNames(t *testing.T) {
	dir := t.TempDir()
	sp := filepath.Join(dir, "secrets.yaml")
	os.WriteFile(sp, []byte("A: sk-real-aaaaaaaa\n"), 0o600)
	fb, err := store.NewFileBackend(sp)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse("b.yaml", []byte(`version: 1
backend: {type: file, file: {path: `+sp+`}}
secrets:
  A:
    placeholder: sk-avp-PLACEHOLDER-aaaaaaaaaaaaaa
    bindings: [{host: api.example.com}]
  B:
    placeholder: sk-avp-PLACEHOLDER-bbbbbbbbbbbbbb
    bindings: [{host: api.example.com}]
`))
	if err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	d := &Daemon{file: fb, logf: func(f string, a ...any) { fmt.Fprintf(&logs, f+"\n", a...) }}
	if err := d.checkFileNames(cfg); err != nil || !strings.Contains(logs.String(), "has no value for B:") {
		t.Fatalf("err %v, log %q", err, logs.String())
	}
	os.Chmod(sp, 0o644)
	if err := d.checkFileNames(cfg); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a readable file: %v", err)
	}
}
