package audit

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// gatedSync is an fdatasync that a test lets through, or fails, one call at a time (after
// the first, journal_start's).
type gatedSync struct {
	calls   atomic.Int64
	entered chan struct{}
	release chan error
}

func newGatedSync() *gatedSync {
	return &gatedSync{entered: make(chan struct{}, 16), release: make(chan error)}
}

func (g *gatedSync) sync(f *os.File) error {
	if g.calls.Add(1) == 1 {
		return f.Sync()
	}
	g.entered <- struct{}{}
	if err := <-g.release; err != nil {
		return err
	}
	return f.Sync()
}

// letGoOnCleanup lets every later fdatasync through when the test ends, so that a failed
// test does not leave Serve waiting for one. Call it after serveJournal: cleanups run last
// registered first.
func (g *gatedSync) letGoOnCleanup(t *testing.T) {
	t.Cleanup(func() { close(g.release) })
}

func (g *gatedSync) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no fdatasync started")
	}
}

// waitPending waits until the events decisionEvent(i) for each i wait in the pending batch
// for the next commit. A reader that follows may not have read the rest of a multi-event
// Record yet (it reads them after its wait), so tests name only the first event of each.
func waitPending(t *testing.T, j *Journal, ids ...int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		j.cmu.Lock()
		missing := 0
		for _, i := range ids {
			path := decisionEvent(i).Path
			if !slices.ContainsFunc(j.pending, func(it *item) bool { return it.ev.Path == path }) {
				missing++
			}
		}
		j.cmu.Unlock()
		if missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of the events %v are not pending", missing, ids)
		}
		time.Sleep(time.Millisecond)
	}
}

// gatedPair serves a journal whose fdatasync waits for g.release, with two clients, a and b.
func gatedPair(t *testing.T) (j *Journal, g *gatedSync, stop func() error, a, b *JournalClient) {
	dir := shortDir(t)
	g = newGatedSync()
	j = openTestJournal(t, dir, func(o *JournalOptions) { o.sync = g.sync })
	sock, stop := serveJournal(t, j, dir)
	g.letGoOnCleanup(t)
	a, b = NewJournalClient(sock, 5*time.Second), NewJournalClient(sock, 5*time.Second)
	t.Cleanup(func() { a.Close(); b.Close() })
	return j, g, stop, a, b
}

func recordAsync(c *JournalClient, events ...Event) chan error {
	ch := make(chan error, 1)
	go func() { ch <- c.Record(context.Background(), events...) }()
	return ch
}

