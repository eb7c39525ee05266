package daemon

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// AuditStatus is what avpd's own audit sink (the journal over its socket, or the
// in-process file) has answered avpd itself: doctor's and status's source for whether
// decisions can be recorded. A probe by another user (doctor runs as root) says nothing
// about avpd's: a journal socket avpd's user may not connect to, or a journal that
// accepts and never acknowledges, shows only here.
type AuditStatus struct {
	// Ready: proxy_start was acknowledged (what READY=1 waits for).
	Ready bool `json:"audit_ready"`
	// Error is the latest failure while the latest attempt failed ("" once one succeeds).
	Error        string     `json:"audit_error,omitempty"`
	FailingSince *time.Time `json:"audit_failing_since,omitempty"`
	LastOK       *time.Time `json:"audit_last_ok,omitempty"`
	// Pending counts enroll and unenroll events waiting to be recorded late.
	Pending int `json:"audit_pending,omitempty"`
}

// auditHealth follows every Record on avpd's auditor. Every request records, so a success
// while nothing is failing touches two atomics and takes no lock.
type auditHealth struct {
	lastOK  atomic.Int64 // unix nanoseconds of the latest success, 0 for none
	failing atomic.Bool  // err is set

	mu           sync.Mutex
	ready        bool
	err          string
	failingSince time.Time
}

func (h *auditHealth) note(ctx context.Context, err error) {
	if err == nil {
		h.lastOK.Store(time.Now().UnixNano())
		if h.failing.Load() {
			h.mu.Lock()
			h.err, h.failingSince = "", time.Time{}
			h.failing.Store(false)
			h.mu.Unlock()
		}
		return
	}
	if ctx.Err() == context.Canceled {
		// The caller gave up (an agent closed its connection): not the log's answer.
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == "" {
		h.failingSince = time.Now()
	}
	h.err = err.Error()
	h.failing.Store(true)
}

func (h *auditHealth) setReady() {
	h.mu.Lock()
	h.ready = true
	h.mu.Unlock()
}

func (h *auditHealth) status() AuditStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := AuditStatus{Ready: h.ready, Error: h.err}
	if !h.failingSince.IsZero() {
		t := h.failingSince.UTC()
		s.FailingSince = &t
	}
	if ns := h.lastOK.Load(); ns != 0 {
		t := time.Unix(0, ns).UTC()
		s.LastOK = &t
	}
	return s
}

// trackedAuditor passes every Record to the real sink and notes its answer in h.
type trackedAuditor struct {
	auditCloser
	h *auditHealth
}

func (t trackedAuditor) Record(ctx context.Context, events ...audit.Event) error {
	err := t.auditCloser.Record(ctx, events...)
	t.h.note(ctx, err)
	return err
}
