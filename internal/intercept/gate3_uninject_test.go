package intercept

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// rev3TwoSecretsConfig: two secrets injected in one request, each in its own header. COMBO's
// value (a template "KEY:SEC") contains KEY's value. KEY is declared first.
const rev3TwoSecretsConfig = `version: 1
backend: {type: file, file: {path: /etc/avp/secrets.yaml}}
secrets:
  AKEY:
    placeholder: avp-PLACEHOLDER-key-0000000000000
    inject: {header: X-Api-Key, format: "{secret}"}
    bindings:
      - host: ` + rawHost + `
  ZCOMBO:
    placeholder: avp-PLACEHOLDER-combo-00000000000
    inject:
      header: Authorization
      format: "Bearer {secret}"
      template: "{{ AKEY + ':' + SEC }}"
      compose: [AKEY, SEC]
    bindings:
      - host: ` + rawHost + `
`

const (
	rev3Key = "key-id-0123456789abcdef"
	rev3Sec = "key-secret-fedcba9876543210"
)

// rev3TwoSecrets sends one request holding both placeholders and returns the headers the
// upstream received. trailers makes it go through the HTTP/2 Transport (h2Gate).
func rev3TwoSecrets(t *testing.T, trailers bool) (apiKey, auth string) {
	var mu sync.Mutex
	e := newRawEnvSecrets(t, rev3TwoSecretsConfig, mapSecrets{"AKEY": rev3Key, "SEC": rev3Sec},
		[]string{"h2", "http/1.1"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			apiKey, auth = r.Header.Get("X-Api-Key"), r.Header.Get("Authorization")
			t.Logf("upstream saw %s te=%q", r.Proto, r.Header.Get("Te"))
			mu.Unlock()
			io.WriteString(w, "ok")
		})))
	c := e.h2Client(t)
	c.Timeout = 10 * time.Second
	req, _ := http.NewRequest("GET", "https://"+rawHost+"/v1/x", nil)
	if trailers {
		req.Header.Set("Te", "trailers")
	}
	req.Header.Set("X-Api-Key", "avp-PLACEHOLDER-key-0000000000000")
	req.Header.Set("Authorization", "Bearer avp-PLACEHOLDER-combo-00000000000")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	mu.Lock()
	defer mu.Unlock()
	return apiKey, auth
}

// TestGate3TwoSecretsHTTP1Upstream: control. Through the HTTP/1.1 pool both are injected.
func TestGate3TwoSecretsHTTP1Upstream(t *testing.T) {
	k, a := rev3TwoSecrets(t, false)
	t.Logf("upstream got X-Api-Key=%q Authorization=%q", k, a)
	if k != rev3Key || a != "Bearer "+rev3Key+":"+rev3Sec {
		t.Fatalf("not injected as decided")
	}
}

// TestGate3TwoSecretsH2TransportUnInject: the same request with Te: trailers goes through the
// HTTP/2 Transport. h2Gate.letGo's unInject replaces, in every target header, every injected
// value with its own placeholder, in inj.values order: in Authorization, KEY's value (a part of
// COMBO's) is replaced first, with KEY's placeholder, leaving "Bearer <KEY ph>:<real SEC>".
// gotConn's injectHeaders then finds no COMBO placeholder in Authorization: the upstream gets
// KEY's placeholder and the real SEC, the request decided to inject fails.
func TestGate3TwoSecretsH2TransportUnInject(t *testing.T) {
	k, a := rev3TwoSecrets(t, true)
	t.Logf("upstream got X-Api-Key=%q Authorization=%q", k, a)
	if k != rev3Key || a != "Bearer "+rev3Key+":"+rev3Sec {
		if strings.Contains(a, rev3Sec) {
			t.Errorf("Authorization still held the real SEC while the request held no gate (between letGo and gotConn)")
		}
		t.Fatalf("the HTTP/2 Transport path did not inject as decided")
	}
}