func wantFailed(t *testing.T, who string, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err == nil || !errors.Is(err, ErrJournalUnavailable) || !strings.Contains(err.Error(), "fdatasync failed") {
			t.Fatalf("%s: got %v, want the fdatasync failure", who, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no answer", who)
	}
}

func wantOK(t *testing.T, who string, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("%s: %v", who, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no answer", who)
	}
}

// Events from other connections that wait while one reader leads a commit are committed
// together by the next leader; when that commit fails, every one of them gets an error,
// the leader's and the followers', and never an ack.
func TestGroupCommitFailedBatchFailsEveryFollower(t *testing.T) {
	dir := shortDir(t)
	g := newGatedSync()
	j := openTestJournal(t, dir, func(o *JournalOptions) { o.sync = g.sync })
	sock, stop := serveJournal(t, j, dir)
	g.letGoOnCleanup(t)
	a, b, c := NewJournalClient(sock, 5*time.Second), NewJournalClient(sock, 5*time.Second), NewJournalClient(sock, 5*time.Second)
	defer a.Close()
	defer b.Close()
	defer c.Close()

	ra := recordAsync(a, decisionEvent(1))
	g.waitEntered(t) // a's reader leads; its fdatasync runs
	rb := recordAsync(b, decisionEvent(2))
	rc := recordAsync(c, decisionEvent(3), decisionEvent(4))
	waitPending(t, j, 2, 3) // b's and c's readers follow
	g.release <- nil
	wantOK(t, "a", ra)
	g.waitEntered(t) // b's or c's reader leads the batch of b's and c's events
	g.release <- errors.New("EIO (test)")
	wantFailed(t, "b", rb)
	wantFailed(t, "c", rc)
	if err := stop(); !errors.Is(err, ErrFsync) {
		t.Fatalf("Serve returned %v, want ErrFsync", err)
	}
	if n := g.calls.Load(); n != 3 {
		t.Fatalf("%d fdatasyncs, want 3: the failed one was retried", n)
	}
	j2 := openTestJournal(t, dir, nil)
	j2.close()
	mustVerify(t, logSet(t, j2.opts.Log), j2.key)
}

// Events waiting for the next commit when the current one fails are never written: they
// get an error at once, and no fdatasync runs after the failed one.
func TestGroupCommitFailureFailsPendingEvents(t *testing.T) {
	j, g, stop, a, b := gatedPair(t)
	ra := recordAsync(a, decisionEvent(1))
	g.waitEntered(t)
	rb := recordAsync(b, decisionEvent(2), decisionEvent(3))
	waitPending(t, j, 2)
	g.release <- errors.New("EIO (test)")
	wantFailed(t, "a", ra)
	wantFailed(t, "b", rb)
	if err := stop(); !errors.Is(err, ErrFsync) {
		t.Fatalf("Serve returned %v, want ErrFsync", err)
	}
	if n := g.calls.Load(); n != 2 {
		t.Fatalf("%d fdatasyncs, want 2", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := a.Record(ctx, decisionEvent(4)); err == nil {
		t.Fatal("an event was acknowledged after a failed fdatasync")
	}
	// b's events were never written: the log ends with a's line (written, never acked).
	lines := readLines(t, j.opts.Log)
	if len(lines) != 2 || strings.Contains(strings.Join(lines, "\n"), "/v1/n/2") {
		t.Fatalf("log:\n%s", strings.Join(lines, "\n"))
	}
}

// Stopping commits the events readers already handed over (theirs are acked) before Serve
// returns nil.
func TestJournalStopCommitsPendingEvents(t *testing.T) {
	j, g, stop, a, b := gatedPair(t)
	ra := recordAsync(a, decisionEvent(1))
	g.waitEntered(t)
	rb := recordAsync(b, decisionEvent(2))
	waitPending(t, j, 2)
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	g.release <- nil
	wantOK(t, "a", ra)
	g.waitEntered(t)
	g.release <- nil
	wantOK(t, "b", rb)
	if err := <-stopped; err != nil {
		t.Fatalf("Serve returned %v", err)
	}
	if j.Seq() != 3 {
		t.Fatalf("last seq %d, want 3", j.Seq())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := a.Record(ctx, decisionEvent(3)); err == nil {
		t.Fatal("a stopped journal acknowledged an event")
	}
}

// Many goroutines on one shared client and on clients of their own, single and multi-event
// Records, batches cut by MaxBatch and maxBatchBytes' neighbours, rotation and Reopen all at
// once: every Record is acked, every event is in the log once, and the chain verifies.
func TestGroupCommitConcurrentStress(t *testing.T) {
	dir := shortDir(t)
	var syncs atomic.Int64
	j := openTestJournal(t, dir, func(o *JournalOptions) {
		o.MaxBatch = 5
		o.RotateSize = 16 << 10
		o.Logf = nil
		o.sync = func(f *os.File) error { syncs.Add(1); return f.Sync() }
	})
	sock, stop := serveJournal(t, j, dir)
	shared := NewJournalClient(sock, 10*time.Second)
	defer shared.Close()
	const goroutines, each = 32, 30
	var wg sync.WaitGroup
	var events atomic.Int64
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := shared
			if g%4 == 0 {
				c = NewJournalClient(sock, 10*time.Second)
				defer c.Close()
			}
			for i := 0; i < each; i++ {
				n := 1 + (g+i)%3
				evs := make([]Event, n)
				for k := range evs {
					evs[k] = decisionEvent(g*10000 + i*10 + k)
				}
				if err := c.Record(context.Background(), evs...); err != nil {
					errs <- err
					return
				}
				events.Add(int64(n))
			}
		}()
	}
	reopenDone := make(chan struct{})
	go func() {
		defer close(reopenDone)
		for i := 0; i < 20; i++ {
			if err := j.Reopen(); err != nil {
				errs <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	wg.Wait()
	<-reopenDone
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	rep := mustVerify(t, logSet(t, j.opts.Log), j.key)
	if rep.Lines != int(events.Load())+1 || rep.LastSeq != uint64(events.Load())+1 {
		t.Fatalf("%d lines, last seq %d, want %d", rep.Lines, rep.LastSeq, events.Load()+1)
	}
	if len(rep.Files) < 3 {
		t.Fatalf("%d files: the log did not rotate", len(rep.Files))
	}
	t.Logf("%d events, %d fdatasyncs, %d files", events.Load(), syncs.Load(), len(rep.Files))
}
