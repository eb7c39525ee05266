package audit

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// schema is the closed set of event types and, for each, the fields it may carry besides
// ts and type. The journal refuses an event of another type or with another field set, so a
// new kind of record needs a line here, a test update and a README update: nothing free-form
// reaches the log. No field can hold a header value, a query string, a body or a secret.
var schema = map[string][]string{
	TypeDecision:       {"decision", "reason", "secret", "binding", "uid", "pid", "dst", "sni", "method", "path", "status", "detail"},
	TypeProxyStart:     {"config_sha256", "detail"},
	TypeProxyStop:      {"detail"},
	TypeConfigLoaded:   {"config_sha256", "detail"},
	TypeConfigRejected: {"detail"},
	TypeEnroll:         {"uid", "detail"},
	TypeUnenroll:       {"uid", "detail"},
	TypeRulesRestored:  {"detail"},
	TypeJournalStart:   {"detail", "torn_bytes", "torn_file"},
}

// decisions is the closed set of Event.Decision values.
var decisions = []string{
	DecisionInject, DecisionForwardVerbatim, DecisionHostMismatch,
	DecisionBackendError, DecisionPassthrough, DecisionRefuse,
}

// Types returns the event types, sorted.
func Types() []string {
	out := make([]string, 0, len(schema))
	for t := range schema {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

// Fields returns the fields an event of type typ may carry besides ts and type, or nil for
// an unknown type.
func Fields(typ string) []string { return slices.Clone(schema[typ]) }

// Decisions returns the values Event.Decision may take.
func Decisions() []string { return slices.Clone(decisions) }

// maxField bounds every string field: the log holds names, addresses and paths, not data.
const maxField = 4096

// MaxPath is the longest path an event holds whole; CutPath cuts a longer one.
const MaxPath = 2048

// CutPath returns p as an event holds it: whole when it is at most MaxPath bytes, else its
// first MaxPath bytes and a note of the length (a request's path may be 8 KiB, a field 4).
func CutPath(p string) string {
	if len(p) <= MaxPath {
		return p
	}
	return p[:MaxPath] + "...(" + strconv.Itoa(len(p)) + " bytes)"
}

// setFields lists the JSON names of the fields that are set (non-zero), besides ts and type.
func (e *Event) setFields() []string { return e.appendSetFields(nil) }

// appendSetFields appends what setFields returns to out.
func (e *Event) appendSetFields(out []string) []string {
	add := func(set bool, name string) {
		if set {
			out = append(out, name)
		}
	}
	add(e.Decision != "", "decision")
	add(e.Reason != "", "reason")
	add(e.Secret != "", "secret")
	add(e.Binding != nil, "binding")
	add(e.UID != nil, "uid")
	add(e.PID != nil, "pid")
	add(e.Dst != "", "dst")
	add(e.SNI != "", "sni")
	add(e.Method != "", "method")
	add(e.Path != "", "path")
	add(e.Status != 0, "status")
	add(e.ConfigSHA256 != "", "config_sha256")
	add(e.Detail != "", "detail")
	add(e.TornBytes != 0, "torn_bytes")
	add(e.TornFile != "", "torn_file")
	return out
}

// Validate checks e against the closed schema: a known type, only that type's fields, a
// known decision for decision events, and bounded strings.
func (e *Event) Validate() error {
	allowed, ok := schema[e.Type]
	if !ok {
		return fmt.Errorf("unknown event type %q; the types are %s", e.Type, strings.Join(Types(), ", "))
	}
	var set [16]string
	for _, f := range e.appendSetFields(set[:0]) {
		if !slices.Contains(allowed, f) {
			return fmt.Errorf("a %s event cannot carry the field %q; it may carry %s", e.Type, f, strings.Join(allowed, ", "))
		}
	}
	if e.Type == TypeDecision && !slices.Contains(decisions, e.Decision) {
		return fmt.Errorf("unknown decision %q; the decisions are %s", e.Decision, strings.Join(decisions, ", "))
	}
	for _, s := range []string{e.Reason, e.Secret, e.Dst, e.SNI, e.Method, e.Path, e.ConfigSHA256, e.Detail, e.TornFile} {
		if len(s) > maxField {
			return fmt.Errorf("a field of a %s event is %d bytes long; the limit is %d", e.Type, len(s), maxField)
		}
	}
	if e.TornBytes < 0 || e.Status < 0 {
		return fmt.Errorf("a %s event has a negative number", e.Type)
	}
	return nil
}
