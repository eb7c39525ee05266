package daemon

import (
	"context"
	"sync"
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

// auditHealth follows every Record on avpd's auditor.
type auditHealth struct {
	mu           sync.Mutex
	ready        bool
	err          string
	failingSince time.Time
	lastOK       time.Time
}

func (h *auditHealth) note(ctx context.Context, err error) {
	if err != nil && ctx.Err() == context.Canceled {
		// The caller gave up (an agent closed its connection): not the log's answer.
		return
	}
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		h.lastOK, h.err, h.failingSince = now, "", time.Time{}
		return
	}
	if h.err == "" {
		h.failingSince = now
	}
	h.err = err.Error()
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
	if !h.lastOK.IsZero() {
		t := h.lastOK.UTC()
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
