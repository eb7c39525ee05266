package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// TestSecretsFileErrorsAtStart: avpd's start said "open secrets file X: open X: no such file
// or directory" (the path twice, no fix) and, for a YAML syntax error, no line at all.
func TestSecretsFileErrorsAtStart(t *testing.T) {
	dir := t.TempDir()
	secrets := filepath.Join(dir, "secrets.yaml")
	cfg := &config.Config{Backend: config.Backend{Type: "file", File: config.FileBackend{Path: secrets}}}
	d := &Daemon{logf: t.Logf}

	err := d.openBackend(cfg)
	if err == nil || strings.Count(err.Error(), secrets) != 1 || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("missing secrets file: %v; want the path once and how to create it", err)
	}

	if err := os.WriteFile(secrets, []byte("# a comment\nA: \"sk-REAL-0123456789\nB: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = d.openBackend(cfg)
	if err == nil || !strings.Contains(err.Error(), secrets+":2:") || strings.Contains(err.Error(), "sk-REAL") {
		t.Errorf("syntax error: %v; want %s:2: and no value", err, secrets)
	}
}
