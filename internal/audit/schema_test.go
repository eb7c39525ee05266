package audit

import (
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// The closed schema is part of the contract with auditors (README "Audit log"): a change
// here must be a deliberate change of this test and of the README.
func TestSchemaIsClosed(t *testing.T) {
	wantTypes := []string{"config_loaded", "config_rejected", "decision", "enroll", "journal_start", "proxy_start", "proxy_stop", "rules_restored", "unenroll"}
	if got := Types(); !slices.Equal(got, wantTypes) {
		t.Fatalf("types = %v, want %v", got, wantTypes)
	}
	wantFields := map[string][]string{
		"decision":        {"decision", "reason", "secret", "binding", "uid", "pid", "dst", "sni", "method", "path", "status", "detail"},
		"proxy_start":     {"config_sha256", "detail"},
		"proxy_stop":      {"detail"},
		"config_loaded":   {"config_sha256", "detail"},
		"config_rejected": {"detail"},
		"enroll":          {"uid", "detail"},
		"unenroll":        {"uid", "detail"},
		"rules_restored":  {"detail"},
		"journal_start":   {"detail", "torn_bytes", "torn_file"},
	}
	for typ, want := range wantFields {
		if got := Fields(typ); !slices.Equal(got, want) {
			t.Errorf("fields of %s = %v, want %v", typ, got, want)
		}
	}
	if Fields("something_else") != nil {
		t.Error("an unknown type has fields")
	}
	wantDecisions := []string{"inject", "forward_verbatim", "host_mismatch", "backend_error", "passthrough", "refuse"}
	if got := Decisions(); !slices.Equal(got, wantDecisions) {
		t.Errorf("decisions = %v, want %v", got, wantDecisions)
	}

	// The Event struct has exactly ts, type and the union of the per-type fields: no
	// field exists that no type may carry, and no free-form map.
	union := map[string]bool{"ts": true, "type": true}
	for _, fs := range wantFields {
		for _, f := range fs {
			union[f] = true
		}
	}
	rt := reflect.TypeOf(Event{})
	var jsonNames []string
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" || name == "-" {
			t.Errorf("field %s has no JSON name", f.Name)
			continue
		}
		if k := f.Type.Kind(); k == reflect.Map || k == reflect.Interface || k == reflect.Slice {
			t.Errorf("field %s is a %s: the schema must stay closed", f.Name, k)
		}
		for _, banned := range []string{"header", "query", "body", "value", "token", "cookie"} {
			if strings.Contains(name, banned) {
				t.Errorf("field %q looks like it could hold request data", name)
			}
		}
		jsonNames = append(jsonNames, name)
		if !union[name] {
			t.Errorf("Event field %q is not allowed for any type", name)
		}
		// setFields must see every field except ts and type.
		if name == "ts" || name == "type" {
			continue
		}
		var e Event
		v := reflect.ValueOf(&e).Elem().Field(i)
		switch v.Kind() {
		case reflect.String:
			v.SetString("x")
		case reflect.Int, reflect.Int64:
			v.SetInt(1)
		case reflect.Pointer:
			p := reflect.New(v.Type().Elem())
			v.Set(p)
		default:
			t.Fatalf("field %s: kind %s not handled by this test", f.Name, v.Kind())
		}
		if got := e.setFields(); !slices.Equal(got, []string{name}) {
			t.Errorf("setting %s makes setFields report %v", f.Name, got)
		}
	}
	sort.Strings(jsonNames)
	var unionList []string
	for n := range union {
		unionList = append(unionList, n)
	}
	sort.Strings(unionList)
	if !slices.Equal(jsonNames, unionList) {
		t.Errorf("Event JSON fields %v, want %v", jsonNames, unionList)
	}
}

func TestValidate(t *testing.T) {
	good := []Event{
		{Type: TypeDecision, Decision: DecisionInject, Secret: "A", Binding: Int(0), UID: Int64(4242), Dst: "1.2.3.4:443", SNI: "a.test", Method: "GET", Path: "/v1"},
		{Type: TypeProxyStart, ConfigSHA256: "ab", Detail: "avpd started"},
		{Type: TypeEnroll, UID: Int64(1)},
		{Type: TypeJournalStart, Detail: "x", TornBytes: 3, TornFile: "/f"},
		{Type: TypeProxyStop, TS: time.Now()},
	}
	for _, e := range good {
		if err := e.Validate(); err != nil {
			t.Errorf("%+v: %v", e, err)
		}
	}
	bad := []struct {
		e    Event
		want string
	}{
		{Event{Type: "free_form"}, "unknown event type"},
		{Event{}, "unknown event type"},
		{Event{Type: TypeDecision, Decision: "maybe"}, "unknown decision"},
		{Event{Type: TypeDecision}, "unknown decision"},
		{Event{Type: TypeProxyStop, Secret: "A"}, `cannot carry the field "secret"`},
		{Event{Type: TypeEnroll, UID: Int64(1), Path: "/x"}, `cannot carry the field "path"`},
		{Event{Type: TypeDecision, Decision: DecisionInject, TornFile: "x"}, `cannot carry the field "torn_file"`},
		{Event{Type: TypeDecision, Decision: DecisionInject, Path: strings.Repeat("a", 5000)}, "the limit is"},
	}
	for _, tc := range bad {
		err := tc.e.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.e, err, tc.want)
		}
	}
}
