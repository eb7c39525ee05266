package intercept

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// TestInjectedRequestCarriesTheBoundHost: the decision compares the agent's Host with the
// SNI after normalization (case, port, one trailing dot), but the request went upstream
// with the Host as the agent spelt it. An upstream that routes by Host (Go's ServeMux host
// patterns here; virtual hosts and multi-tenant gateways alike) read "api.example.com." or
// "API.example.com:443" as another host and served the request, real key and all, from
// another virtual host. An injected request now carries the bound name itself, and a Host
// in brackets that is not an IPv6 address is not a host at all.
func TestInjectedRequestCarriesTheBoundHost(t *testing.T) {
	const real = "sk-REAL-0123456789abcdefghijklmnop"
	var mu sync.Mutex
	var hosts, leaked []string
	mux := http.NewServeMux()
	mux.HandleFunc(rawHost+"/", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hosts = append(hosts, r.Host)
		mu.Unlock()
		io.WriteString(w, "bound vhost")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.Header.Get("Authorization"), real) {
			mu.Lock()
			leaked = append(leaked, r.Host)
			mu.Unlock()
		}
		io.WriteString(w, "catch-all vhost")
	})
	e := newRawEnv(t, real, []string{"h2", "http/1.1"}, serveHandler(mux))
	h1 := func(host string) string {
		c, br := e.h1Agent(t)
		io.WriteString(c, "GET /v1/x HTTP/1.1\r\nHost: "+host+"\r\n"+rawAuthLine+"Connection: close\r\n\r\n")
		line, _ := br.ReadString('\n')
		return strings.TrimSpace(line)
	}
	for _, host := range []string{rawHost, rawHost + ".", strings.ToUpper(rawHost) + ":443", rawHost + ".:443"} {
		if st := h1(host); !strings.Contains(st, " 200 ") {
			t.Errorf("HTTP/1.1 Host %q: %s, want 200", host, st)
		}
	}
	for _, host := range []string{"[" + rawHost + "]", "[" + rawHost + "]:443"} {
		if st := h1(host); strings.Contains(st, " 200 ") {
			t.Errorf("HTTP/1.1 Host %q: %s: a name in brackets is not a host", host, st)
		}
	}
	c := e.h2Client(t)
	for _, host := range []string{rawHost + ".", strings.ToUpper(rawHost)} {
		req, _ := http.NewRequest("GET", "https://"+rawHost+"/v1/x", nil)
		req.Host = host
		req.Header.Set("Authorization", "Bearer "+rawPlaceholder)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("HTTP/2 :authority %q: %v", host, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "bound vhost" {
			t.Errorf("HTTP/2 :authority %q: %d %q", host, resp.StatusCode, body)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(leaked) > 0 {
		t.Fatalf("the real key reached the upstream's catch-all virtual host, not %s's, for Host %q", rawHost, leaked)
	}
	for _, h := range hosts {
		if h != rawHost {
			t.Errorf("an injected request reached the upstream with Host %q, want %q", h, rawHost)
		}
	}
}
