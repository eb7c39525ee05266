package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Many concurrent writers share fdatasyncs, every ack comes after the fdatasync that
// covers its event, and the result verifies.
func TestGroupCommit(t *testing.T) {
	dir := shortDir(t)
	var syncs atomic.Int64
	j := openTestJournal(t, dir, func(o *JournalOptions) {
		o.sync = func(f *os.File) error {
			syncs.Add(1)
			time.Sleep(2 * time.Millisecond) // a slow disk makes batching visible
			return f.Sync()
		}
	})
	sock, stop := serveJournal(t, j, dir)
	const writers, each = 64, 20
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := NewJournalClient(sock, 5*time.Second)
			defer c.Close()
			for i := 0; i < each; i++ {
				if err := c.Record(context.Background(), decisionEvent(w*1000+i)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	before := syncs.Load()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	events := int64(writers * each)
	t.Logf("%d events, %d fdatasyncs", events, before)
	if before > events/4 {
		t.Fatalf("%d fdatasyncs for %d events: no group commit", before, events)
	}
	rep := mustVerify(t, logSet(t, j.opts.Log), j.key)
	if rep.Lines != int(events)+1 {
		t.Fatalf("%d lines, want %d", rep.Lines, events+1)
	}
}

// I7 at the unit level: Record does not return before the fdatasync covering its event has
// returned.
func TestAckOnlyAfterFdatasync(t *testing.T) {
	dir := shortDir(t)
	release := make(chan struct{})
	var synced atomic.Bool
	var calls atomic.Int64
	j := openTestJournal(t, dir, func(o *JournalOptions) {
		o.sync = func(f *os.File) error {
			if calls.Add(1) > 1 { // the first is journal_start's
				<-release
				synced.Store(true)
			}
			return f.Sync()
		}
	})
	sock, _ := serveJournal(t, j, dir)
	c := NewJournalClient(sock, 5*time.Second)
	defer c.Close()
	done := make(chan error, 1)
	go func() { done <- c.Record(context.Background(), decisionEvent(1)) }()
	select {
	case err := <-done:
		t.Fatalf("Record returned (%v) while the fdatasync was still running", err)
	case <-time.After(300 * time.Millisecond):
	}
	// The line is already in the file (written, not yet synced), but not acknowledged.
	if lines := readLines(t, j.opts.Log); len(lines) != 2 {
		t.Fatalf("%d lines before the sync", len(lines))
	}
	close(release)
	if err := <-done; err != nil || !synced.Load() {
		t.Fatalf("Record: %v (synced %v)", err, synced.Load())
	}
}

// A failed fdatasync is never retried: the batch fails, the journal stops with ErrFsync, and
// a restart recovers from the file.
func TestFsyncFailureIsFatal(t *testing.T) {
	dir := shortDir(t)
	var calls atomic.Int64
	j := openTestJournal(t, dir, func(o *JournalOptions) {
		o.sync = func(f *os.File) error {
			if calls.Add(1) == 3 {
				return errors.New("EIO (test)")
			}
			return f.Sync()
		}
	})
	sock, stop := serveJournal(t, j, dir)
	c := NewJournalClient(sock, 500*time.Millisecond)
	defer c.Close()
	if err := c.Record(context.Background(), decisionEvent(1)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	err := c.Record(context.Background(), decisionEvent(2))
	if time.Since(t0) > 300*time.Millisecond || err == nil || !strings.Contains(err.Error(), "fdatasync failed") {
		t.Fatalf("the failed batch must get an error at once, got %v after %v", err, time.Since(t0))
	}
	if err == nil || !errors.Is(err, ErrJournalUnavailable) {
		t.Fatalf("Record after a failed fdatasync: %v", err)
	}
	if err := stop(); !errors.Is(err, ErrFsync) {
		t.Fatalf("Serve returned %v, want ErrFsync", err)
	}
	if n := calls.Load(); n != 3 {
		t.Fatalf("fdatasync called %d times: a failed one was retried", n)
	}
	if err := c.Record(context.Background(), decisionEvent(3)); err == nil {
		t.Fatal("an event was acknowledged by a stopped journal")
	}
	// Restart: recovery reads the file; the failed batch's line may be there (it was written
	// before the failed sync), never acknowledged; the chain verifies.
	j2 := openTestJournal(t, dir, nil)
	j2.close()
	mustVerify(t, logSet(t, j2.opts.Log), j2.key)
}

func TestRecoveryMovesTornTailAside(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 5)
	j.close()
	lastSeq := j.seq
	torn := []byte(`{"v":1,"seq":7,"ts":"2026-01-01T00:00:00Z","prev":"00`)
	f, _ := os.OpenFile(j.opts.Log, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(torn)
	f.Close()

	j2 := openTestJournal(t, dir, nil)
	j2.close()
	st := j2.Start
	if st.TornBytes != int64(len(torn)) || st.TornFile == "" || !strings.Contains(st.Detail, "WARNING: torn tail") {
		t.Fatalf("journal_start %+v", st)
	}
	kept, err := os.ReadFile(st.TornFile)
	if err != nil || string(kept) != string(torn) {
		t.Fatalf("torn bytes kept: %q %v", kept, err)
	}
	if j2.StartSeq != lastSeq+1 {
		t.Fatalf("resumed at seq %d, want %d", j2.StartSeq, lastSeq+1)
	}
	rep := mustVerify(t, logSet(t, j2.opts.Log), j2.key)
	if !strings.Contains(strings.Join(rep.Notes, "\n"), "torn tail") {
		t.Fatalf("verify does not surface the torn tail: %v", rep.Notes)
	}

	// Garbage from a crash that persisted a later page but not an earlier one: complete
	// lines that do not chain are part of the torn tail too.
	// The crash came before the head file recorded the last batch: its lines were never
	// acknowledged (a crash cannot damage lines that were, since they were synced).
	j3 := openTestJournal(t, dir, nil)
	appendEvents(t, j3, 1)
	headBefore, _ := os.ReadFile(HeadName(j3.opts.Log))
	appendEvents(t, j3, 2)
	j3.close()
	os.WriteFile(HeadName(j3.opts.Log), headBefore, 0o640)
	lines := readLines(t, j3.opts.Log)
	data, _ := os.ReadFile(j3.opts.Log)
	cut := len(data) - len(lines[len(lines)-1]) - 1 - len(lines[len(lines)-2]) - 1
	zeroed := append(append([]byte{}, data[:cut]...), make([]byte, len(lines[len(lines)-2])+1)...)
	zeroed = append(zeroed, lines[len(lines)-1]+"\n"...)
	os.WriteFile(j3.opts.Log, zeroed, 0o640)
	j4 := openTestJournal(t, dir, nil)
	j4.close()
	if j4.Start.TornBytes != int64(len(zeroed)-cut) {
		t.Fatalf("torn %d bytes, want %d: %s", j4.Start.TornBytes, len(zeroed)-cut, j4.Start.Detail)
	}
	mustVerify(t, logSet(t, j4.opts.Log), j4.key)
}

// Damage far from the tail is not a crash: the journal refuses to start and says where.
func TestRecoveryRefusesDamageBeforeTheTail(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 8000) // > maxTornBytes after line 3
	j.close()
	data, _ := os.ReadFile(j.opts.Log)
	i := strings.Index(string(data), `"/v1/n/1"`)
	data[i+3] = 'X'
	os.WriteFile(j.opts.Log, data, 0o640)
	_, err := OpenJournal(JournalOptions{Log: j.opts.Log})
	if err == nil || !strings.Contains(err.Error(), "not a torn tail") || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("got %v", err)
	}
}

func TestRecoveryAcrossRotation(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.RotateSize = 1500 })
	appendEvents(t, j, 4) // rotated right after this batch: the live file is empty
	if j.size != 0 {
		t.Fatalf("not rotated: %d bytes", j.size)
	}
	j.close()
	j2 := openTestJournal(t, dir, func(o *JournalOptions) { o.RotateSize = 1500 })
	if j2.StartSeq != 6 || !strings.Contains(j2.Start.Detail, "resumed after seq 5 in audit.jsonl.0000000000000001") {
		t.Fatalf("start seq %d: %s", j2.StartSeq, j2.Start.Detail)
	}
	appendEvents(t, j2, 10)
	j2.close()
	rep := mustVerify(t, logSet(t, j.opts.Log), j.key)
	if rep.LastSeq != 16 || len(rep.Files) < 3 {
		t.Fatalf("%+v", rep)
	}
}

