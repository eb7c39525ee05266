package intercept

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// h2Get sends one request as an HTTP/2 agent and returns the response with its body read.
func h2Get(t *testing.T, c *http.Client, method, path string, hdr ...string) (*http.Response, string) {
	t.Helper()
	var body io.Reader
	if method == "POST" {
		body = strings.NewReader("{}")
	}
	req, _ := http.NewRequest(method, "https://api.openai.com"+path, body)
	req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, path, err)
	}
	if resp.ProtoMajor != 2 {
		t.Fatalf("%s %s: the agent spoke %s, want HTTP/2", method, path, resp.Proto)
	}
	return resp, string(b)
}

// TestH2AgentOverH1Pool: an HTTP/2 agent's requests go upstream over the pooled HTTP/1.1
// connections, one after another on the same one, injected, with an echo scrubbed, and
// with small and streamed responses alike.
func TestH2AgentOverH1Pool(t *testing.T) {
	p := newH1Pair(t, "h2", "http/1.1")
	c := p.h2Client(t)
	for i := 0; i < 3; i++ {
		for _, path := range []string{"/v1/models", "/v1/big", "/v1/trailer-echo"} {
			resp, body := h2Get(t, c, "GET", path)
			if resp.StatusCode != 200 || resp.Header.Get("X-Upstream-Proto") != "HTTP/1.1" {
				t.Fatalf("GET %s: %d over %q upstream, want 200 over HTTP/1.1", path, resp.StatusCode, resp.Header.Get("X-Upstream-Proto"))
			}
			if strings.Contains(body, h1BenchReal) || strings.Contains(resp.Trailer.Get("X-Echo"), h1BenchReal) {
				t.Fatalf("GET %s: the real secret reached the agent", path)
			}
		}
	}
	for i := 0; i < 2; i++ {
		// A bodiless answer leaves the connection for the next request too. (HEAD is not
		// among the binding's methods: the upstream answers the placeholder with 401.)
		if resp, body := h2Get(t, c, "HEAD", "/v1/models"); resp.StatusCode != http.StatusUnauthorized || body != "" {
			t.Fatalf("HEAD: %d %q", resp.StatusCode, body)
		}
	}
	// The nine injected requests on one, the two verbatim ones on another (one scope each).
	if n := p.upConns.Load(); n != 2 {
		t.Fatalf("the upstream saw %d connections for 11 requests in a row, want 2", n)
	}
	if resp, _ := h2Get(t, c, "GET", "/v2/models"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("outside the binding: %d, want the upstream's 401 for the placeholder", resp.StatusCode)
	}
}

// TestH2AgentUpstreamProtocols: gRPC, and any request that asks for trailers, keeps HTTP/2
// to the upstream (its status travels in trailers); an upstream that refuses HTTP/1.1 is
// reached over HTTP/2 for every request.
func TestH2AgentUpstreamProtocols(t *testing.T) {
	p := newH1Pair(t, "h2", "http/1.1")
	c := p.h2Client(t)
	for _, tc := range []struct {
		hdr  []string
		want string
	}{
		{nil, "HTTP/1.1"},
		{[]string{"Content-Type", "application/grpc+proto"}, "HTTP/2.0"},
		{[]string{"Te", "trailers"}, "HTTP/2.0"},
	} {
		resp, _ := h2Get(t, c, "GET", "/v1/models", tc.hdr...)
		if resp.StatusCode != 200 || resp.Header.Get("X-Upstream-Proto") != tc.want {
			t.Errorf("%v: %d over %q upstream, want 200 over %s", tc.hdr, resp.StatusCode, resp.Header.Get("X-Upstream-Proto"), tc.want)
		}
	}

	only := newH1Pair(t, "h2-strict")
	c = only.h2Client(t)
	for i := 0; i < 3; i++ {
		resp, _ := h2Get(t, c, "GET", "/v1/models")
		if resp.StatusCode != 200 || resp.Header.Get("X-Upstream-Proto") != "HTTP/2.0" {
			t.Fatalf("HTTP/2-only upstream, request %d: %d over %q", i, resp.StatusCode, resp.Header.Get("X-Upstream-Proto"))
		}
	}
	if logs := only.logs.String(); logs != "" {
		t.Fatalf("falling back to HTTP/2 logged %q", logs)
	}
}

