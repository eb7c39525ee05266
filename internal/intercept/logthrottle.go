package intercept

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Lines an agent can cause once per connection or request (a handshake it abandons, a
// destination it picks that does not answer) would otherwise let one agent write thousands
// of lines a second: under systemd, journald's per-unit rate limit then drops all of avpd's
// lines for the rest of its interval, audit failures included. So each such line goes
// through a logThrottle: per reason and user, the first few of an interval are logged, the
// rest counted, and the count is logged (one line) with the first one of a later interval.
// The per-user limit's line and the unknown-owner line use it too, with one line per
// interval.

// logKey is what lines are counted by: a fixed reason (never text from the connection) and
// the user, -1 when it is not known.
type logKey struct {
	reason string
	uid    int64
}

// logRule says how many lines of a reason are logged per interval.
type logRule struct {
	burst int
	every time.Duration
}

// agentLogRule is the rule of the lines an agent can cause once per connection or request.
var agentLogRule = logRule{burst: 5, every: 10 * time.Second}

type logWindow struct {
	end    time.Time // the interval ends
	logged int       // lines logged in the interval
	missed int       // lines not logged since the last report
	// agent: the key's lines go through logAgent, whose count ended reports; others (the
	// per-user limit, the unknown owner) count in their own next line.
	agent bool
}

// maxLogKeys bounds the map; past it, keys whose interval ended are dropped.
const maxLogKeys = 1024

type logThrottle struct {
	mu         sync.Mutex
	m          map[logKey]*logWindow
	suppressed atomic.Uint64 // every line not logged, for status
}

// note counts one line of key at now. It reports whether to log the line, and how many
// lines of key were not logged since the last report (to be logged first when not 0).
func (t *logThrottle) note(k logKey, r logRule, now time.Time) (log bool, missed int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[logKey]*logWindow{}
	}
	w := t.m[k]
	if w == nil {
		if len(t.m) >= maxLogKeys {
			for k, w := range t.m {
				if !now.Before(w.end) {
					delete(t.m, k)
				}
			}
		}
		w = &logWindow{agent: r == agentLogRule}
		t.m[k] = w
	}
	if !now.Before(w.end) {
		missed, w.missed, w.logged, w.end = w.missed, 0, 0, now.Add(r.every)
	}
	if w.logged < r.burst {
		w.logged++
		return true, missed
	}
	w.missed++
	t.suppressed.Add(1)
	return false, missed
}

// ended returns, and forgets, the keys whose interval ended at now with lines not logged:
// a flood that stopped would otherwise never have its count logged.
func (t *logThrottle) ended(now time.Time) map[logKey]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out map[logKey]int
	for k, w := range t.m {
		if !w.agent || now.Before(w.end) {
			continue
		}
		if w.missed > 0 {
			if out == nil {
				out = map[logKey]int{}
			}
			out[k] = w.missed
		}
		delete(t.m, k)
	}
	return out
}

// reportSuppressed logs, every interval until ctx ends, how many lines of each reason and
// user were not logged in an interval that has ended.
func (s *Server) reportSuppressed(ctx context.Context) {
	r := agentLogRule
	tick := time.NewTicker(r.every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			for k, missed := range s.logs.ended(now) {
				s.logf("%s (%s): %d more such line(s) not logged; at most %d are logged per user every %v", k.reason, uidText(k.uid), missed, r.burst, r.every)
			}
		}
	}
}

// logAgent logs a line an agent can cause once per connection or request (reason names
// it, in fixed words), at most agentLogRule.burst of them per reason and user every
// agentLogRule.every, and then how many were not logged.
func (s *Server) logAgent(reason string, uid int64, format string, args ...any) {
	r := agentLogRule
	log, missed := s.logs.note(logKey{reason, uid}, r, time.Now())
	if missed > 0 {
		s.logf("%s (%s): %d more such line(s) not logged; at most %d are logged per user every %v", reason, uidText(uid), missed, r.burst, r.every)
	}
	if log {
		s.logf(format, args...)
	}
}

// agentLogf is logAgent for a logger that knows no user (net/http's error log).
func (s *Server) agentLogf(reason string) Logf {
	return func(format string, args ...any) { s.logAgent(reason, -1, format, args...) }
}

func uidText(uid int64) string {
	if uid < 0 {
		return "uid unknown"
	}
	return fmt.Sprintf("uid %d", uid)
}
