package intercept

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// echoAuth answers every request with a JSON body built by render from the Authorization
// header the upstream received.
func echoAuth(render func(auth string) string) func(net.Listener) {
	return serveRaw(func(c *tls.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			body := render(req.Header.Get("Authorization"))
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		}
	})
}

// getEcho sends one GET with the given Authorization line and returns "status body".
func getEcho(t *testing.T, e *rawEnv, authLine string) string {
	t.Helper()
	agent, br := e.h1Agent(t)
	agent.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(agent, "GET /echo HTTP/1.1\r\nHost: "+rawHost+"\r\n"+authLine+"\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, b)
}

func jsonEcho(a string) string {
	b, _ := json.Marshal(map[string]any{"headers": map[string]string{"Authorization": a}})
	return string(b)
}

// TestShortValueIsNotInjected: a value under minScrubLen cannot be scrubbed (it would match
// ordinary text), so an echo handed it to the agent. It is not injected: 503.
func TestShortValueIsNotInjected(t *testing.T) {
	const real = "Zq7-x9P" // 7 bytes
	e := newRawEnv(t, real, []string{"http/1.1"}, echoAuth(jsonEcho))
	got := getEcho(t, e, rawAuthLine)
	if strings.Contains(got, real) || !strings.HasPrefix(got, "503 ") || !strings.Contains(got, "secret_too_short") {
		t.Fatalf("got %s, want 503 secret_too_short", got)
	}
}

// TestEncodedInputIsScrubbed: a Basic credential composed from parts too short to scrub on
// their own. The rendered base64 was scrubbed, but an upstream that decodes the credential
// and quotes it ("ops:Tr0ub4d") handed the password to the agent. What went into b64encode
// is scrubbed too.
func TestEncodedInputIsScrubbed(t *testing.T) {
	const cfg = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  BASIC:
    placeholder: ` + rawPlaceholder + `
    inject:
      header: Authorization
      format: "Basic {secret}"
      template: "{{ (USER + ':' + PASS) | b64encode }}"
      compose: [USER, PASS]
    bindings:
      - host: ` + rawHost + `
`
	e := newRawEnvSecrets(t, cfg, mapSecrets{"USER": "ops", "PASS": "Tr0ub4d"}, []string{"http/1.1"}, echoAuth(func(a string) string {
		dec, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(a, "Basic "))
		b, _ := json.Marshal(map[string]string{"error": "invalid credentials", "credentials": string(dec), "raw": a})
		return string(b)
	}))
	got := getEcho(t, e, "Authorization: Basic "+rawPlaceholder+"\r\n")
	if !strings.HasPrefix(got, "200 ") || strings.Contains(got, "Tr0ub4d") || strings.Contains(got, "b3BzOlRyMHViNGQ=") || strings.Count(got, rawPlaceholder) != 2 {
		t.Fatalf("got %s, want both forms scrubbed", got)
	}
}

// TestNonASCIIValueIsNotInjected: a plain value with a byte past ASCII was injected (a
// template's result with one got 503). Node reads header bytes as Latin-1 and answers in
// UTF-8 ("Ã©"), Python writes "\u00e9": forms a byte-by-byte scrubber does not know, which
// the agent can undo.
func TestNonASCIIValueIsNotInjected(t *testing.T) {
	real := "pw-s\xc3\xa9cret-4f9a1c7e2b"
	e := newRawEnv(t, real, []string{"http/1.1"}, echoAuth(func(a string) string {
		var sb strings.Builder
		for i := 0; i < len(a); i++ {
			sb.WriteRune(rune(a[i])) // Latin-1 to UTF-8, as Node's res.json(req.headers)
		}
		return jsonEcho(sb.String())
	}))
	got := getEcho(t, e, rawAuthLine)
	if !strings.HasPrefix(got, "503 ") || strings.Contains(got, "cret-4f9a1c7e2b") {
		t.Fatalf("got %s, want 503 and nothing of the value", got)
	}
}
