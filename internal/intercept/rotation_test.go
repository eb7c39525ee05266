package intercept

// Rotation and the scoped HTTP/1.1 upstream pool.

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/store"
)

// rotSecrets is a backend whose values the test rotates while avpd runs.
type rotSecrets struct {
	mu sync.Mutex
	v  map[string]string
}

func (r *rotSecrets) Get(_ context.Context, name string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, ok := r.v[name]
	if !ok {
		return nil, store.ErrNotFound
	}
	return []byte(v), nil
}

func (r *rotSecrets) set(name, v string) { r.mu.Lock(); r.v[name] = v; r.mu.Unlock() }

// TestRotatedValueEchoDoesNotReachTheAgent: the scoped HTTP/1.1 pool keeps one
// upstream connection to one (uid, secret names). It exists so that an upstream that answers
// once too often cannot hand an echo of one request's value to a request not scrubbed of it.
// The scope is by name, not value: after the secret is rotated (V0 -> V1), the next request
// on the same pooled connection injects V1 and is scrubbed of V1 only, and reads the extra
// answer that quotes V0. The agent learns the previous key, which is commonly still valid
// during a rotation's grace period.
func TestRotatedValueEchoDoesNotReachTheAgent(t *testing.T) {
	const v0 = "sk-live-OLD-0123456789abcdefghij"
	const v1 = "sk-live-NEW-9876543210zyxwvutsrq"
	for _, rotate := range []bool{false, true} {
		t.Run(fmt.Sprintf("rotate=%v", rotate), func(t *testing.T) {
			sec := &rotSecrets{v: map[string]string{"KEY": v0}}
			e := newRawEnvSecrets(t, rawConfig, sec, []string{"http/1.1"}, serveRaw(func(c *tls.Conn, br *bufio.Reader) {
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					body := fmt.Sprintf(`{"path":%q,"authorization":%q}`, req.URL.Path, req.Header.Get("Authorization"))
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
					if req.URL.Path == "/twice" {
						// A buggy upstream answers once too often, a little later.
						time.Sleep(100 * time.Millisecond)
						body = fmt.Sprintf(`{"path":"extra","authorization":%q}`, req.Header.Get("Authorization"))
						fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
					}
				}
			}))
			agent, br := e.h1Agent(t)
			io.WriteString(agent, "GET /twice HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			b1, _ := io.ReadAll(resp.Body)
			if strings.Contains(string(b1), v0) {
				t.Fatalf("first answer not scrubbed: %s", b1)
			}
			time.Sleep(300 * time.Millisecond) // the extra answer is now in avpd's upstream socket
			if rotate {
				sec.set("KEY", v1) // the cache evicted V0 (sync or TTL); the next fetch gets V1
			}
			io.WriteString(agent, "GET /next HTTP/1.1\r\nHost: "+rawHost+"\r\n"+rawAuthLine+"\r\n")
			resp, err = http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			b2, _ := io.ReadAll(resp.Body)
			t.Logf("second answer the agent got: %s", b2)
			if strings.Contains(string(b2), v0) || strings.Contains(string(b2), v1) {
				t.Fatalf("LEAK: the agent received a real value (previous key after rotation=%v): %s", rotate, b2)
			}
		})
	}
}
