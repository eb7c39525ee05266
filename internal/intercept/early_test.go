package intercept

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// earlyBody is larger than the socket buffers between avpd and the upstream, so the
// upstream's early answer comes while avpd is still writing the body.
const earlyBody = 64 << 20

// TestEarlyResponseToLargeUpload: an upstream that answers before it has read an upload
// (413 here; a 401 for a bad key is the same) and stops reading gets that answer to the
// agent, not a 502 for the write that could not finish, over HTTP/1.1 (which then closes
// the connection: the rest of the body was never read) and HTTP/2. Requests after it work.
func TestEarlyResponseToLargeUpload(t *testing.T) {
	p := newH1Pair(t)
	big := bytes.Repeat([]byte("x"), earlyBody)
	resp, body := p.upload(t, "/v1/too-large", big)
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !resp.Close {
		t.Fatalf("HTTP/1.1: %d %q (close %v), want the upstream's 413 and the connection closed", resp.StatusCode, body, resp.Close)
	}

	c := p.h2Client(t)
	for i := 0; i < 2; i++ {
		r, _ := http.NewRequest("POST", "https://api.openai.com/v1/too-large", bytes.NewReader(big))
		r.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		resp, err := c.Do(r)
		if err != nil {
			t.Fatalf("HTTP/2 upload %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("HTTP/2 upload %d: %d %q, want the upstream's 413", i, resp.StatusCode, body)
		}
		if resp, _ := h2Get(t, c, "GET", "/v1/models"); resp.StatusCode != 200 {
			t.Fatalf("HTTP/2 request after upload %d: %d", i, resp.StatusCode)
		}
	}
	if logs := p.logs.String(); strings.Contains(logs, "upstream") {
		t.Fatalf("an answer the upstream gave was logged as an upstream failure: %q", logs)
	}
}

// TestStreamedUploadKeepsConnections: an upload the upstream reads to its end goes through
// the same concurrent write without ending either connection: two in a row on one agent
// connection reach the upstream whole, over one upstream connection.
func TestStreamedUploadKeepsConnections(t *testing.T) {
	p := newH1Pair(t)
	big := bytes.Repeat([]byte("y"), 3<<20)
	for i := 0; i < 2; i++ {
		resp, body := p.upload(t, "/v1/sink", big)
		if resp.StatusCode != 200 || resp.Close || body != fmt.Sprintf(`{"ok":true,"bytes":%d}`, len(big)) {
			t.Fatalf("upload %d: %d %q (close %v), want 200 with all %d bytes, connection kept", i, resp.StatusCode, body, resp.Close, len(big))
		}
	}
	if n := p.upConns.Load(); n != 1 {
		t.Fatalf("the upstream saw %d connections for two uploads in a row, want 1", n)
	}
}

// upload POSTs body to path on the HTTP/1.1 agent connection, writing it while the answer
// is read (the answer may come first), and returns the answer with its body read.
func (p *h1Pair) upload(t *testing.T, path string, body []byte) (*http.Response, string) {
	t.Helper()
	req := strings.Replace(h1BenchRequest, "GET /v1/models", "POST "+path, 1)
	req = strings.TrimSuffix(req, "\r\n") + fmt.Sprintf("Content-Length: %d\r\n\r\n", len(body))
	go func() {
		io.WriteString(p.agent, req)
		p.agent.Write(body)
	}()
	p.agent.SetReadDeadline(time.Now().Add(20 * time.Second))
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// TestUploadCutByUpstream: an upstream that drops the connection in the middle of a large
// upload without answering gets the agent a 502 it can read, though it is still sending.
// (The lingering close before it is not what this shows: on loopback the answer survives
// a reset too.)
func TestUploadCutByUpstream(t *testing.T) {
	p := newH1Pair(t)
	resp, body := p.upload(t, "/v1/hangup", bytes.Repeat([]byte("z"), earlyBody))
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(body, "upstream_unreachable") {
		t.Fatalf("%d %q, want 502 upstream_unreachable", resp.StatusCode, body)
	}
}
