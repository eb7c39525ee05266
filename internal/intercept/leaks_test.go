package intercept

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

const rawReal = "sk-live-51HxQ2eZvKYlo2C0123456789"

// TestSwitchHeadersAreScrubbed: a WebSocket server that reflects a request header in its 101
// (an echo server, or a token carried in Sec-WebSocket-Protocol and echoed as the chosen
// subprotocol) hands the agent the placeholder, not the real value.
func TestSwitchHeadersAreScrubbed(t *testing.T) {
	e := newRawEnv(t, rawReal, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		a := req.Header.Get("Authorization")
		io.WriteString(c, "HTTP/1.1 101 Switching "+a+"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
			"X-Echo-Authorization: "+a+"\r\nSec-WebSocket-Protocol: "+a+"\r\n"+a[7:]+": 1\r\n\r\n")
		time.Sleep(200 * time.Millisecond)
	}))
	agent, br := e.h1Agent(t)
	io.WriteString(agent, "GET /ws HTTP/1.1\r\nHost: "+rawHost+"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"+rawAuthLine+"\r\n")
	agent.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, _ := io.ReadAll(br)
	if !strings.HasPrefix(string(got), "HTTP/1.1 101 ") || strings.Contains(strings.ToLower(string(got)), strings.ToLower(rawReal)) {
		t.Fatalf("want a 101 without the real value, got %q", got)
	}
	if !strings.Contains(string(got), "X-Echo-Authorization: Bearer "+rawPlaceholder) {
		t.Fatalf("want the echo scrubbed to the placeholder, got %q", got)
	}
}

func gzipped(b []byte) []byte {
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	zw.Write(b)
	zw.Close()
	return out.Bytes()
}

// TestContentCodingsOnSeveralLines: codings listed on two Content-Encoding lines are one list
// (RFC 9110, 5.3). Reading only the first line decoded one gzip layer of two, and the agent
// unzipped the echo the scrubber never saw. Each line, and identity among them, counts.
func TestContentCodingsOnSeveralLines(t *testing.T) {
	for _, tc := range []struct {
		lines  []string
		layers int
		want   int
	}{
		{[]string{"gzip", "gzip"}, 2, http.StatusBadGateway},
		{[]string{"identity", "gzip"}, 1, http.StatusOK},
		{[]string{"gzip", "identity"}, 1, http.StatusOK},
		{[]string{"gzip, identity", "br"}, 1, http.StatusBadGateway},
		{[]string{"", "gzip"}, 1, http.StatusOK},
	} {
		e := newRawEnv(t, rawReal, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
			for {
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				body := []byte(`{"headers":{"Authorization":"` + req.Header.Get("Authorization") + `"}}`)
				for range tc.layers {
					body = gzipped(body)
				}
				var h strings.Builder
				for _, l := range tc.lines {
					h.WriteString("Content-Encoding: " + l + "\r\n")
				}
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n", h.String(), len(body))
				c.Write(body)
			}
		}))
		agent, br := e.h1Agent(t)
		io.WriteString(agent, "GET /gzip HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		// Whatever the agent got, it may unzip it itself.
		plain := body
		for {
			zr, err := gzip.NewReader(bytes.NewReader(plain))
			if err != nil {
				break
			}
			if plain, err = io.ReadAll(zr); err != nil {
				break
			}
		}
		if bytes.Contains(plain, []byte(rawReal)) || resp.StatusCode != tc.want {
			t.Errorf("Content-Encoding lines %q: %d %q, want %d and no real value", tc.lines, resp.StatusCode, plain, tc.want)
		}
	}
}

