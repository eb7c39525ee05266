package intercept

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// pathsOnlyConfig is rawConfig with KEY bound to /v1/models/** only, and any method
// (methods omitted, as bindings.example.yaml allows).
var pathsOnlyConfig = strings.Replace(rawConfig, `paths: ["/**"]`, `paths: ["/v1/models/**"]`, 1)

// TestH2RequestLineCannotBeSmuggled: net/http's HTTP/2 server does not check that :method is
// a token, nor that :path holds no space. ":method: DELETE /v1/admin/users/1?" with ":path:
// /v1/models/x" was decided on /v1/models/x, injected, and written upstream as the request
// line "DELETE /v1/admin/users/1? /v1/models/x HTTP/1.1", which a server that tolerates
// spaces in the target (nginx's space_in_uri before 1.21.1, NGINX Unit) routes to
// /v1/admin/users/1. Such requests get 400, and nothing goes upstream.
func TestH2RequestLineCannotBeSmuggled(t *testing.T) {
	const real = "sk-REAL-0123456789abcdefghijklmnop"
	rec := &upRecorder{}
	e := newRawEnvConfig(t, pathsOnlyConfig, real, []string{"http/1.1"}, serveRaw(rec.serveRaw))
	h := e.rawH2(t)
	r := h.do(h2Req("GET", rawHost, "/v1/models/x", "authorization", "Bearer "+rawPlaceholder), nil)
	if got := rec.lastRaw(t); r.status != "200" || !strings.Contains(got, real) {
		t.Fatalf("control: %v, upstream got %q", r, got)
	}
	for _, f := range [][]h2Field{
		h2Req("DELETE /v1/admin/users/1?", rawHost, "/v1/models/x", "authorization", "Bearer "+rawPlaceholder),
		h2Req("GET", rawHost, "/v1/models/x?a HTTP/1.1 /v1/admin", "authorization", "Bearer "+rawPlaceholder),
		h2Req("GET", rawHost, "/v1/models/x y", "authorization", "Bearer "+rawPlaceholder),
		h2Req("GE\x7fT", rawHost, "/v1/models/x", "authorization", "Bearer "+rawPlaceholder),
		h2Req("", rawHost, "/v1/models/x", "authorization", "Bearer "+rawPlaceholder),
	} {
		// Go's server itself resets a stream with no method or a control byte in it.
		r := h.do(f, nil)
		if r.status != "400" && !strings.HasPrefix(r.status, "RST_STREAM") {
			t.Errorf("%q %q: %v, want 400", f[0].v, f[3].v, r)
		}
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.reqs) != 0 {
		t.Errorf("the upstream got %q", rec.reqs)
	}
}

// TestH2AuthorityMustBeAHost: an :authority whose port is not a number was cut at its last
// ':' by the decision and injected, and Request.Write then sent the injected request with an
// empty Host. The HTTP/1.1 loop refuses such a Host; so does the HTTP/2 handler now.
func TestH2AuthorityMustBeAHost(t *testing.T) {
	const real = "sk-REAL-0123456789abcdefghijklmnop"
	rec := &upRecorder{}
	e := newRawEnv(t, real, []string{"http/1.1"}, serveRaw(rec.serve))
	h := e.rawH2(t)
	for _, auth := range []string{rawHost + ":443#frag", rawHost + ":<x>", rawHost + `:"`, rawHost + ":", rawHost + ":x443"} {
		// 400 when not a host at all, 421 when its port is not a number.
		if r := h.do(h2Req("GET", auth, "/v1/x", "authorization", "Bearer "+rawPlaceholder), nil); r.status != "400" && r.status != "421" {
			t.Errorf(":authority %q: %v, want 400 or 421", auth, r)
		}
	}
	if r := h.do(h2Req("GET", rawHost+":443", "/v1/x", "authorization", "Bearer "+rawPlaceholder), nil); r.status != "200" {
		t.Errorf(":authority with its port: %v, want 200", r)
	}
	// An injected request carries the bound name as its Host (TestInjectedRequestCarriesTheBoundHost).
	if got := rec.last(t); !strings.Contains(got, "Host: "+rawHost+"\n") {
		t.Errorf("upstream got %q", got)
	}
}

// TestTrailersAfterNoBodyAreScrubbed: an HTTP/2 upstream may send trailers after a 204 or
// 304, which has no body; they were relayed unscrubbed to an HTTP/2 agent that asked for
// trailers.
func TestTrailersAfterNoBodyAreScrubbed(t *testing.T) {
	const real = "sk-REAL-0123456789abcdefghijklmnop"
	for _, code := range []int{http.StatusNoContent, http.StatusNotModified} {
		e := newRawEnv(t, real, []string{"h2"}, serveHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", "X-Echo")
			w.WriteHeader(code)
			w.Header().Set("X-Echo", r.Header.Get("Authorization"))
		})))
		c := e.h2Client(t)
		req, _ := http.NewRequest("GET", "https://"+rawHost+"/v1/x", nil)
		req.Header.Set("Authorization", "Bearer "+rawPlaceholder)
		req.Header.Set("Te", "trailers")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if got := resp.Trailer.Get("X-Echo"); resp.StatusCode != code || strings.Contains(got, real) {
			t.Errorf("%d: got %d, trailer %q", code, resp.StatusCode, got)
		}
	}
}
