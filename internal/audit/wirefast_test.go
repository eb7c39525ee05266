package audit

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// wireEvents are events of every shape avpd sends, for the fast path's tests and seeds.
func wireEvents() []Event {
	full := decisionEvent(7)
	full.Reason, full.PID, full.Status, full.Detail = "binding_matched", Int64(99), 503, "a fixed sentence"
	return []Event{
		decisionEvent(1),
		full,
		{Type: TypeDecision, Decision: DecisionPassthrough, UID: Int64(0), Dst: "[::1]:443", SNI: "ünïcode.example"},
		{Type: TypeDecision, Decision: DecisionForwardVerbatim, Path: "/a&b<c>", Method: "GET"}, // escaped: not the fast path
		{Type: TypeProxyStart, ConfigSHA256: strings.Repeat("ab", 32), Detail: "avpd started"},
		{Type: TypeJournalStart, Detail: "torn", TornBytes: 12, TornFile: "/var/log/x.torn"},
		{Type: TypeEnroll, UID: Int64(4242), Detail: "enrolled by uid 0"},
	}
}

// wireMessage is the message JournalClient writes for e.
func wireMessage(t testing.TB, id uint64, e Event) []byte {
	t.Helper()
	w := waiterPool.New().(*waiter)
	if err := w.appendRequest(id, &e); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(w.buf.Bytes())
}

// jsonDecode is decodeRequest's encoding/json path.
func jsonDecode(msg []byte) (uint64, Event, error) {
	var ev Event
	req := request{Event: &ev}
	dec := json.NewDecoder(bytes.NewReader(msg))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	return req.ID, ev, err
}

// What the client writes takes the fast path, unless a string needed an escape, and gives
// what encoding/json gives.
func TestDecodeFastTakesTheClientsMessages(t *testing.T) {
	for i, e := range wireEvents() {
		msg := wireMessage(t, uint64(100+i), e)
		var it item
		fast := decodeFast(msg, &it)
		if want := !bytes.Contains(msg, []byte(`\u`)); fast != want {
			t.Fatalf("%s: fast path %v, want %v", msg, fast, want)
		}
		got, reason := decodeRequest(msg)
		if reason != "" || got.id != uint64(100+i) || !reflect.DeepEqual(got.ev, e) {
			t.Fatalf("%s: decoded %d %+v (%q), want %+v", msg, got.id, got.ev, reason, e)
		}
	}
}

// Whatever the fast path takes, encoding/json takes too, with the same id and event.
func FuzzDecodeFast(f *testing.F) {
	for i, e := range wireEvents() {
		f.Add(wireMessage(f, uint64(i+1), e))
	}
	f.Add([]byte(`{"id":1,"event":{"ts":"0001-01-01T00:00:00Z","type":"decision","uid":01}}`))
	f.Add([]byte("{\"id\":1,\"event\":{\"ts\":\"0001-01-01T00:00:00Z\",\"type\":\"decision\",\"path\":\"\xff\"}}")) // invalid UTF-8
	f.Add([]byte(`{"id":1,"event":{"ts":"0001-01-01T00:00:00Z","type":"decision","status":99999999999999999999}}`))
	f.Fuzz(func(t *testing.T, msg []byte) {
		var it item
		if !decodeFast(msg, &it) {
			return
		}
		id, ev, err := jsonDecode(msg)
		if err != nil {
			t.Fatalf("fast path took %q, encoding/json refuses it: %v", msg, err)
		}
		if id != it.id || !reflect.DeepEqual(ev, it.ev) {
			t.Fatalf("%q: fast path %d %+v, encoding/json %d %+v", msg, it.id, it.ev, id, ev)
		}
	})
}

func BenchmarkDecodeRequest(b *testing.B) {
	msg := wireMessage(b, 12345, decisionEvent(3))
	for _, fast := range []bool{false, true} {
		name := "json"
		if fast {
			name = "fast"
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if fast {
					if _, reason := decodeRequest(msg); reason != "" {
						b.Fatal(reason)
					}
				} else if _, _, err := jsonDecode(msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
