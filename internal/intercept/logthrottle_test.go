package intercept

import (
	"testing"
	"time"
)

// TestLogThrottle: per reason and user, the first agentLogRule.burst lines of an interval
// are logged and the rest counted; the count comes with the first line of a later interval.
// Another user, or another reason, has lines of its own.
func TestLogThrottle(t *testing.T) {
	var l logThrottle
	r := agentLogRule
	k := logKey{"tls handshake with agent", 1000}
	now := time.Unix(1000, 0)
	logged := 0
	for range 1000 {
		if ok, missed := l.note(k, r, now); ok {
			logged++
		} else if missed != 0 {
			t.Fatalf("a count reported within the interval: %d", missed)
		}
	}
	if logged != r.burst {
		t.Fatalf("%d of 1000 lines logged in one interval, want %d", logged, r.burst)
	}
	if ok, _ := l.note(logKey{"tls handshake with agent", 1001}, r, now); !ok {
		t.Fatal("another user's first line was not logged")
	}
	if ok, _ := l.note(logKey{"passthrough", 1000}, r, now); !ok {
		t.Fatal("another reason's first line was not logged")
	}
	if got := l.suppressed.Load(); got != uint64(1000-r.burst) {
		t.Fatalf("suppressed = %d, want %d", got, 1000-r.burst)
	}
	ok, missed := l.note(k, r, now.Add(r.every))
	if !ok || missed != 1000-r.burst {
		t.Fatalf("first line of the next interval: logged %v, count %d, want true, %d", ok, missed, 1000-r.burst)
	}
	if ok, missed := l.note(k, r, now.Add(2*r.every)); !ok || missed != 0 {
		t.Fatalf("an interval with nothing suppressed: %v %d", ok, missed)
	}
}

// A flood that stops had its count logged only when the same reason logged again, which
// it may never do: the count of an interval that ended is reported by itself.
func TestLogThrottleReportsAnEndedFlood(t *testing.T) {
	var l logThrottle
	r := agentLogRule
	k := logKey{"tls handshake with agent", 1000}
	now := time.Unix(1000, 0)
	for range 50 {
		l.note(k, r, now)
	}
	if got := l.ended(now.Add(r.every / 2)); len(got) != 0 {
		t.Fatalf("reported before the interval ended: %v", got)
	}
	if got := l.ended(now.Add(r.every)); got[k] != 50-r.burst {
		t.Fatalf("ended interval reported %v, want %d for %v", got, 50-r.burst, k)
	}
	if got := l.ended(now.Add(2 * r.every)); len(got) != 0 {
		t.Fatalf("reported twice: %v", got)
	}
	if ok, missed := l.note(k, r, now.Add(2*r.every)); !ok || missed != 0 {
		t.Fatalf("after the report: logged %v, count %d, want true, 0", ok, missed)
	}
}

// The per-user limit's line counts what it did not log in its own next line, by its own
// rule: the report of ended intervals leaves it alone (it had reported it under the agent
// lines' rule, and the limit's next line then undercounted).
func TestLogThrottleEndedLeavesOtherRulesAlone(t *testing.T) {
	var l logThrottle
	k := logKey{"uid limit", 1001}
	now := time.Unix(1000, 0)
	for range 50 {
		l.note(k, uidLimitLogRule, now)
	}
	if got := l.ended(now.Add(time.Hour)); len(got) != 0 {
		t.Fatalf("ended reported the uid limit's lines: %v", got)
	}
	if ok, missed := l.note(k, uidLimitLogRule, now.Add(time.Hour)); !ok || missed != 49 {
		t.Fatalf("the limit's next line: logged %v, count %d, want true, 49", ok, missed)
	}
}
