package audit

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// shortDir is a temporary directory with a path short enough for a Unix socket.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "avpj")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func openTestJournal(t testing.TB, dir string, mod func(*JournalOptions)) *Journal {
	t.Helper()
	opts := JournalOptions{Log: filepath.Join(dir, "audit.jsonl"), Logf: t.Logf}
	if mod != nil {
		mod(&opts)
	}
	j, err := OpenJournal(opts)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func decisionEvent(i int) Event {
	return Event{Type: TypeDecision, Decision: DecisionInject, Secret: "OPENAI", Binding: Int(0), UID: Int64(4242),
		Dst: "127.0.0.2:443", SNI: "api.openai.test", Method: "POST", Path: fmt.Sprintf("/v1/n/%d", i)}
}

// appendEvents commits n events in batches of up to 7, rotating as the serving loop does.
func appendEvents(t testing.TB, j *Journal, n int) {
	t.Helper()
	for i := 0; i < n; {
		var batch []*item
		for k := 0; k < 7 && i < n; k, i = k+1, i+1 {
			batch = append(batch, &item{ev: decisionEvent(i)})
		}
		if _, err := j.commit(batch); err != nil {
			t.Fatal(err)
		}
		if j.size >= j.opts.RotateSize {
			if err := j.rotate(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// serveJournal serves j on a socket in dir; stop ends Serve and returns its error.
func serveJournal(t testing.TB, j *Journal, dir string) (sock string, stop func() error) {
	t.Helper()
	sock = filepath.Join(dir, "j.sock")
	ln, err := ListenJournal(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- j.Serve(ctx, ln) }()
	var once bool
	var res error
	stop = func() error {
		if once {
			return res
		}
		once = true
		cancel()
		select {
		case res = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("journal did not stop")
		}
		return res
	}
	t.Cleanup(func() { stop() })
	return sock, stop
}

func readLines(t testing.TB, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}

func mustVerify(t testing.TB, paths []string, key []byte) *VerifyReport {
	t.Helper()
	rep, err := Verify(paths, key)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Problem != nil {
		t.Fatalf("verify: %v", rep.Problem)
	}
	return rep
}

func logSet(t testing.TB, live string) []string {
	t.Helper()
	set, err := ExpandLogSet([]string{live})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// connectedClient serves a new journal in a temporary directory and returns the directory,
// the journal's stop, and a client of it that has recorded one event (so it is connected).
func connectedClient(t *testing.T, timeout time.Duration) (string, func() error, *JournalClient) {
	t.Helper()
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	sock, stop := serveJournal(t, j, dir)
	c := NewJournalClient(sock, timeout)
	t.Cleanup(func() { c.Close() })
	if err := c.Record(context.Background(), decisionEvent(1)); err != nil {
		t.Fatal(err)
	}
	return dir, stop, c
}