// Whole lines cut off the end are found through the head file, at start and by verify.
func TestRecoveryReportsMissingAcknowledgedEvents(t *testing.T) {
	dir := t.TempDir()
	j := openTestJournal(t, dir, nil)
	appendEvents(t, j, 5)
	j.close()
	lines := readLines(t, j.opts.Log)
	os.WriteFile(j.opts.Log, []byte(strings.Join(lines[:4], "\n")+"\n"), 0o640)
	rep, _ := Verify(logSet(t, j.opts.Log), j.key)
	if rep.Problem == nil || !strings.Contains(rep.Problem.Reason, "truncated") {
		t.Fatalf("verify: %+v", rep.Problem)
	}
	j2 := openTestJournal(t, dir, nil)
	j2.close()
	if !strings.Contains(j2.Start.Detail, "WARNING") || !strings.Contains(j2.Start.Detail, "2 acknowledged event(s) are missing") {
		t.Fatalf("journal_start: %s", j2.Start.Detail)
	}
}

// SIGHUP: another tool moved the file away; the journal reopens the path and the chain goes
// on across the moved file and the new one.
func TestReopenKeepsTheChain(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	sock, stop := serveJournal(t, j, dir)
	c := NewJournalClient(sock, 2*time.Second)
	defer c.Close()
	for i := 0; i < 3; i++ {
		if err := c.Record(context.Background(), decisionEvent(i)); err != nil {
			t.Fatal(err)
		}
	}
	moved := filepath.Join(dir, "audit.jsonl.1")
	if err := os.Rename(j.opts.Log, moved); err != nil {
		t.Fatal(err)
	}
	if err := j.Reopen(); err != nil {
		t.Fatal(err)
	}
	for i := 3; i < 5; i++ {
		if err := c.Record(context.Background(), decisionEvent(i)); err != nil {
			t.Fatal(err)
		}
	}
	stop()
	if n := len(readLines(t, j.opts.Log)); n != 2 {
		t.Fatalf("new file has %d lines", n)
	}
	rep := mustVerify(t, []string{j.opts.Log, moved}, j.key)
	if rep.LastSeq != 6 {
		t.Fatalf("%+v", rep)
	}
}

