package audit

import (
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/coreos/go-systemd/v22/journal"
)

// JournaldMirror copies durable events to systemd-journald with AVP_* fields, best effort:
// events go through a bounded queue to one sender goroutine and are dropped (and counted)
// when the queue is full, so a slow or stuck journald never delays an ack.
type JournaldMirror struct {
	q       chan mirrored
	dropped atomic.Uint64
	send    func(msg string, fields map[string]string) error
}

type mirrored struct {
	seq uint64
	e   Event
}

// NewJournaldMirror returns a mirror, or nil when journald's socket is absent.
func NewJournaldMirror() *JournaldMirror {
	if !journal.Enabled() {
		return nil
	}
	return newMirror(func(msg string, fields map[string]string) error {
		return journal.Send(msg, journal.PriInfo, fields)
	})
}

func newMirror(send func(string, map[string]string) error) *JournaldMirror {
	m := &JournaldMirror{q: make(chan mirrored, 4096), send: send}
	go m.loop()
	return m
}

// Push queues one event; it never blocks.
func (m *JournaldMirror) Push(seq uint64, e *Event) {
	select {
	case m.q <- mirrored{seq, *e}:
	default:
		m.dropped.Add(1)
	}
}

// Dropped is how many events were not mirrored because the queue was full.
func (m *JournaldMirror) Dropped() uint64 { return m.dropped.Load() }

func (m *JournaldMirror) loop() {
	for x := range m.q {
		m.send(journaldMessage(x.seq, &x.e), journaldFields(x.seq, &x.e))
	}
}

// journaldFields maps an event to journald fields: AVP_SEQ, AVP_TYPE and one AVP_<FIELD>
// per set field of the schema.
func journaldFields(seq uint64, e *Event) map[string]string {
	f := map[string]string{
		"SYSLOG_IDENTIFIER": "avp-journal",
		"AVP_SEQ":           strconv.FormatUint(seq, 10),
		"AVP_TYPE":          e.Type,
	}
	set := func(k, v string) {
		if v != "" {
			f["AVP_"+k] = v
		}
	}
	set("DECISION", e.Decision)
	set("REASON", e.Reason)
	set("SECRET", e.Secret)
	if e.Binding != nil {
		set("BINDING", strconv.Itoa(*e.Binding))
	}
	if e.UID != nil {
		set("UID", strconv.FormatInt(*e.UID, 10))
	}
	if e.PID != nil {
		set("PID", strconv.FormatInt(*e.PID, 10))
	}
	set("DST", e.Dst)
	set("SNI", e.SNI)
	set("METHOD", e.Method)
	set("PATH", e.Path)
	if e.Status != 0 {
		set("STATUS", strconv.Itoa(e.Status))
	}
	set("CONFIG_SHA256", e.ConfigSHA256)
	set("DETAIL", e.Detail)
	if e.TornBytes != 0 {
		set("TORN_BYTES", strconv.FormatInt(e.TornBytes, 10))
	}
	set("TORN_FILE", e.TornFile)
	return f
}

// journaldMessage is the human line journalctl shows.
func journaldMessage(seq uint64, e *Event) string {
	parts := []string{"audit #" + strconv.FormatUint(seq, 10), e.Type}
	for _, s := range []string{e.Decision, e.Reason, e.Secret, e.Method} {
		if s != "" {
			parts = append(parts, s)
		}
	}
	if e.SNI != "" || e.Path != "" {
		parts = append(parts, e.SNI+e.Path)
	}
	if e.Detail != "" {
		parts = append(parts, e.Detail)
	}
	return strings.Join(parts, " ")
}
