package daemon

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// An enroll or unenroll takes effect whatever the audit log answers (an unenroll above all
// must never wait on it), but the trail must still show it. One the log did not
// acknowledge waits here and is recorded, marked late, once the log answers again, as
// refusals are (intercept/late.go); avpctl tells the operator it is not recorded yet.

const (
	lateChangeMinBackoff = 200 * time.Millisecond
	lateChangeMaxBackoff = 30 * time.Second
)

// lateChanges holds the enrollment events not recorded yet, in the order the changes took
// effect: each takes its place (reserve) while enrollMu is held for its change, before
// anything is recorded, so two changes are recorded in the order they were made whichever
// record attempt succeeds first. order serializes the attempts.
type lateChanges struct {
	order sync.Mutex
	mu    sync.Mutex
	q     []*pendingChange
	wake  chan struct{}
}

// pendingChange is one enroll or unenroll event waiting to be recorded.
type pendingChange struct {
	e  audit.Event
	at time.Time // when the change took effect
	// late is set once its own attempt failed: it is then recorded marked late.
	late bool
}

func (l *lateChanges) pending() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.q)
}

// reserve puts e in line, stamped now; the caller holds enrollMu and made the change.
func (l *lateChanges) reserve(e audit.Event) *pendingChange {
	pc := &pendingChange{e: e, at: time.Now()}
	l.mu.Lock()
	l.q = append(l.q, pc)
	l.mu.Unlock()
	return pc
}

// waiting is what waits, oldest first, as it is to be recorded.
func (l *lateChanges) waiting() ([]*pendingChange, []audit.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	pcs := append([]*pendingChange(nil), l.q...)
	events := make([]audit.Event, len(pcs))
	for i, pc := range pcs {
		events[i] = pc.e
		if pc.late {
			events[i] = lateMark(pc.e, pc.at)
		}
	}
	return pcs, events
}

// done drops the first n (recorded).
func (l *lateChanges) done(n int) {
	l.mu.Lock()
	l.q = l.q[n:]
	l.mu.Unlock()
}

// queued reports whether pc still waits, and how many wait before it.
func (l *lateChanges) queued(pc *pendingChange) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, q := range l.q {
		if q == pc {
			return true, i
		}
	}
	return false, 0
}

// markLate marks pcs late and wakes the late recorder.
func (l *lateChanges) markLate(pcs ...*pendingChange) {
	l.mu.Lock()
	for _, pc := range pcs {
		pc.late = true
	}
	if l.wake == nil {
		l.wake = make(chan struct{}, 1)
	}
	wake := l.wake
	l.mu.Unlock()
	select {
	case wake <- struct{}{}:
	default:
	}
}

func (l *lateChanges) wakeC() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.wake == nil {
		l.wake = make(chan struct{}, 1)
	}
	return l.wake
}

// lateMark is what a late event's detail gains: when the change was made.
func lateMark(e audit.Event, at time.Time) audit.Event {
	e.Detail += "; recorded late: the audit log did not acknowledge it at " + at.UTC().Format(time.RFC3339) + ", when the change took effect"
	return e
}

// auditChange records an enroll or unenroll event right after its change took effect; the
// caller holds enrollMu (so the event takes its place in order) and gets it released.
func (d *Daemon) auditChange(e audit.Event) error {
	return d.settleChange(d.late.reserve(e))
}

// settleChange records pc and every change waiting before it. When the log does not
// acknowledge, they wait for a late record and the error is returned for the operator; the
// change itself stands.
func (d *Daemon) settleChange(pc *pendingChange) error {
	// Never wait for a late record in progress (up to its timeout): it goes on behind it.
	if !d.late.order.TryLock() {
		if in, n := d.late.queued(pc); in {
			d.late.markLate(pc)
			return fmt.Errorf("it waits behind %d earlier enroll/unenroll event(s) the audit log has not acknowledged yet", n)
		}
		return nil // the record in progress took it
	}
	defer d.late.order.Unlock()
	if in, _ := d.late.queued(pc); !in {
		return nil // recorded by an attempt before this one
	}
	pcs, events := d.late.waiting()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := d.auditor.Record(ctx, events...)
	if err == nil {
		d.late.done(len(pcs))
		return nil
	}
	d.logf("audit %s: %v; it waits to be recorded late (%d event(s) waiting)", pc.e.Type, err, len(pcs))
	d.late.markLate(pcs...)
	return err
}

// recordLateChanges records the waiting events, retrying with backoff while the log does
// not answer, until ctx ends.
func (d *Daemon) recordLateChanges(ctx context.Context) {
	backoff := lateChangeMinBackoff
	wake := d.late.wakeC()
	for {
		if d.late.pending() == 0 {
			backoff = lateChangeMinBackoff
			select {
			case <-wake:
			case <-ctx.Done():
				return
			}
		}
		if d.flushLateChanges(ctx) {
			backoff = lateChangeMinBackoff
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		backoff = min(2*backoff, lateChangeMaxBackoff)
	}
}

// flushLateChanges tries once to record what waits; it reports whether nothing is left.
func (d *Daemon) flushLateChanges(ctx context.Context) bool {
	d.late.order.Lock()
	defer d.late.order.Unlock()
	pcs, events := d.late.waiting()
	if len(pcs) == 0 {
		return true
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := d.auditor.Record(rctx, events...); err != nil {
		d.late.markLate(pcs...)
		return false
	}
	d.late.done(len(pcs))
	d.logf("audit: recorded %d enroll/unenroll event(s) late that the audit log had not acknowledged in time", len(pcs))
	return true
}

// dropLateChanges logs what could not be recorded before avpd stops: each change, so the
// daemon's log keeps what the audit log lacks.
func (d *Daemon) dropLateChanges() {
	_, events := d.late.waiting()
	for _, e := range events {
		uid := int64(-1)
		if e.UID != nil {
			uid = *e.UID
		}
		d.logf("audit: avpd stops and this event was never recorded: %s uid %d (%s)", e.Type, uid, e.Detail)
	}
}
