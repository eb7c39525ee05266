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

// lateChanges holds the enrollment events waiting, oldest first. order serializes every
// attempt to record them, so the log keeps the order in which the changes were made.
type lateChanges struct {
	order sync.Mutex
	mu    sync.Mutex
	q     []audit.Event
	wake  chan struct{}
}

func (l *lateChanges) pending() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.q)
}

func (l *lateChanges) snapshot() []audit.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]audit.Event(nil), l.q...)
}

// done drops the first n events (recorded).
func (l *lateChanges) done(n int) {
	l.mu.Lock()
	l.q = l.q[n:]
	l.mu.Unlock()
}

func (l *lateChanges) push(e audit.Event) {
	l.mu.Lock()
	l.q = append(l.q, e)
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

// auditChange records an enroll or unenroll event after those still waiting. When the log
// does not acknowledge, the event waits for a late record and the error is returned for
// the operator; the change itself stands.
func (d *Daemon) auditChange(e audit.Event) error {
	// Never wait for the late record in progress: the caller may hold enrollMu, which the
	// firewall check needs every second. The event goes behind it.
	if !d.late.order.TryLock() {
		n := d.late.pending()
		d.late.push(lateMark(e, time.Now()))
		return fmt.Errorf("it waits behind %d earlier enroll/unenroll event(s) the audit log has not acknowledged yet", n)
	}
	defer d.late.order.Unlock()
	waiting := d.late.snapshot()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := d.auditor.Record(ctx, append(waiting, e)...)
	if err == nil {
		d.late.done(len(waiting))
		return nil
	}
	d.logf("audit %s: %v; it waits to be recorded late (%d event(s) waiting)", e.Type, err, len(waiting)+1)
	d.late.push(lateMark(e, time.Now()))
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
	waiting := d.late.snapshot()
	if len(waiting) == 0 {
		return true
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := d.auditor.Record(rctx, waiting...); err != nil {
		return false
	}
	d.late.done(len(waiting))
	d.logf("audit: recorded %d enroll/unenroll event(s) late that the audit log had not acknowledged in time", len(waiting))
	return true
}

// dropLateChanges logs what could not be recorded before avpd stops: each change, so the
// daemon's log keeps what the audit log lacks.
func (d *Daemon) dropLateChanges() {
	for _, e := range d.late.snapshot() {
		uid := int64(-1)
		if e.UID != nil {
			uid = *e.UID
		}
		d.logf("audit: avpd stops and this event was never recorded: %s uid %d (%s)", e.Type, uid, e.Detail)
	}
}