// TestHeaderNameEchoInAnyCase: header names reach the agent canonicalized (or lower-cased by
// HTTP/2), so a value echoed as a name is looked for without case; the agent could fold
// the case back.
func TestHeaderNameEchoInAnyCase(t *testing.T) {
	const real = "deadbeef0123456789abcdef01234567" // a lower-case hex key
	e := newRawEnv(t, real, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		tok := strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-"+tok+": seen\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
		time.Sleep(100 * time.Millisecond)
	}))
	agent, br := e.h1Agent(t)
	io.WriteString(agent, "GET /x HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	resp.Header.Write(&got)
	if strings.Contains(strings.ToLower(got.String()), real) || resp.StatusCode != 200 {
		t.Fatalf("want a 200 without the real value in any case, got %d %q", resp.StatusCode, got.String())
	}
}

// TestInjectedHEAD: the answer to an injected HEAD has a Content-Length and no body; it was
// scrubbed as a body of that length and got 502, over HTTP/1.1 and HTTP/2.
func TestInjectedHEAD(t *testing.T) {
	e := newRawEnv(t, rawReal, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Seen: %s\r\nContent-Length: 1234\r\n\r\n", req.Method)
		}
	}))
	agent, br := e.h1Agent(t)
	io.WriteString(agent, "HEAD /x HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
	req, _ := http.NewRequest("HEAD", "/x", nil)
	resp, err := http.ReadResponse(br, req)
	if err != nil || resp.StatusCode != 200 || resp.ContentLength != 1234 || resp.Header.Get("X-Seen") != "HEAD" {
		t.Fatalf("HTTP/1.1 HEAD: %v %v, want 200 with Content-Length 1234", resp, err)
	}
	r2, _ := http.NewRequest("HEAD", "https://"+rawHost+"/x", nil)
	r2.Header.Set("Authorization", "Bearer "+rawPlaceholder)
	resp, err = e.h2Client(t).Do(r2)
	if err != nil || resp.StatusCode != 200 || resp.ProtoMajor != 2 || resp.ContentLength != 1234 {
		t.Fatalf("HTTP/2 HEAD: %v %v, want 200 with Content-Length 1234", resp, err)
	}
}

// TestTrailersPathKeepsConnectionsToOneScope: a request that asks for trailers (te: trailers,
// which any HTTP/2 agent may send) goes upstream through net/http's Transport. Against an
// upstream that offers only HTTP/1.1, that Transport pooled keep-alive connections shared by
// verbatim and injecting requests alike. An upstream that leaves a GET body unread then
// answered once too often, and the injecting request's echo reached the next, verbatim,
// unscrubbed request. Such requests now go over HTTP/2 only, or over the scoped pool.
func TestTrailersPathKeepsConnectionsToOneScope(t *testing.T) {
	const real = rawReal
	e := newRawEnv(t, real, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			if req.Method != http.MethodGet {
				io.Copy(io.Discard, req.Body)
			} // a GET's body is left unread: its bytes are read as the next request
			var body string
			switch req.URL.Path {
			case "/delay":
				time.Sleep(500 * time.Millisecond)
				fallthrough
			default:
				body = fmt.Sprintf(`{"path":%q,"authorization":%q}`, req.URL.Path, req.Header.Get("Authorization"))
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		}
	}))
	client := e.h2Client(t)
	do := func(name, path, auth, body string) string {
		var rb io.Reader
		if body != "" {
			rb = strings.NewReader(body)
		}
		req, _ := http.NewRequest("GET", "https://"+rawHost+path, rb)
		req.Header.Set("Te", "trailers")
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		_ = name
		time.Sleep(50 * time.Millisecond)
		return string(b)
	}
	// A, verbatim: a GET whose body is a whole request the upstream will also answer (late).
	do("A verbatim", "/a", "", "GET /delay HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n")
	// C, injecting: gets the answer to the smuggled /delay.
	do("C injecting", "/delay", "Bearer "+rawPlaceholder, "")
	// D, verbatim: gets C's answer, which quotes the real key, and is not scrubbed.
	got := do("D verbatim", "/d", "", "")
	if strings.Contains(got, real) {
		t.Fatalf("LEAK: the injecting request's echo reached a verbatim request unscrubbed")
	}
}