// The client reconnects when the journal comes back; while it is away, Record fails within
// the deadline.
func TestClientReconnectsAndTimesOut(t *testing.T) {
	dir, stop, c := connectedClient(t, 300*time.Millisecond)
	stop()
	t0 := time.Now()
	err := c.Record(context.Background(), decisionEvent(2))
	if !errors.Is(err, ErrJournalUnavailable) || time.Since(t0) > 2*time.Second {
		t.Fatalf("with the journal stopped: %v after %v", err, time.Since(t0))
	}
	j2 := openTestJournal(t, dir, nil)
	serveJournal(t, j2, dir)
	if err := c.Record(context.Background(), decisionEvent(3)); err != nil {
		t.Fatalf("after the journal came back: %v", err)
	}

	// An ack later than the deadline is a failure.
	dir2 := shortDir(t)
	// No t.Logf: the delayed ack's log line comes after the test ended.
	j3 := openTestJournal(t, dir2, func(o *JournalOptions) { o.AckDelay = time.Second; o.Logf = nil })
	sock3, _ := serveJournal(t, j3, dir2)
	c3 := NewJournalClient(sock3, 200*time.Millisecond)
	defer c3.Close()
	if err := c3.Record(context.Background(), decisionEvent(1)); !errors.Is(err, ErrJournalUnavailable) || !strings.Contains(err.Error(), "within the deadline") {
		t.Fatalf("late ack: %v", err)
	}
	// The context's own deadline wins when it is sooner.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	c4 := NewJournalClient(sock3, 5*time.Second)
	defer c4.Close()
	t0 = time.Now()
	if err := c4.Record(ctx, decisionEvent(1)); err == nil || time.Since(t0) > 500*time.Millisecond {
		t.Fatalf("context deadline: %v after %v", err, time.Since(t0))
	}
}

