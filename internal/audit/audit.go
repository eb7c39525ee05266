// Package audit owns the record of every decision: the event schema and the writers that make
// events durable before the proxy acts on them (I7).
//
// An event never holds a header value, a query string, a body or a secret: only names,
// addresses and the normalized path. The schema is closed: Event has no free-form map.
package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Event types.
const (
	TypeDecision       = "decision"
	TypeProxyStart     = "proxy_start"
	TypeProxyStop      = "proxy_stop"
	TypeConfigLoaded   = "config_loaded"
	TypeConfigRejected = "config_rejected"
	TypeEnroll         = "enroll"
	TypeUnenroll       = "unenroll"
	// TypeRulesRestored is written by avpd when it found its nftables table or its enrolled
	// set missing or altered (another tool's "nft flush ruleset", say) and put it back.
	TypeRulesRestored = "rules_restored"
	// TypeJournalStart is written by the journal itself when it starts: what it found in
	// the log (clean tail, torn tail moved aside, missing events) and where it resumed.
	TypeJournalStart = "journal_start"
)

// Decisions, the values of Event.Decision.
const (
	DecisionInject          = "inject"
	DecisionForwardVerbatim = "forward_verbatim"
	DecisionHostMismatch    = "host_mismatch"
	DecisionBackendError    = "backend_error"
	DecisionPassthrough     = "passthrough"
	DecisionRefuse          = "refuse"
)

// Event is one audit record.
type Event struct {
	TS       time.Time `json:"ts"`
	Type     string    `json:"type"`
	Decision string    `json:"decision,omitempty"`
	Reason   string    `json:"reason,omitempty"`
	Secret   string    `json:"secret,omitempty"`
	Binding  *int      `json:"binding,omitempty"`
	UID      *int64    `json:"uid,omitempty"`
	PID      *int64    `json:"pid,omitempty"` // the agent process, when known
	Dst      string    `json:"dst,omitempty"`
	SNI      string    `json:"sni,omitempty"`
	Method   string    `json:"method,omitempty"`
	// Path is the normalized path without the query, or "" when it could not be normalized.
	Path   string `json:"path,omitempty"`
	Status int    `json:"status,omitempty"`
	// ConfigSHA256 identifies the config for config_loaded / proxy_start.
	ConfigSHA256 string `json:"config_sha256,omitempty"`
	// Detail is a fixed, daemon-written sentence (never request data or an error from a
	// backend, which could quote a secret).
	Detail string `json:"detail,omitempty"`
	// TornBytes and TornFile (journal_start only) say how many bytes of a torn tail the
	// journal found after the last intact line, and the file it moved them to.
	TornBytes int64  `json:"torn_bytes,omitempty"`
	TornFile  string `json:"torn_file,omitempty"`
}

// Auditor makes events durable. Record returns nil only once every event is on disk; the
// proxy writes nothing modified upstream before it returns (I7).
type Auditor interface {
	Record(ctx context.Context, events ...Event) error
}

// FileWriter appends events as JSON lines to one file and fsyncs before returning. It is
// the in-process writer; a separate journal service replaces it in production.
type FileWriter struct {
	mu  sync.Mutex
	f   *os.File
	now func() time.Time
	// TornFile is where OpenFile moved a torn last line (a crash during a write), or "".
	TornFile string
}

var _ Auditor = (*FileWriter)(nil)

// OpenFile opens path for appending, creating it (0600) and its directory (0700).
func OpenFile(path string) (*FileWriter, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create audit directory for %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	w := &FileWriter{f: f, now: time.Now}
	// A last line without its newline is the write a crash cut short (never acknowledged):
	// the next event would be appended to it and both lost to a reader. It is moved aside,
	// as the journal does with its torn tail.
	if from, to, err := tornTail(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("check audit log %s: %w", path, err)
	} else if to > from {
		if w.TornFile, err = moveAside(f, path, from, to); err != nil {
			f.Close()
			return nil, fmt.Errorf("audit log %s: %w", path, err)
		}
	}
	return w, nil
}

// tornTail finds the bytes after f's last newline: [from, to), empty when f ends with one.
func tornTail(f *os.File) (from, to int64, err error) {
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return 0, 0, err
	}
	to = st.Size()
	buf := make([]byte, 64<<10)
	for end := to; end > 0; {
		start := max(end-int64(len(buf)), 0)
		n, err := f.ReadAt(buf[:end-start], start)
		if err != nil && err != io.EOF {
			return 0, 0, err
		}
		if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
			return start + int64(i) + 1, to, nil
		}
		end = start
	}
	return 0, to, nil
}

// Record writes all events in one write and one fdatasync.
func (w *FileWriter) Record(ctx context.Context, events ...Event) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var buf []byte
	for _, e := range events {
		if e.TS.IsZero() {
			e.TS = w.now().UTC()
		}
		line, err := json.Marshal(e)
		if err != nil {
			return fmt.Errorf("encode audit event: %w", err)
		}
		buf = append(append(buf, line...), '\n')
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return fmt.Errorf("audit log is closed")
	}
	if _, err := w.f.Write(buf); err != nil {
		return fmt.Errorf("append audit log: %w", err)
	}
	if err := w.f.Sync(); err != nil {
		// Never retry a failed fsync: the page cache may already have dropped the data.
		w.f.Close()
		w.f = nil
		return fmt.Errorf("fsync audit log: %w", err)
	}
	return nil
}

// Close closes the file.
func (w *FileWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}

// Int and Int64 make pointer fields easy to fill.
func Int(v int) *int       { return &v }
func Int64(v int64) *int64 { return &v }
