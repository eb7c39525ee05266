package daemon

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// flakyAuditor fails every Record while down is set, and keeps what it recorded.
type flakyAuditor struct {
	mu   sync.Mutex
	down bool
	got  []audit.Event
}

func (f *flakyAuditor) Record(_ context.Context, events ...audit.Event) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		return errors.New("audit journal unavailable: no acknowledgement")
	}
	f.got = append(f.got, events...)
	return nil
}

func (f *flakyAuditor) Close() error { return nil }

func (f *flakyAuditor) recorded() []audit.Event {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]audit.Event(nil), f.got...)
}

// TestEnrollmentRecordedLate: an enroll and an unenroll the audit log did not acknowledge
// were only logged, so the trail never showed them. They wait now, in order, and are
// recorded (marked late) once the log answers; a change made meanwhile goes after them.
func TestEnrollmentRecordedLate(t *testing.T) {
	fa := &flakyAuditor{down: true}
	d := &Daemon{logf: t.Logf, auditor: fa}
	uid := audit.Int64(4242)
	if err := d.auditChange(audit.Event{Type: audit.TypeEnroll, UID: uid, Detail: "enrolled by uid 0"}); err == nil {
		t.Fatal("auditChange returned nil while the log is down")
	}
	if err := d.auditChange(audit.Event{Type: audit.TypeUnenroll, UID: uid, Detail: "unenrolled by uid 0"}); err == nil {
		t.Fatal("auditChange returned nil while the log is down")
	}
	if n := d.late.pending(); n != 2 {
		t.Fatalf("%d change(s) waiting, want 2", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { d.recordLateChanges(ctx); close(done) }()
	time.Sleep(300 * time.Millisecond)
	fa.mu.Lock()
	fa.down = false
	fa.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); d.late.pending() > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d change(s) still waiting 5 s after the log answers again", d.late.pending())
		}
	}
	if err := d.auditChange(audit.Event{Type: audit.TypeEnroll, UID: uid, Detail: "enrolled by uid 0"}); err != nil {
		t.Fatalf("auditChange once the log answers: %v", err)
	}
	got := fa.recorded()
	if len(got) != 3 || got[0].Type != audit.TypeEnroll || got[1].Type != audit.TypeUnenroll || got[2].Type != audit.TypeEnroll {
		t.Fatalf("recorded %+v; want enroll, unenroll (late) then enroll", got)
	}
	for _, e := range got[:2] {
		if !strings.Contains(e.Detail, "recorded late") {
			t.Errorf("a late event does not say so: %q", e.Detail)
		}
	}
	if strings.Contains(got[2].Detail, "late") {
		t.Errorf("an event recorded in time says late: %q", got[2].Detail)
	}
	if n := d.late.pending(); n != 0 {
		t.Fatalf("%d change(s) still waiting", n)
	}
	cancel()
	<-done
}

// hangingAuditor: the first Record waits for release, then fails (a journal that does not
// acknowledge in time); every later Record succeeds and is kept.
type hangingAuditor struct {
	mu      sync.Mutex
	calls   int
	entered chan struct{}
	release chan struct{}
	got     []audit.Event
}

func (h *hangingAuditor) Record(_ context.Context, events ...audit.Event) error {
	h.mu.Lock()
	h.calls++
	first := h.calls == 1
	h.mu.Unlock()
	if first {
		close(h.entered)
		<-h.release
		return errors.New("audit journal: no acknowledgement in time")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.got = append(h.got, events...)
	return nil
}

func (h *hangingAuditor) Close() error { return nil }

// TestLateChangesKeepTheOrderOfTheChanges: an unenroll's record was made outside enrollMu, so
// an enroll could run while it was in flight; the enroll was queued first and the unenroll,
// whose record then failed, after it. For "unenroll X, enroll X" the trail read "enroll X,
// unenroll X": X looked unprotected while it was redirected. Each change now takes its place
// in line when it takes effect.
func TestLateChangesKeepTheOrderOfTheChanges(t *testing.T) {
	ha := &hangingAuditor{entered: make(chan struct{}), release: make(chan struct{})}
	d := &Daemon{logf: t.Logf, auditor: ha}
	uid := audit.Int64(4242)
	errc := make(chan error, 1)
	// cmdUnenroll: the change is made, then auditChange runs outside enrollMu.
	go func() {
		errc <- d.auditChange(audit.Event{Type: audit.TypeUnenroll, UID: uid, Detail: "unenrolled by uid 0"})
	}()
	<-ha.entered // the unenroll took effect first; its record is in flight
	// cmdEnroll of the same uid meanwhile (enrollMu is free): the change is made, and its
	// auditChange finds order held.
	if err := d.auditChange(audit.Event{Type: audit.TypeEnroll, UID: uid, Detail: "enrolled by uid 0"}); err == nil {
		t.Fatal("the enroll was recorded while the unenroll's record was in flight")
	}
	close(ha.release)
	<-errc
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.recordLateChanges(ctx)
	for deadline := time.Now().Add(5 * time.Second); d.late.pending() > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("late changes not recorded")
		}
	}
	ha.mu.Lock()
	got := append([]audit.Event(nil), ha.got...)
	ha.mu.Unlock()
	for i, e := range got {
		t.Logf("recorded %d: %s %q", i, e.Type, e.Detail)
	}
	if len(got) != 2 || got[0].Type != audit.TypeUnenroll || got[1].Type != audit.TypeEnroll {
		t.Fatalf("the trail reads %s then %s; the changes were unenroll then enroll (uid 4242 is enrolled now, the trail says it is not)", got[0].Type, got[1].Type)
	}
}