// The journal enforces the closed schema on the wire; a message it cannot read gets an
// error and nothing is written.
func TestJournalRejectsEventsOutsideTheSchema(t *testing.T) {
	dir := shortDir(t)
	j := openTestJournal(t, dir, nil)
	sock, stop := serveJournal(t, j, dir)
	conn, err := net.Dial("unixpacket", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, msg := range []string{
		`{"id":1,"event":{"type":"decision","decision":"inject","authorization":"Bearer sk-x"}}`,
		`{"id":2,"event":{"type":"proxy_stop","secret":"A"}}`,
		`{"id":3,"event":{"type":"whatever"}}`,
		`{"id":4,"event":{"type":"proxy_stop"},"extra":1}`,
	} {
		conn.Write([]byte(msg))
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("%s: %v", msg, err)
		}
		var a ackMsg
		json.Unmarshal(buf[:n], &a)
		if a.Error == "" || len(a.Acks) != 0 {
			t.Fatalf("%s: accepted: %s", msg, buf[:n])
		}
	}
	// A good one on the same connection still works.
	conn.Write([]byte(`{"id":9,"event":{"type":"proxy_stop","detail":"x"}}`))
	buf := make([]byte, 4096)
	n, _ := conn.Read(buf)
	if string(buf[:n]) != `{"acks":[[9,2]]}` {
		t.Fatalf("ack %s", buf[:n])
	}
	stop()
	if n := len(readLines(t, j.opts.Log)); n != 2 {
		t.Fatalf("%d lines", n)
	}
}

func TestMirrorNeverBlocks(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	var got atomic.Int64
	m := newMirror(func(msg string, f map[string]string) error {
		got.Add(1)
		<-block
		return nil
	})
	t0 := time.Now()
	for i := 0; i < 10000; i++ {
		e := decisionEvent(i)
		m.Push(uint64(i), &e)
	}
	if d := time.Since(t0); d > time.Second {
		t.Fatalf("Push blocked for %v", d)
	}
	if m.Dropped() == 0 {
		t.Fatal("a stuck journald must make the mirror drop, not wait")
	}
	e := decisionEvent(7)
	f := journaldFields(42, &e)
	want := map[string]string{"AVP_SEQ": "42", "AVP_TYPE": "decision", "AVP_DECISION": "inject", "AVP_SECRET": "OPENAI",
		"AVP_BINDING": "0", "AVP_UID": "4242", "AVP_SNI": "api.openai.test", "AVP_PATH": "/v1/n/7", "AVP_METHOD": "POST", "AVP_DST": "127.0.0.2:443"}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("%s = %q, want %q", k, f[k], v)
		}
	}
	if msg := journaldMessage(42, &e); msg != "audit #42 decision inject OPENAI POST api.openai.test/v1/n/7" {
		t.Errorf("message %q", msg)
	}
}

// Mirror is called with every durable event and only after its fdatasync.
func TestJournalMirrorsDurableEvents(t *testing.T) {
	dir := shortDir(t)
	var mu sync.Mutex
	var seqs []uint64
	j := openTestJournal(t, dir, func(o *JournalOptions) {
		o.Mirror = func(seq uint64, e *Event) { mu.Lock(); seqs = append(seqs, seq); mu.Unlock() }
	})
	appendEvents(t, j, 3)
	j.close()
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(seqs) != "[1 2 3 4]" {
		t.Fatalf("mirrored %v", seqs)
	}
}

// TestOpenFileMovesTornLineAside: the in-process writer appended after a last line a crash
// cut short, so the next acknowledged event became part of an unreadable line. The torn
// bytes are now moved to a file beside the log, as the journal does.
func TestOpenFileMovesTornLineAside(t *testing.T) {
	for _, tc := range []struct{ content, keep, torn string }{
		{"{\"a\":1}\n{\"b\":", "{\"a\":1}\n", "{\"b\":"},
		{"{\"b\":", "", "{\"b\":"},
		{"{\"a\":1}\n", "{\"a\":1}\n", ""},
		{"", "", ""},
	} {
		path := filepath.Join(t.TempDir(), "audit.jsonl")
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		w, err := OpenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Record(context.Background(), Event{Type: TypeProxyStart, ConfigSHA256: "x"}); err != nil {
			t.Fatal(err)
		}
		w.Close()
		got, _ := os.ReadFile(path)
		if !strings.HasPrefix(string(got), tc.keep) || strings.Count(string(got), "\n") != strings.Count(tc.keep, "\n")+1 || !strings.Contains(string(got[len(tc.keep):]), `"type":"proxy_start"`) {
			t.Errorf("%q: the log is now %q", tc.content, got)
		}
		if tc.torn == "" {
			if w.TornFile != "" {
				t.Errorf("%q: moved %s aside", tc.content, w.TornFile)
			}
			continue
		}
		if torn, err := os.ReadFile(w.TornFile); err != nil || string(torn) != tc.torn {
			t.Errorf("%q: torn file %q: %q %v", tc.content, w.TornFile, torn, err)
		}
	}
}
