package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// auditLog writes a small rotated log through a real journal and returns its live path and
// key file.
func auditLog(t *testing.T) (string, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "avpctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	log := filepath.Join(dir, "audit.jsonl")
	j, err := audit.OpenJournal(audit.JournalOptions{Log: log, RotateSize: 1500})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := audit.ListenJournal(filepath.Join(dir, "j.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- j.Serve(ctx, ln) }()
	c := audit.NewJournalClient(filepath.Join(dir, "j.sock"), 2*time.Second)
	for i, ev := range []audit.Event{
		{Type: audit.TypeDecision, Decision: audit.DecisionInject, Secret: "OPENAI", Binding: audit.Int(0), UID: audit.Int64(4242), SNI: "api.openai.com", Method: "POST", Path: "/v1/chat"},
		{Type: audit.TypeDecision, Decision: audit.DecisionForwardVerbatim, Reason: "path_not_allowed", Secret: "OPENAI", SNI: "api.openai.com", Method: "GET", Path: "/admin"},
		{Type: audit.TypeDecision, Decision: audit.DecisionInject, Secret: "GITHUB", Binding: audit.Int(1), SNI: "api.github.com", Method: "GET", Path: "/user"},
		{Type: audit.TypeEnroll, UID: audit.Int64(4242), Detail: "enrolled by uid 0"},
		{Type: audit.TypeDecision, Decision: audit.DecisionInject, Secret: "OPENAI", Binding: audit.Int(0), SNI: "api.openai.com", Method: "POST", Path: "/v1/embeddings"},
	} {
		if err := c.Record(context.Background(), ev); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
	}
	c.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return log, filepath.Join(dir, "journal.key")
}

func runCmd(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestAuditVerifyCommand(t *testing.T) {
	log, key := auditLog(t)
	if code, out, errs := runCmd("audit", "verify", "--key", key, log); code != 0 || !strings.Contains(out, "ok: ") || !strings.Contains(out, "every MAC checked") {
		t.Fatalf("intact: %d %q %q", code, out, errs)
	}
	// Flags after the path work too; without the key the output says what is not checked.
	if code, out, _ := runCmd("audit", "verify", log); code != 0 || !strings.Contains(out, "MACs NOT checked") {
		t.Fatalf("no key: %d %q", code, out)
	}
	// The oldest rotated file deleted: the journal deletes none, so the set is broken,
	// unless --partial says the earlier files were left out on purpose.
	log2, key2 := auditLog(t)
	rotated, _ := filepath.Glob(log2 + ".0*")
	if len(rotated) == 0 {
		t.Fatal("setup: no rotated file")
	}
	os.Remove(rotated[0])
	if code, out, _ := runCmd("audit", "verify", "--key", key2, log2); code != 1 || !strings.Contains(out, "BROKEN: ") || !strings.Contains(out, "--partial") {
		t.Fatalf("a set without its first file: %d %q", code, out)
	}
	if code, out, _ := runCmd("audit", "verify", "--partial", "--key", key2, log2); code != 0 || !strings.Contains(out, "note: the set starts at seq") {
		t.Fatalf("--partial: %d %q", code, out)
	}
	// Edit the last line: only the MAC can tell.
	data, _ := os.ReadFile(log)
	os.WriteFile(log, bytes.Replace(data, []byte("/v1/embeddings"), []byte("/v1/embeddingz"), 1), 0o640)
	code, out, _ := runCmd("audit", "verify", log, "--key", key)
	if code != 1 || !strings.Contains(out, "BROKEN: ") || !strings.Contains(out, "MAC mismatch") || !strings.Contains(out, "audit.jsonl:") {
		t.Fatalf("edited: %d %q", code, out)
	}
	// A log that cannot be read is not a broken chain: a script must tell the two apart.
	if code, _, errs := runCmd("audit", "verify", filepath.Join(t.TempDir(), "missing.jsonl")); code != 2 || !strings.Contains(errs, "not verified") {
		t.Errorf("verify of a missing log: exit %d, %q; want 2", code, errs)
	}
	if code, _, errs := runCmd("audit", "verify", "--nope"); code != 2 || !strings.Contains(errs, "usage: avpctl audit verify") {
		t.Fatalf("usage: %d %q", code, errs)
	}
	if code, _, _ := runCmd("audit", "frobnicate"); code != 2 {
		t.Fatalf("unknown subcommand: %d", code)
	}
}

func TestAuditTailCommand(t *testing.T) {
	log, _ := auditLog(t)
	code, out, errs := runCmd("audit", "tail", "-n", "3", log)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 3 || !strings.Contains(lines[2], "#6 decision inject secret=OPENAI binding=0 POST api.openai.com/v1/embeddings") || !strings.Contains(lines[1], "#5 enroll uid=4242") {
		t.Fatalf("tail: %d %q %q", code, out, errs)
	}
	// Filters, across the rotated files, oldest first.
	_, out, _ = runCmd("audit", "tail", "--secret", "OPENAI", "--decision", "inject", log)
	if got := strings.Count(out, "\n"); got != 2 || !strings.Contains(out, "/v1/chat") || strings.Contains(out, "/admin") {
		t.Fatalf("filtered: %q", out)
	}
	_, out, _ = runCmd("audit", "tail", "--json", "-n", "1", "--decision", "forward_verbatim", log)
	if !strings.HasPrefix(out, `{"v":1,"seq":3,`) || !strings.Contains(out, `"reason":"path_not_allowed"`) {
		t.Fatalf("json: %q", out)
	}
}

func TestAuditTailQuotesControlCharacters(t *testing.T) {
	l := &audit.Line{Seq: 1, Event: audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionPassthrough, SNI: "evil\x1b[2J.test", Path: "/ok"}}
	got := formatLine(l)
	if strings.ContainsRune(got, 0x1b) || !strings.Contains(got, `"evil\x1b[2J.test"`) {
		t.Fatalf("%q", got)
	}
}

// A file of one line of megabytes (planted where root runs tail or verify) is refused
// without being read whole.
func TestAuditCommandsOnAHugeLine(t *testing.T) {
	log := filepath.Join(t.TempDir(), "audit.jsonl")
	if err := os.WriteFile(log, []byte(strings.Repeat("x", 3<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errs := runCmd("audit", "tail", log); code == 0 || !strings.Contains(errs, "too long") {
		t.Fatalf("tail: %d %q", code, errs)
	}
	if code, out, errs := runCmd("audit", "verify", log); code == 0 {
		t.Fatalf("verify: %d %q %q", code, out, errs)
	}
}

// The in-process log (audit.path, the by-hand setup) has plain events: tail shows them, and
// verify says it cannot verify them rather than calling the log broken.
func TestAuditCommandsOnTheInProcessLog(t *testing.T) {
	log := filepath.Join(t.TempDir(), "audit.jsonl")
	w, err := audit.OpenFile(log)
	if err != nil {
		t.Fatal(err)
	}
	w.Record(context.Background(),
		audit.Event{Type: audit.TypeProxyStart, Detail: "avpd started"},
		audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionInject, Reason: "binding_matched", Secret: "OPENAI", SNI: "api.openai.com", Method: "POST", Path: "/v1/chat"},
		audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionForwardVerbatim, Reason: "method_not_allowed", Secret: "OPENAI", SNI: "api.openai.com", Method: "GET", Path: "/v1/models"})
	w.Close()
	code, out, errs := runCmd("audit", "tail", log)
	if code != 0 || strings.Count(out, "\n") != 3 || !strings.Contains(out, "decision inject reason=binding_matched secret=OPENAI") || errs != "" {
		t.Fatalf("tail: %d %q %q", code, out, errs)
	}
	if _, out, _ := runCmd("audit", "tail", "--decision", "forward_verbatim", log); strings.Count(out, "\n") != 1 {
		t.Fatalf("tail --decision: %q", out)
	}
	if code, out, _ := runCmd("audit", "verify", log); code != 2 || !strings.Contains(out, "in-process audit log") || strings.Contains(out, "BROKEN") {
		t.Fatalf("verify: %d %q", code, out)
	}
}

// A --decision that no event has is a usage error, not an empty answer.
func TestAuditTailRefusesAnUnknownDecision(t *testing.T) {
	log, _ := auditLog(t)
	if code, _, errs := runCmd("audit", "tail", "--decision", "injected", log); code != 2 || !strings.Contains(errs, "forward_verbatim") {
		t.Fatalf("%d %q", code, errs)
	}
}

// With no log named, audit tail and verify read the config's audit.path (the in-process
// log): the journal's default path held an older log, shown without a word.
func TestAuditCommandsReadTheConfiguredLog(t *testing.T) {
	dir := t.TempDir()
	inproc := filepath.Join(dir, "inproc.jsonl")
	w, err := audit.OpenFile(inproc)
	if err != nil {
		t.Fatal(err)
	}
	w.Record(context.Background(), audit.Event{Type: audit.TypeDecision, Decision: audit.DecisionInject, Secret: "OPENAI", Binding: audit.Int(0), SNI: "api.openai.com", Method: "POST", Path: "/v1/from-the-configured-log"})
	w.Close()
	cfg := filepath.Join(dir, "bindings.yaml")
	os.WriteFile(cfg, []byte(`version: 1
backend: {type: file, file: {path: `+filepath.Join(dir, "secrets.yaml")+`}}
audit: {path: `+inproc+`}
secrets:
  OPENAI:
    placeholder: sk-avp-PLACEHOLDER-openai-0000000000000000
    bindings:
      - host: api.openai.com
`), 0o600)
	prev := auditConfigPath
	auditConfigPath = cfg
	defer func() { auditConfigPath = prev }()
	if code, out, errs := runCmd("audit", "tail"); code != 0 || !strings.Contains(out, "/v1/from-the-configured-log") {
		t.Fatalf("audit tail with audit.path %s configured: %d %q %q", inproc, code, out, errs)
	}
	if code, out, _ := runCmd("audit", "verify"); code != 2 || !strings.Contains(out, inproc) {
		t.Fatalf("audit verify of the configured in-process log: %d %q (want 2, it has no chain)", code, out)
	}
}