// TestH2AgentRetries: a GET whose pooled connection the server closed silently is sent
// again on a new one; a POST whose connection closes without an answer is not (the
// upstream may have acted on it): the agent gets 502 and the upstream saw it once.
func TestH2AgentRetries(t *testing.T) {
	p, c := h2PairWithDroppedConn(t)
	if resp, body := h2Get(t, c, "GET", "/v1/models"); resp.StatusCode != 200 {
		t.Fatalf("GET after the server closed the pooled connection: %d %q, want 200", resp.StatusCode, body)
	}
	if resp, _ := h2Get(t, c, "POST", "/v1/charge"); resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("POST whose connection closed unanswered: %d, want 502", resp.StatusCode)
	}
	if n := p.charges.Load(); n != 1 {
		t.Fatalf("the upstream received the POST %d times, want once", n)
	}
	if resp, _ := h2Get(t, c, "POST", "/v1/models"); resp.StatusCode != 200 {
		t.Fatalf("POST after the failed one: %d, want 200", resp.StatusCode)
	}
}

// TestH2AgentCancelEndsUpstream: an agent that gives up on a streamed response (resets its
// stream) ends the upstream request too: its connection is closed, not left waiting and
// not pooled; the next request works.
func TestH2AgentCancelEndsUpstream(t *testing.T) {
	p := newH1Pair(t)
	c := p.h2Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://api.openai.com/v1/slow", nil)
	req.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatalf("first bytes of the stream: %v", err)
	}
	cancel()
	resp.Body.Close()
	select {
	case <-p.slowDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request was still open 5 s after the agent reset its stream")
	}
	if resp, _ := h2Get(t, c, "GET", "/v1/models"); resp.StatusCode != 200 {
		t.Fatalf("next request: %d", resp.StatusCode)
	}
	if n := p.upConns.Load(); n != 2 {
		t.Fatalf("the upstream saw %d connections, want 2 (the cut one is not reused)", n)
	}
}

// TestH2AgentRetryAfterReload: a GET whose pooled connection turns out closed is retried
// only under the policy that decided it; a reload in between makes it a 502, never an
// injection the new policy did not decide.
func TestH2AgentRetryAfterReload(t *testing.T) {
	p, c := h2PairWithDroppedConn(t)
	reloads := reloadBeforeRetry(t, p)
	n := p.upConns.Load()
	if resp, body := h2Get(t, c, "GET", "/v1/models"); resp.StatusCode != http.StatusBadGateway || *reloads != 1 {
		t.Fatalf("retry after a reload: %d %q (%d regate calls), want 502 after one", resp.StatusCode, body, *reloads)
	}
	if got := p.upConns.Load(); got != n {
		t.Fatalf("the retry reached the upstream (%d new connections) under a policy that did not decide it", got-n)
	}
}

// reloadBeforeRetry makes every retry of p's server reload the policy (the same bindings,
// a new policy) just before it takes the reload gate again; the count is of retries.
func reloadBeforeRetry(t *testing.T, p *h1Pair) *int {
	reloads := new(int)
	p.srv.upstream.regate = func(inj *injected) (func(), bool) {
		*reloads++
		cfg, err := config.Parse("bindings.yaml", []byte(h1BenchConfig))
		if err != nil {
			t.Error(err)
			return nil, false
		}
		p.srv.SetPolicy(inject.NewPolicy(cfg))
		return p.srv.regate(inj)
	}
	return reloads
}

// h2PairWithDroppedConn returns a pair and its HTTP/2 agent whose one pooled upstream
// connection the server has closed without saying so (after a complete answer).
func h2PairWithDroppedConn(t *testing.T) (*h1Pair, *http.Client) {
	t.Helper()
	p := newH1Pair(t)
	c := p.h2Client(t)
	if resp, _ := h2Get(t, c, "GET", "/v1/drop"); resp.StatusCode != 200 {
		t.Fatalf("GET /v1/drop: %d", resp.StatusCode)
	}
	time.Sleep(50 * time.Millisecond) // the server's FIN arrives
	return p, c
}

// A connection's scope tells users apart, and the secrets a request injects.
func TestScopeOf(t *testing.T) {
	a, b := &config.Secret{Name: "A"}, &config.Secret{Name: "B"}
	one := &injected{secrets: []inject.Injection{{Secret: a}}}
	two := &injected{secrets: []inject.Injection{{Secret: a}, {Secret: b}}}
	other := &injected{secrets: []inject.Injection{{Secret: b}}}
	u1, u2 := inject.Facts{UID: 1000}, inject.Facts{UID: 1001}
	scopes := []connScope{scopeOf(u1, nil), scopeOf(u2, nil), scopeOf(u1, one), scopeOf(u2, one), scopeOf(u1, two), scopeOf(u1, other)}
	for i := range scopes {
		for j := range i {
			if scopes[i] == scopes[j] {
				t.Errorf("scopes %d and %d are the same: %+v", i, j, scopes[i])
			}
		}
	}
	if scopeOf(u1, one) != scopeOf(u1, &injected{secrets: []inject.Injection{{Secret: a}}}) {
		t.Error("the same user and secret: two scopes")
	}
}
