package intercept

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestUIDLimit(t *testing.T) {
	l := newUIDLimit(2)
	if !l.acquire(1000) || !l.acquire(1000) {
		t.Fatal("the first two connections of a user were refused")
	}
	if l.acquire(1000) {
		t.Fatal("a third connection was let in with a limit of 2")
	}
	if !l.acquire(1001) || !l.acquire(-1) {
		t.Fatal("another user, or an unknown one, was held to the first user's count")
	}
	l.release(1000)
	if !l.acquire(1000) {
		t.Fatal("a closed connection did not make room")
	}
	l.release(1000)
	l.release(1000)
	if _, ok := l.open[1000]; ok {
		t.Fatalf("a user with no connections left stays in the map: %v", l.open)
	}

	var logs logThrottle
	k := logKey{"uid limit", 1000}
	now := time.Unix(1000, 0)
	if ok, missed := logs.note(k, uidLimitLogRule, now); !ok || missed != 0 {
		t.Fatalf("first refusal: %v %d, want a log line for 1", ok, missed)
	}
	for i := 0; i < 5; i++ {
		if ok, _ := logs.note(k, uidLimitLogRule, now.Add(time.Second)); ok {
			t.Fatal("logged again within 10 s")
		}
	}
	if ok, missed := logs.note(k, uidLimitLogRule, now.Add(11*time.Second)); !ok || missed+1 != 6 {
		t.Fatalf("after 10 s: %v %d, want a log line for the 6 since the last", ok, missed)
	}
}

// TestH2StreamsDrawOnTheUIDLimit: each HTTP/2 stream that holds an upstream connection takes
// a slot of its user's budget, so many streams on few connections cannot multiply a user's
// share of avpd: over the limit a stream gets 503 connection_limit, and a finished stream
// gives its slot back. So does a stream that goes upstream over HTTP/2 (it asks for
// trailers, as gRPC does), which took none.
func TestH2StreamsDrawOnTheUIDLimit(t *testing.T) {
	for _, te := range []bool{false, true} {
		p := newH1Pair(t)
		var hdr []string
		if te {
			p = newH1Pair(t, "h2", "http/1.1")
			hdr = []string{"Te", "trailers"}
		}
		p.srv.uidLimit.mu.Lock()
		p.srv.uidLimit.max = 2
		p.srv.uidLimit.mu.Unlock()
		c := p.h2Client(t)
		var open []*http.Response
		for i := 0; i < 2; i++ {
			req, _ := http.NewRequest("GET", "https://api.openai.com/v1/slow", nil)
			req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
			if te {
				req.Header.Set("Te", "trailers")
			}
			resp, err := c.Do(req)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("te %v: stream %d within the limit: %v %v", te, i, resp, err)
			}
			open = append(open, resp)
		}
		resp, body := h2Get(t, c, "GET", "/v1/models", hdr...)
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "connection_limit") {
			t.Fatalf("te %v: a third stream with a limit of 2: %d %q, want 503 connection_limit", te, resp.StatusCode, body)
		}
		if n := p.srv.Stats().RefusedByReason["connection_limit"]; n != 1 {
			t.Fatalf("te %v: refused for connection_limit: %d, want 1", te, n)
		}
		open[0].Body.Close()
		deadline := time.Now().Add(5 * time.Second)
		for {
			resp, _ := h2Get(t, c, "GET", "/v1/models", hdr...)
			if resp.StatusCode == 200 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("te %v: a closed stream did not give its slot back: %d", te, resp.StatusCode)
			}
			time.Sleep(20 * time.Millisecond)
		}
		open[1].Body.Close()
	}
}
