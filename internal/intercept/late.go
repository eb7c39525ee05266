package intercept

import (
	"context"
	"net/http"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/audit"
)

// A request refused because the audit log did not acknowledge its decision has no line of
// its own, and its decision may still have reached the log (the journal wrote it, the ack
// was lost), reading "inject" for a request that got 503 and sent nothing upstream. The
// refusal is therefore queued and recorded once the log answers again, so the trail says
// what happened.

const (
	lateQueue      = 1024 // refusals waiting; more are counted and dropped
	lateMinBackoff = 200 * time.Millisecond
	lateMaxBackoff = 30 * time.Second
	// lateDetail is the refusal's detail: fixed text, nothing from the request.
	lateDetail = "recorded late: the audit log did not acknowledge this request's decision in time; the agent got 503 and nothing was sent upstream"
)

// auditUnavailable queues the refusal of a request whose decision could not be recorded.
func (s *Server) auditUnavailable(base audit.Event) {
	e := base
	e.Decision, e.Reason, e.Status, e.Detail = audit.DecisionRefuse, "audit_unavailable", http.StatusServiceUnavailable, lateDetail
	select {
	case s.late <- e:
	default:
		s.stats.lateDropped.Add(1)
	}
}

// recordLate records the queued refusals in order, retrying with backoff while the audit
// log does not answer, until ctx ends.
func (s *Server) recordLate(ctx context.Context) {
	backoff := lateMinBackoff
	var batch []audit.Event
	for {
		if len(batch) == 0 {
			select {
			case e := <-s.late:
				batch = append(batch, e)
			case <-ctx.Done():
				return
			}
		}
		for more := true; more && len(batch) < 64; {
			select {
			case e := <-s.late:
				batch = append(batch, e)
			default:
				more = false
			}
		}
		// An event the schema refuses would be refused on every try and hold up every
		// refusal queued behind it: it is dropped, with a line in the log.
		valid := batch[:0]
		for _, e := range batch {
			if err := e.Validate(); err != nil {
				s.logf("audit: dropped a late refusal that cannot be recorded: %v", err)
				continue
			}
			valid = append(valid, e)
		}
		if batch = valid; len(batch) == 0 {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := s.auditor.Record(rctx, batch...)
		cancel()
		if err == nil {
			s.logf("audit: recorded %d refusal(s) late that the audit log had not acknowledged in time", len(batch))
			batch, backoff = batch[:0], lateMinBackoff
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		backoff = min(2*backoff, lateMaxBackoff)
	}
}
