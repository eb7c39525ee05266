package audit

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// FuzzAppendEvent holds the hand-written encoders to encoding/json's bytes: an event alone,
// a journal line (whose MAC covers them), and the client's message.
func FuzzAppendEvent(f *testing.F) {
	f.Add("decision", "inject", "<a&b>\u2028\x01\"\\", "127.0.0.1:443", "/v1/x\xff", int64(7), int64(-1), int64(0), int64(1700000000123456789), "ab12")
	f.Add("", "", "", "", "", int64(0), int64(0), int64(0), int64(0), "")
	f.Fuzz(func(t *testing.T, typ, decision, reason, dst, path string, uid, pid, torn, ns int64, prev string) {
		e := Event{
			TS: time.Unix(0, ns).UTC(), Type: typ, Decision: decision, Reason: reason, Secret: strings.ToUpper(reason),
			Dst: dst, SNI: strings.ToLower(dst), Method: decision, Path: path, Status: int(uid % 1000),
			ConfigSHA256: prev, Detail: reason + path, TornBytes: torn, TornFile: path,
		}
		if uid != 0 {
			e.UID = &uid
			b := int(uid % 50)
			e.Binding = &b
		}
		if pid != 0 {
			e.PID = &pid
		}
		want, err := json.Marshal(&e)
		if err != nil {
			return
		}
		got, ok := appendEventFields([]byte("{"), &e, true)
		if !ok {
			t.Fatalf("%+v: not encoded", e)
		}
		if got = append(got, '}'); !bytes.Equal(got, want) {
			t.Fatalf("event:\n got %s\nwant %s", got, want)
		}

		l := Line{V: LineVersion, Seq: uint64(torn), TS: time.Unix(0, ns/3).UTC(), Prev: prev, Event: e}
		want, err = json.Marshal(&l)
		if err != nil {
			return
		}
		if got, ok = appendLineJSON(nil, &l); !ok || !bytes.Equal(got, want) {
			t.Fatalf("line (%v):\n got %s\nwant %s", ok, got, want)
		}

		w := waiterPool.Get().(*waiter)
		defer (&JournalClient{}).putWaiter(w)
		if err := w.appendRequest(42, &e); err != nil {
			t.Fatal(err)
		}
		var enc bytes.Buffer
		json.NewEncoder(&enc).Encode(&e)
		if want := `{"id":42,"event":` + strings.TrimSuffix(enc.String(), "\n") + `}`; w.buf.String() != want {
			t.Fatalf("message:\n got %s\nwant %s", w.buf.String(), want)
		}
	})
}

// A timestamp the encoder does not copy goes to encoding/json.
func TestAppendEventFallsBack(t *testing.T) {
	for _, ts := range []time.Time{time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("X", 3600)), time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)} {
		if _, ok := appendEventFields(nil, &Event{TS: ts, Type: "x"}, true); ok {
			t.Errorf("%v: encoded by hand", ts)
		}
	}
	if got, _ := appendEventFields(nil, &Event{TS: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), Type: "x"}, false); string(got) != `"type":"x"` {
		t.Errorf("without ts: %s", got)
	}
}
