package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
)

// TestDoctorAuditPathUnderSystemd: with avpd.service installed, the example config's
// audit.path (/var/log/agent-vault-proxy) is read-only for avp under ProtectSystem=strict,
// so avpd cannot start; doctor said nothing of it. Found by the operator review (rt1).
func TestDoctorAuditPathUnderSystemd(t *testing.T) {
	units := t.TempDir()
	old := unitDirs
	unitDirs = []string{filepath.Join(units, "missing"), units}
	t.Cleanup(func() { unitDirs = old })
	run := func(path string) []check {
		d := &doctor{daemonUID: -1, cfg: &config.Config{Audit: config.Audit{Path: path}}}
		d.checkAuditPathUnderSystemd()
		return d.checks
	}
	if c := run("/var/log/agent-vault-proxy/audit.jsonl"); len(c) != 0 {
		t.Fatalf("without avpd.service installed: %+v", c)
	}
	if err := os.WriteFile(filepath.Join(units, "avpd.service"), []byte("[Service]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := run("/var/log/agent-vault-proxy/audit.jsonl")
	if len(c) != 1 || c[0].Status != statusWarn || c[0].Fix == "" {
		t.Fatalf("audit.path in /var/log with avpd.service installed: %+v; want one warning with a fix", c)
	}
	if c := run("/var/lib/agent-vault-proxy/audit.jsonl"); len(c) != 0 {
		t.Fatalf("audit.path in avpd's StateDirectory (writable under the unit): %+v", c)
	}
	d := &doctor{daemonUID: -1, cfg: &config.Config{Audit: config.Audit{Socket: "/run/avp-journal/journal.sock"}}}
	if d.checkAuditPathUnderSystemd(); len(d.checks) != 0 {
		t.Fatalf("audit.socket: %+v", d.checks)
	}
}
