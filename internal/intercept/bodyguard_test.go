package intercept

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/agent-vault-proxy/agent-vault-proxy/internal/config"
	"github.com/agent-vault-proxy/agent-vault-proxy/internal/inject"
)

// readAllBy reads r with reads of at most size bytes.
func readAllBy(r io.Reader, size int) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for {
		n, err := r.Read(buf)
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

// A body the scan passes comes through unchanged, whatever the sizes of the reads on
// either side; one it refuses never comes through whole, even when its last byte completes
// the override.
func TestBodyGuardHoldsBackTheEnd(t *testing.T) {
	form := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	wrap := map[string]func(io.Reader) io.Reader{
		"whole":   func(r io.Reader) io.Reader { return r },
		"one":     iotest.OneByteReader,
		"half":    iotest.HalfReader,
		"dataerr": iotest.DataErrReader,
	}
	for _, body := range []string{"a=1&b=2", "x", "_method=POST&c=" + strings.Repeat("z", 5000)} {
		for name, w := range wrap {
			for _, size := range []int{1, 2, 7, 4096} {
				g := &bodyGuard{src: io.NopCloser(w(strings.NewReader(body))), onRefuse: func() { t.Fatal("refused") }}
				g.scan = inject.NewBodyScanner(form, func(m string) bool { return m != "DELETE" })
				got, err := readAllBy(g, size)
				if err != nil || string(got) != body {
					t.Fatalf("%s reads of %d: got %d bytes (%v), want %d", name, size, len(got), err, len(body))
				}
			}
		}
	}
	for _, body := range []string{"_method=DELETE", "a=1&_method=DELET%45", "_method=DELETE&" + strings.Repeat("z", 5000), strings.Repeat("z=1&", 2000) + "_method=DELETE"} {
		for name, w := range wrap {
			for _, size := range []int{1, 3, 4096} {
				refused := 0
				g := &bodyGuard{src: io.NopCloser(w(strings.NewReader(body))), onRefuse: func() { refused++ }}
				g.scan = inject.NewBodyScanner(form, func(m string) bool { return m != "DELETE" })
				got, err := readAllBy(g, size)
				if !errors.Is(err, inject.ErrBodyOverride) || refused != 1 || len(got) >= len(body) {
					t.Fatalf("%q, %s reads of %d: %d of %d bytes came through, err %v, refused %d times", body[:min(20, len(body))], name, size, len(got), len(body), err, refused)
				}
			}
		}
	}
}

// bodyOverrideCase is an injecting POST to /v1/sink whose body may name an override; the
// binding allows POST and GET.
type bodyOverrideCase struct {
	name, ct, ce, body string
	refused            bool
	// uncheckable: refused as a body that cannot be checked at all, which the refusal
	// says (body_not_checkable), rather than as one that names an override.
	uncheckable bool
}

// reason is the refusal tc gets.
func (tc bodyOverrideCase) reason() string {
	if tc.uncheckable {
		return inject.ReasonBodyNotCheckable
	}
	return inject.ReasonMethodOverride
}

func bodyOverrideCases() []bodyOverrideCase {
	var mp bytes.Buffer
	mw := multipart.NewWriter(&mp)
	mw.WriteField("purpose", "batch")
	fw, _ := mw.CreateFormFile("file", "data.jsonl")
	fw.Write(bytes.Repeat([]byte(`{"x":"_method=DELETE"}`+"\n"), 3000))
	mw.WriteField("_method", "DELETE")
	mw.Close()
	var mpOK bytes.Buffer
	mw2 := multipart.NewWriter(&mpOK)
	fw, _ = mw2.CreateFormFile("file", "data.jsonl")
	fw.Write(bytes.Repeat([]byte(`{"x":"_method=DELETE"}`+"\n"), 3000))
	mw2.Close()
	big := strings.Repeat("a", 300<<10)
	form := "application/x-www-form-urlencoded"
	return []bodyOverrideCase{
		{"form small", form, "", "a=1&_method=DELETE", true, false},
		{"form allowed", form, "", "a=1&_method=get", false, false},
		{"no type", "", "", "_method=PUT", true, false},
		{"form large, at the end", form, "", "a=" + big + "&_method=DELETE", true, false},
		{"form large, at the start", form, "", "_method=DELETE&a=" + big, true, false},
		{"form large, none", form, "", "a=" + big, false, false},
		{"json", "application/json", "", `{"model":"m","_method":"DELETE"}`, true, false},
		{"json large", "application/json", "", `{"input":"` + big + `","\u005fmethod":"PATCH"}`, true, false},
		{"json nested", "application/json", "", `{"messages":[{"role":"user","content":"_method=DELETE","_method":"DELETE"}]}`, false, false},
		{"multipart", mw.FormDataContentType(), "", mp.String(), true, false},
		{"multipart, in a file", mw2.FormDataContentType(), "", mpOK.String(), false, false},
		{"compressed form", form, "gzip", "a=1", true, true},
		{"json in UTF-16", "application/json; charset=utf-16le", "", "{\x00\"\x00_\x00m\x00e\x00t\x00h\x00o\x00d\x00\"\x00:\x00\"\x00P\x00U\x00T\x00\"\x00}\x00", true, true},
		{"json in UTF-8, named", "application/json; charset=utf-8", "", `{"model":"m"}`, false, false},
		{"plain text", "text/plain", "", "_method=DELETE", false, false},
	}
}

// TestBodyOverridesAreRefused: an injecting request whose body names an override the
// binding does not allow (as Rails, Laravel and Symfony read one) is answered 403 and never
// reaches the upstream whole, over HTTP/1.1 (buffered, streamed with a length, chunked)
// and HTTP/2; the refusal is audited. The same bodies without the override go through.
func TestBodyOverridesAreRefused(t *testing.T) {
	check := func(t *testing.T, what string, tc bodyOverrideCase, resp *http.Response, p *h1Pair) {
		t.Helper()
		whole, started, audit := p.sinks.Load(), p.sinkStarts.Load(), p.audit.snapshot()
		switch {
		case tc.refused && len(tc.body) <= maxWholeBody && started != 0:
			// A short body is checked before anything is sent.
			t.Errorf("%s %s: the upstream got the request's head", what, tc.name)
		case tc.refused && (resp.StatusCode != http.StatusForbidden || whole != 0):
			t.Errorf("%s %s: %d, upstream got %d whole bodies; want 403 and none", what, tc.name, resp.StatusCode, whole)
		case tc.refused && resp.Header.Get("X-Agent-Vault-Proxy") != tc.reason():
			t.Errorf("%s %s: X-Agent-Vault-Proxy %q", what, tc.name, resp.Header.Get("X-Agent-Vault-Proxy"))
		case !tc.refused && (resp.StatusCode != http.StatusOK || whole != 1):
			t.Errorf("%s %s: %d, upstream got %d whole bodies; want 200 and one", what, tc.name, resp.StatusCode, whole)
		}
		refusals := 0
		for _, e := range audit {
			if e.Reason == tc.reason() {
				refusals++
			}
		}
		if tc.refused != (refusals == 1) {
			t.Errorf("%s %s: %d refusals audited", what, tc.name, refusals)
		}
	}
	// The upstream counts a body once its handler has read it all, which may be just after
	// the answer left.
	settle := func() { time.Sleep(30 * time.Millisecond) }
	for _, tc := range bodyOverrideCases() {
		for _, chunked := range []bool{false, true} {
			head := "POST /v1/sink HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n"
			if tc.ct != "" {
				head += "Content-Type: " + tc.ct + "\r\n"
			}
			if tc.ce != "" {
				head += "Content-Encoding: " + tc.ce + "\r\n"
			}
			body := tc.body
			if chunked {
				head += "Transfer-Encoding: chunked\r\n"
				var b strings.Builder
				for rest := tc.body; rest != ""; {
					n := min(len(rest), 1000)
					fmt.Fprintf(&b, "%x\r\n%s\r\n", n, rest[:n])
					rest = rest[n:]
				}
				b.WriteString("0\r\n\r\n")
				body = b.String()
			} else {
				head += fmt.Sprintf("Content-Length: %d\r\n", len(body))
			}
			// An agent connection of its own: a refusal closes it.
			p := newH1Pair(t)
			go func() {
				w := bufio.NewWriter(p.agent)
				w.WriteString(head + "\r\n")
				w.WriteString(body)
				w.Flush()
			}()
			resp, err := http.ReadResponse(p.br, nil)
			if err != nil {
				t.Fatalf("HTTP/1.1 %s: %v", tc.name, err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			settle()
			check(t, fmt.Sprintf("HTTP/1.1 (chunked %v)", chunked), tc, resp, p)
		}

		p := newH1Pair(t)
		r, _ := http.NewRequest("POST", "https://api.openai.com/v1/sink", strings.NewReader(tc.body))
		r.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
		if tc.ct != "" {
			r.Header.Set("Content-Type", tc.ct)
		}
		if tc.ce != "" {
			r.Header.Set("Content-Encoding", tc.ce)
		}
		resp, err := p.h2Client(t).Do(r)
		if err != nil {
			t.Fatalf("HTTP/2 %s: %v", tc.name, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("HTTP/2 %s: went over HTTP/%d", tc.name, resp.ProtoMajor)
		}
		settle()
		check(t, "HTTP/2", tc, resp, p)
	}
}

// TestShortBodyCutOffIsNotWhole: a short body the agent stops sending before its declared
// length or its last chunk is the agent's error (400), and nothing of it is sent: read
// ahead for the check, it must not be taken for a whole body.
func TestShortBodyCutOffIsNotWhole(t *testing.T) {
	for _, raw := range []string{
		"Content-Length: 100\r\n\r\na=1&b=2",
		"Transfer-Encoding: chunked\r\n\r\n7\r\na=1&b=2\r\n",
	} {
		p := newH1Pair(t)
		io.WriteString(p.agent, "POST /v1/sink HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n"+
			"Content-Type: application/x-www-form-urlencoded\r\n"+raw)
		p.agent.CloseWrite()
		resp, err := http.ReadResponse(p.br, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		time.Sleep(30 * time.Millisecond)
		if resp.StatusCode != http.StatusBadRequest || p.sinkStarts.Load() != 0 {
			t.Errorf("%q: %d, upstream got %d requests; want 400 and none", raw, resp.StatusCode, p.sinkStarts.Load())
		}
	}
}

// TestSlowBodyDoesNotHoldReloads: while avpd waits for a short body to check it, a reload
// goes ahead (the gate is not held); the request, decided under the old policy, then
// injects nothing.
func TestSlowBodyDoesNotHoldReloads(t *testing.T) {
	p := newH1Pair(t)
	io.WriteString(p.agent, "POST /v1/sink HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n"+
		"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\na=1")
	time.Sleep(50 * time.Millisecond) // decided, and waiting for the rest of the body
	reloadMustNotWait(t, p)
	io.WriteString(p.agent, "&b=2")
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || p.sinkStarts.Load() != 0 {
		t.Errorf("%d, upstream got %d requests; want 502 and none", resp.StatusCode, p.sinkStarts.Load())
	}
}

// TestShortBodyWithExpectContinue: an agent that waits for 100 Continue before it sends a
// short body (curl does above 1 KiB) gets it from avpd, which reads the body to check it.
func TestShortBodyWithExpectContinue(t *testing.T) {
	p := newH1Pair(t)
	body := "a=" + strings.Repeat("x", 5000)
	io.WriteString(p.agent, "POST /v1/sink HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-avp-PLACEHOLDER-openai-000000000000\r\n"+
		"Content-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n"+fmt.Sprintf("Content-Length: %d\r\n\r\n", len(body)))
	p.agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := p.br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("want 100 Continue before the body, got %q %v", line, err)
	}
	p.br.ReadString('\n') // the blank line
	io.WriteString(p.agent, body)
	resp, err := http.ReadResponse(p.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(got), fmt.Sprintf(`"bytes":%d`, len(body))) {
		t.Fatalf("%d %q", resp.StatusCode, got)
	}
}

// TestSettledBodyIsNotHeldBack: a body the scan settles (a gRPC frame under a JSON content
// type) passes through as it comes, its last byte included, so an interactive stream that
// waits for an answer to each message goes on; neither the read ahead nor the guard waits
// for the body's end.
func TestSettledBodyIsNotHeldBack(t *testing.T) {
	h := http.Header{"Content-Type": {"application/grpc+json"}}
	frame := "\x00\x00\x00\x00\x0f{\"_method\":\"x\"}"
	inj := &injected{check: &bodyCheck{}}
	s := &Server{}

	pr, pw := io.Pipe()
	go pw.Write([]byte(frame)) // and the stream stays open
	done := make(chan struct{})
	var pre []byte
	var whole bool
	var err error
	go func() { pre, whole, err = prereadBody(pr, -1, h); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("the read ahead waited for the end of a settled body")
	}
	if err != nil || whole || len(pre) == 0 {
		t.Fatalf("read ahead: %d bytes, whole %v, %v", len(pre), whole, err)
	}

	g := s.newBodyGuard(context.Background(), inj, h, newPrefixed(pre, pr))
	if g == nil {
		t.Fatal("no guard for a JSON body")
	}
	got := make(chan string, 1)
	go func() {
		buf := make([]byte, 64)
		var b []byte
		for len(b) < len(frame) {
			n, err := g.Read(buf)
			b = append(b, buf[:n]...)
			if err != nil {
				break
			}
		}
		got <- string(b)
	}()
	select {
	case b := <-got:
		if b != frame {
			t.Fatalf("got %q", b)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the guard held back the end of a settled body")
	}
	pw.Close()
}

// TestSlowBodyDoesNotHoldReloadsH2: as TestSlowBodyDoesNotHoldReloads, for an HTTP/2 agent.
func TestSlowBodyDoesNotHoldReloadsH2(t *testing.T) {
	p := newH1Pair(t)
	pr, pw := io.Pipe()
	r, _ := http.NewRequest("POST", "https://api.openai.com/v1/sink", pr)
	r.ContentLength = 7
	r.Header.Set("Authorization", "Bearer sk-avp-PLACEHOLDER-openai-000000000000")
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	type result struct {
		resp *http.Response
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := p.h2Client(t).Do(r)
		done <- result{resp, err}
	}()
	io.WriteString(pw, "a=1")
	time.Sleep(100 * time.Millisecond) // decided, and waiting for the rest of the body
	reloadMustNotWait(t, p)
	io.WriteString(pw, "&b=2")
	pw.Close()
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	res.resp.Body.Close()
	if res.resp.ProtoMajor != 2 || res.resp.StatusCode != http.StatusBadGateway || p.sinkStarts.Load() != 0 {
		t.Errorf("HTTP/%d %d, upstream got %d requests; want 502 over HTTP/2 and none", res.resp.ProtoMajor, res.resp.StatusCode, p.sinkStarts.Load())
	}
}

// reloadMustNotWait reloads p's server (to the same bindings) and fails the test if the
// reload does not return at once.
func reloadMustNotWait(t *testing.T, p *h1Pair) {
	t.Helper()
	cfg, err := config.Parse("bindings.yaml", []byte(h1BenchConfig))
	if err != nil {
		t.Fatal(err)
	}
	reloaded := make(chan struct{})
	go func() {
		p.srv.SetPolicy(inject.NewPolicy(cfg))
		close(reloaded)
	}()
	select {
	case <-reloaded:
	case <-time.After(3 * time.Second):
		t.Fatal("a reload waited for an agent's body")
	}
}
