package e2e

import (
	"strconv"
	"strings"
	"testing"
)

// TestProxyPathShapes pins what the performance work (issue 7) changed on the request path:
// requests go upstream over HTTP/1.1 whatever the agent spoke, except an HTTP/2 agent's
// gRPC request or one that asks for trailers, and a small injected response keeps an exact
// Content-Length after scrubbing.
func TestProxyPathShapes(t *testing.T) {
	e := newEnv(t)
	e.startAvpd()
	e.avpctl("enroll-uid", strconv.Itoa(agentUID))
	bearer := "Authorization: Bearer " + phOpenAI

	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--http1.1"}, "HTTP/1.1"},
		{[]string{"--http2"}, "HTTP/1.1"},
		{[]string{"--http2", "-H", "Content-Type: application/grpc"}, "HTTP/2.0"},
		{[]string{"--http2", "-H", "TE: trailers"}, "HTTP/2.0"},
		{[]string{"--http1.1", "-H", "Content-Type: application/grpc"}, "HTTP/1.1"},
	} {
		args := append([]string{"-sS", "--max-time", "20"}, tc.flags...)
		args = append(args, "-H", bearer, "https://"+hostOpenAI+"/v1/models")
		out, err := e.agent(agentUID, "curl", args...)
		if err != nil || !strings.Contains(out, `"ok":true`) {
			t.Fatalf("curl %v: %q %v", tc.flags, out, err)
		}
		got := e.upstream.last(t)
		if got.Proto != tc.want || got.Header.Get("Authorization") != "Bearer "+realOpenAI {
			t.Fatalf("agent %v: upstream got %s with Authorization %q, want %s with the real key", tc.flags, got.Proto, got.Header.Get("Authorization"), tc.want)
		}
	}

	// The echo endpoint reflects the real key; the agent gets the placeholder back, with a
	// Content-Length that matches the scrubbed body.
	out, err := e.agent(agentUID, "curl", "-sS", "--max-time", "20", "--http1.1", "-D", "-", "-H", bearer, "https://"+hostOpenAI+"/v1/echo")
	if err != nil {
		t.Fatalf("curl: %v", err)
	}
	head, body, ok := strings.Cut(out, "\r\n\r\n")
	if !ok || strings.Contains(out, realOpenAI) || !strings.Contains(body, phOpenAI) {
		t.Fatalf("echo response not scrubbed: %q", out)
	}
	var cl string
	for _, l := range strings.Split(head, "\r\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, "Content-Length") {
			cl = strings.TrimSpace(v)
		}
	}
	if cl != strconv.Itoa(len(body)) {
		t.Fatalf("Content-Length %q, body %d bytes:\n%s", cl, len(body), head)
	}
}
