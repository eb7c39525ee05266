package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
