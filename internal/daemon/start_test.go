package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// An in-process audit log that cannot be opened must come back as no auditor at all: a nil
// *audit.FileWriter inside the interface made start's cleanup call Close on it and panic,
// before the redirect was put back.
func TestOpenAuditorFailureIsNoAuditor(t *testing.T) {
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := openAuditor(&config.Config{Audit: config.Audit{Path: filepath.Join(notDir, "audit.jsonl")}})
	if err == nil {
		t.Fatal("opened an audit log under a regular file")
	}
	if a != nil {
		t.Fatalf("openAuditor failed (%v) but returned a non-nil auditCloser %T", err, a)
	}
}
