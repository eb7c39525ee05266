package intercept

import (
	"sync"
	"time"
)

// uidLimit bounds the connections each user has open through avpd at a time. Every
// redirected connection costs avpd memory and descriptors (a terminated one about 36 KB
// when idle, more with its upstream), all from one budget that every agent shares: without
// a bound, one agent opening connections in a loop would take avpd, and every other
// agent's requests, down with it. A connection over the limit is reset at once. An HTTP/2
// stream that holds an upstream connection of its own takes a slot too (streamSlot).
type uidLimit struct {
	max int

	mu   sync.Mutex
	open map[int64]int // by UID; -1 for connections whose UID is unknown
}

func newUIDLimit(max int) *uidLimit {
	return &uidLimit{max: max, open: map[int64]int{}}
}

// acquire counts a new connection of uid, or reports that uid is at its limit.
func (l *uidLimit) acquire(uid int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[uid] >= l.max {
		return false
	}
	l.open[uid]++
	return true
}

// release counts a connection of uid as closed.
func (l *uidLimit) release(uid int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := l.open[uid] - 1; n > 0 {
		l.open[uid] = n
	} else {
		delete(l.open, uid)
	}
}

// uidLimitLogRule: a flood of connections over the limit does not become a flood of log
// lines; one line per user every 10 s, with the count since the last.
var uidLimitLogRule = logRule{burst: 1, every: 10 * time.Second}

// logUIDLimit logs, at most every 10 s per user, a connection or stream refused at uid's
// limit.
func (s *Server) logUIDLimit(uid int64) {
	if log, missed := s.logs.note(logKey{"uid limit", uid}, uidLimitLogRule, time.Now()); log {
		s.logf("uid %d is at its limit of %d open connections (proxy.max_connections_per_uid); refused %d new connection(s) or stream(s) since the last message", uid, s.uidLimit.max, missed+1)
	}
}

// streamSlot takes a slot of uid's budget for an HTTP/2 stream's upstream connection.
func (s *Server) streamSlot(uid int64) (release func(), over bool) {
	if !s.uidLimit.acquire(uid) {
		s.countRefused("connection_limit")
		s.logUIDLimit(uid)
		return nil, true
	}
	return sync.OnceFunc(func() { s.uidLimit.release(uid) }), false
}
